"""torch.compile for sampling: when it is used, that it gives the eager network's outputs, and the fallback."""
import os
import shutil
import warnings

import pytest
import torch

from biasgen import compiling
from biasgen.compiling import compiled, should_compile
from biasgen.config import build_config
from biasgen.errors import BiasgenError
from biasgen.images.audit import PRESETS, AuditConfig
from biasgen.images.evaluation import sampling_networks
from biasgen.images.unet import UNet

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CI"),
                                    reason="no C++ compiler: torch.compile cannot build CPU kernels (.ci/run installs g++)")


def test_auto_compiles_only_long_samplers_of_the_measured_network_on_a_cpu():
    assert should_compile("auto", "cpu", 1000)
    assert not should_compile("auto", "cpu", compiling.MIN_SAMPLER_CALLS - 1)  # the tiny preset's 5 DDIM steps
    assert not should_compile("auto", "cuda", 1000)  # not measured on accelerators: opt in with "on"
    assert not should_compile("auto", "cpu", 1000, measured_network=False)  # e.g. a diffusers UNet2DModel
    assert should_compile("on", "cpu", 5) and not should_compile("off", "cpu", 1000)
    assert build_config(AuditConfig, PRESETS, "default", None, {}).compile == "auto"
    with pytest.raises(BiasgenError, match="--compile must be auto, on or off"):
        build_config(AuditConfig, PRESETS, "tiny", None, {"compile": "yes"})


def test_the_audit_compiles_its_own_unet_only_where_auto_says_so(monkeypatch):
    calls = []
    monkeypatch.setattr("biasgen.images.evaluation.compiled", lambda m, example: calls.append(example) or ("fast", m))
    unet = UNet(base_width=8, channel_mults=(1, 2), attention_levels=(), res_blocks=1, dropout=0.0)
    wrapped = torch.nn.Sequential(unet)  # e.g. a fine-tune's adapted network: not what was measured
    default = build_config(AuditConfig, PRESETS, "default", None, {})
    assert sampling_networks([unet, wrapped], default, (1, 8, 8)) == [("fast", unet), wrapped]
    assert [tuple(x.shape) for x in calls[0]] == [(48, 1, 8, 8), (48,)]  # the sampler's batch: 48 samples
    tiny = build_config(AuditConfig, PRESETS, "tiny", None, {})  # 5 DDIM steps: not worth compiling
    assert sampling_networks([unet], tiny, (1, 8, 8)) == [unet]
    off = build_config(AuditConfig, PRESETS, "default", None, {"compile": "off"})
    assert sampling_networks([unet], off, (1, 8, 8)) == [unet] and len(calls) == 1


@needs_compiler
def test_compiled_network_gives_the_eager_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).eval()
    x = torch.randn(5, 6)
    fast = compiled(net, example=(x,))
    assert fast is not net
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=1e-5)  # float32 rounding of fused kernels


def test_a_failing_compiler_falls_back_to_the_eager_network_once(monkeypatch):
    attempts = []

    def broken(model):
        def call(*args):
            attempts.append(model)
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiling, "_failed_here", set())
    net = torch.nn.Bilinear(3, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiled(net, example=(torch.zeros(2, 3), torch.zeros(2, 3))) is net
        other = torch.nn.Bilinear(3, 3, 3)  # the next checkpoint's weights: not tried again in this process
        assert compiled(other, example=(torch.zeros(2, 3), torch.zeros(2, 3))) is other
    assert len(attempts) == 1 and sum("--compile off" in str(w.message) for w in caught) == 1


@needs_compiler
def test_an_audit_with_compiled_networks_draws_the_eager_samples(tmp_path):
    from biasgen.checkpoint import load_tensors
    from biasgen.cli import main

    for way in ("off", "on"):  # the tiny preset evaluates in this process (one worker)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["audit", "--preset", "tiny", "--quiet", "--out", str(tmp_path / way), "--compile", way]) == 0
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # compiled, not the fallback
    for step in (4, 7, 12):
        eager, fast = (load_tensors(tmp_path / way / "samples" / f"step_{step:07d}")[0]["samples"] for way in ("off", "on"))
        torch.testing.assert_close(fast, eager, atol=1e-4, rtol=0)  # float32 rounding of fused kernels, 5 steps
