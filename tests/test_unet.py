import json

import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.images.unet import PAPER_CONFIG, UNet, count_parameters, timestep_embedding

SMALL = dict(base_width=16, channel_mults=(1, 2), attention_levels=(1,), res_blocks=1)


@pytest.mark.parametrize(
    "channels, size, config",
    [
        (1, 8, SMALL),
        (3, 16, dict(SMALL, attention_levels=(0, 1))),
        (1, 28, dict(SMALL, channel_mults=(1, 2), attention_levels=())),
        (1, 16, dict(base_width=8, channel_mults=(1, 2, 2, 2), attention_levels=(3,), res_blocks=1, groups=4)),
    ],
)
def test_output_shape_matches_input(channels, size, config):
    torch.manual_seed(0)
    net = UNet(channels=channels, **config)
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.tensor([1, 500, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_paper_config_forward():
    torch.manual_seed(0)
    net = UNet(**PAPER_CONFIG).eval()
    assert 3_000_000 < count_parameters(net) < 6_000_000  # a small U-Net, as in docs/method.md §8
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32), torch.tensor([10, 900]))
    assert out.shape == (2, 1, 32, 32)


def test_float_and_long_steps_agree():
    torch.manual_seed(0)
    net = UNet(**SMALL).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.tensor([3, 700]))
        b = net(x, torch.tensor([3.0, 700.0]))
    assert torch.equal(a, b)


def test_output_depends_on_time():
    torch.manual_seed(0)
    net = UNet(**SMALL).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        out = net(x, torch.tensor([1, 999]))
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding_shape_and_range():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 32)
    assert e.shape == (3, 32)
    assert torch.allclose(e[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    assert e.abs().max() <= 1


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = UNet(**dict(SMALL, attention_levels=(0, 1)))
    x = torch.randn(4, 1, 8, 8)
    loss = (net(x, torch.randint(1, 1000, (4,))) - x).pow(2).mean()
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_same_seed_same_model_different_seed_different_model():
    def build(seed):
        torch.manual_seed(seed)
        return UNet(**SMALL)

    a, b, c = build(1), build(1), build(2)
    for (n, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    torch.manual_seed(7)
    out_a = a(x, t)  # train mode: dropout draws from the global generator
    torch.manual_seed(7)
    out_b = b(x, t)
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(a.eval()(x, t), c.eval()(x, t))


def test_config_roundtrips_through_json():
    torch.manual_seed(0)
    net = UNet(channels=3, **SMALL)
    config = json.loads(json.dumps(net.config))
    rebuilt = UNet.from_config(config)
    rebuilt.load_state_dict(net.state_dict())
    assert rebuilt.config == net.config
    assert count_parameters(rebuilt) == count_parameters(net)


@pytest.mark.parametrize(
    "config, words",
    [
        (dict(base_width=30), "multiple of the GroupNorm groups"),
        (dict(attention_levels=(3,)), "attention_levels"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(res_blocks=0), "res_blocks"),
        (dict(dropout=1.0), "dropout"),
        (dict(channels=0), "channels"),
    ],
)
def test_bad_config_is_refused(config, words):
    with pytest.raises(BiasgenError, match=words):
        UNet(**config)


def test_unknown_config_key_is_refused():
    with pytest.raises(BiasgenError, match="Unknown U-Net setting"):
        UNet.from_config(dict(SMALL, width=3))


def test_bad_input_is_refused():
    torch.manual_seed(0)
    net = UNet(**dict(SMALL, channel_mults=(1, 2, 2), attention_levels=()))
    with pytest.raises(BiasgenError, match="divisible by 4"):
        net(torch.randn(1, 1, 10, 10), torch.tensor([1]))
    with pytest.raises(BiasgenError, match="shape"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(BiasgenError, match="one step per image"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([1]))
