"""The single-run monitor: inside a toy training loop, resume, flags on known copiers, and bad input."""
import json

import pytest
import torch

import biasgen
from biasgen.errors import BiasgenError
from biasgen.images.data import load_images, scale_images
from biasgen.images.unet import UNet
from biasgen.losses import EpsMSELoss
from biasgen.images.monitor import reference_sets
from biasgen.runs import read_jsonl
from biasgen.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.linear()
FAST = dict(n_samples=12, sample_steps=8, n_loss=48, n_boot=200, verbose=False)


@pytest.fixture(scope="module")
def digits():
    x = scale_images(load_images("digits").images)[0]  # (1797, 1, 8, 8) in [-1, 1]
    return x[:48], x[48:120]


def toy_loop(train, steps=50, monitor=None, every=10):
    """A plain training loop of a tiny U-Net; ``monitor.check`` every ``every`` steps when given."""
    torch.manual_seed(0)
    net = UNet(channels=1, base_width=8, channel_mults=(1, 2), attention_levels=(), res_blocks=1, dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = EpsMSELoss(SCHEDULE)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        loss = loss_fn(net, train[torch.randint(len(train), (16,), generator=gen)], gen)  # dropout uses the global RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None and step % every == 0:
            monitor.check(step, net)
            assert net.training  # the check restored train mode
    return net


def memorizer(images: torch.Tensor):
    """The exact denoiser of the empirical distribution of ``images``: its samples are copies of them."""
    flat = images.reshape(len(images), -1)

    def eps(x_t, t):
        abar = SCHEDULE.abar(t, like=x_t).reshape(-1, 1)
        x = x_t.reshape(len(x_t), -1)
        logits = -((x[:, None] - abar.sqrt()[:, :, None] * flat[None]) ** 2).sum(-1) / (2 * (1 - abar))
        x0 = torch.softmax(logits, 1) @ flat
        return ((x - abar.sqrt() * x0) / (1 - abar).sqrt()).reshape(x_t.shape)

    return eps


def test_monitor_in_a_toy_training_loop(digits, tmp_path):
    train, heldout = digits
    monitor = biasgen.Monitor(train, heldout, tmp_path / "mon", figures=True, **FAST)
    net = toy_loop(train, monitor=monitor)
    # the checks left the training itself untouched: same weights as a loop without the monitor
    plain = toy_loop(train)
    for a, b in zip(net.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)

    records = read_jsonl(tmp_path / "mon" / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    first, last = records[0], records[-1]
    assert last["val_loss"] < first["val_loss"]  # the network learns
    for r in records:
        assert set(r["flags"]) == {"val_loss_minimum", "closer_to_train", "copies", "first_copies"}
        assert len(r["gap_by_t"]["gap"]) == 10 and sum(r["gap_by_t"]["count"]) == 48
        assert r["f_mem_ci"][0] <= r["f_mem"] <= r["f_mem_ci"][1]
    assert first["flags"]["val_loss_minimum"]
    for prev, r in zip(records, records[1:]):  # "at its minimum so far" means exactly that
        assert r["flags"]["val_loss_minimum"] == (r["val_loss"] <= min(q["val_loss"] for q in records if q["step"] < r["step"]))
    run = json.loads((tmp_path / "mon" / "run.json").read_text())
    assert run["kind"] == "monitor" and run["config"]["n_samples"] == 12
    assert run["seeds"]["monitor_loss"] == 417 and run["data"]["overlap"] == 0
    assert run["environment"]["torch"] == torch.__version__
    ref_train, ref_heldout = reference_sets(train, heldout, run["seeds"])  # rebuilt from run.json alone
    assert torch.equal(ref_train, monitor.ref_train) and torch.equal(ref_heldout, monitor.ref_heldout)
    assert len(ref_train) == len(ref_heldout) == 48 and not torch.equal(ref_heldout, heldout[:48])  # size-matched, drawn
    for name in ("fig_monitor.png", "fig_monitor_gallery.png", "summary.json", "samples/step_0000050.safetensors"):
        assert (tmp_path / "mon" / name).stat().st_size > 0


def test_monitor_resumes_and_refuses_another_run(digits, tmp_path):
    train, heldout = digits
    model = memorizer(heldout)
    monitor = biasgen.Monitor(train, heldout, tmp_path / "mon", figures=False, **FAST)
    first = monitor.check(100, model)
    with pytest.raises(BiasgenError, match="in use by pid"):  # one writer per folder
        biasgen.Monitor(train, heldout, tmp_path / "mon", figures=False, **FAST)
    monitor.close()

    def must_not_run(x_t, t):
        raise AssertionError("a recorded step was measured again")

    again = biasgen.Monitor(train, heldout, tmp_path / "mon", figures=False, **FAST)  # a new process, same folder
    assert again.check(100, must_not_run) == first
    again.check(200, model)
    assert [r["step"] for r in again.records] == [100, 200]
    # the same model measured at another step gives the same numbers: every input is fixed
    assert again.records[1]["val_loss"] == first["val_loss"] and again.records[1]["copy_z"] == first["copy_z"]
    again.close()

    with pytest.raises(BiasgenError, match="different monitor run"):
        biasgen.Monitor(train, heldout, tmp_path / "mon", **dict(FAST, n_samples=13))
    fresh = biasgen.Monitor(train, heldout, tmp_path / "mon", force=True, figures=False, **FAST)
    assert fresh.records == []


def test_monitor_flags_a_model_that_copies_its_training_data(digits, tmp_path):
    train, heldout = digits
    copier = biasgen.Monitor(train, heldout, tmp_path / "copier", figures=False, **FAST)
    r1 = copier.check(1, memorizer(train))
    r2 = copier.check(2, memorizer(train))
    assert r1["f_mem"] > 0.5 and r1["f_mem_ci"][0] > 0
    assert r1["copy_z"] < -2 and r1["nn_train_l2"] < r1["nn_heldout_l2"]
    assert r1["flags"] == {"val_loss_minimum": True, "closer_to_train": True, "copies": True, "first_copies": True}
    assert r2["flags"]["copies"] and not r2["flags"]["first_copies"]  # "first copies" fires once
    summary = json.loads((tmp_path / "copier" / "summary.json").read_text())
    assert summary["first_copies_step"] == 1 and summary["first_closer_to_train_step"] == 1

    # a model that copies *other* images is no closer to the training data than fresh data is
    other = biasgen.Monitor(train, heldout, tmp_path / "other", figures=False, **FAST)
    r = other.check(1, memorizer(heldout))
    assert not r["flags"]["closer_to_train"] and not r["flags"]["copies"]
    assert r["nn_heldout_l2"] < r["nn_train_l2"]


def test_monitor_warns_about_heldout_images_that_are_training_images(digits, tmp_path):
    train, heldout = digits
    leaky = torch.cat([heldout[:-3], train[:3]])
    with pytest.warns(UserWarning, match="3 of the 72 held-out images are exact copies"):
        biasgen.Monitor(train, leaky, tmp_path / "leak", **FAST)
    assert json.loads((tmp_path / "leak" / "run.json").read_text())["data"]["overlap"] == 3


def test_monitor_bad_input(digits, tmp_path):
    train, heldout = digits
    with pytest.raises(BiasgenError, match="differ in shape"):
        biasgen.Monitor(train, heldout[:, :, :4], tmp_path / "a", **FAST)
    with pytest.raises(BiasgenError, match="at least 2 images"):
        biasgen.Monitor(train[0], heldout, tmp_path / "b", **FAST)
    with pytest.raises(BiasgenError, match="sampler"):
        biasgen.Monitor(train, heldout, tmp_path / "c", **dict(FAST, sampler="euler"))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written
    monitor = biasgen.Monitor(train, heldout, tmp_path / "d", figures=False, **FAST)
    with pytest.raises(BiasgenError, match="diverged"):
        monitor.check(1, lambda x_t, t: torch.full_like(x_t, float("nan")))
    assert monitor.records == []


def test_biasgen_monitor_over_the_checkpoints_of_an_audit_model(tmp_path, capsys):
    """`biasgen monitor` reads biasgen's own checkpoints: the network, schedule and data come from the sidecars,
    and with the audit's sampler the monitor draws exactly the samples the audit drew for that model."""
    from biasgen.checkpoint import load_tensors
    from biasgen.cli import main
    from biasgen.images.audit import audit

    run = tmp_path / "audit"
    summary = audit(run, preset="tiny", progress=False)  # ddim-5, 8 samples, splits of 24, 32 test images
    out = tmp_path / "mon"
    args = ["monitor", "--checkpoints", str(run / "models" / "model1"), "--out", str(out), "--quiet",
            "--sampler", "ddim", "--sample-steps", "5", "--n-samples", "8", "--n-loss", "16"]
    assert main(args) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == summary["checkpoints"]
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["meta"]["audit"]["split"] == 1 and info["config"]["meta"]["audit"]["config"]["n"] == 24
    assert info["data"] == {"overlap": 0, "n_train": 24, "n_heldout": 32}  # its own split; the audit's test set
    for step in summary["checkpoints"]:
        mine = load_tensors(out / "samples" / f"step_{step:07d}")[0]["samples"]
        theirs = load_tensors(run / "samples" / f"step_{step:07d}")[0]["samples"][1]
        assert torch.equal(mine, theirs)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for m, step in ((0, 4), (1, 12)):  # checkpoints of two different models in one folder
        for suffix in (".safetensors", ".json"):
            name = f"step_{step:07d}{suffix}"
            (mixed / name).write_bytes((run / "models" / f"model{m}" / name).read_bytes())
    assert main(["monitor", "--checkpoints", str(mixed), "--out", str(tmp_path / "bad1")]) == 2
    assert "not checkpoints of the same audit model" in capsys.readouterr().err
    assert main(args[:5] + ["--out", str(tmp_path / "bad2"), "--model-config", "x.json"]) == 2
    assert "leave out --model-config" in capsys.readouterr().err
    (mixed / "step_0000004.json").unlink()  # a bare state dict: a UNet2DModel's, which needs the images
    (mixed / "step_0000012.json").unlink()
    assert main(["monitor", "--checkpoints", str(mixed), "--model-config", "x.json", "--out", str(tmp_path / "bad3")]) == 2
    assert not any((tmp_path / f"bad{i}").exists() for i in (1, 2, 3))


def test_monitor_ddpm_sampler_takes_a_step_count(digits, tmp_path):
    train, heldout = digits
    settings = dict(FAST, sampler="ddpm", figures=False)
    few = biasgen.Monitor(train, heldout, tmp_path / "few", **dict(settings, sample_steps=4))
    biasgen.Monitor(train, heldout, tmp_path / "all", **dict(settings, sample_steps=None))
    assert few.cfg.sample_steps == 4 and json.loads((tmp_path / "few" / "run.json").read_text())["config"]["sample_steps"] == 4
    assert json.loads((tmp_path / "all" / "run.json").read_text())["config"]["sample_steps"] == 1000
    calls = []

    def counting(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    few.check(1, counting)
    assert len(set(calls[-4:])) == 4 and len(calls) == 2 + 4  # two loss passes, then 4 sampling steps
    with pytest.raises(BiasgenError, match="Sampling steps must be in"):
        biasgen.Monitor(train, heldout, tmp_path / "bad", **dict(settings, sample_steps=2000))


def test_monitor_settings_are_one_config_and_the_flags_of_biasgen_monitor(digits, tmp_path):
    import argparse
    import dataclasses

    from biasgen.config import build_config, flags_given
    from biasgen.images.monitor import MonitorConfig
    from biasgen.images.monitor_command import CheckpointMonitorConfig, add_arguments

    train, heldout = digits
    model = memorizer(heldout)
    cfg = MonitorConfig(**{k: v for k, v in FAST.items() if k != "verbose"})
    with biasgen.Monitor(train, heldout, tmp_path / "a", cfg, figures=False, verbose=False) as a:
        by_config = a.check(1, model)
    with biasgen.Monitor(train, heldout, tmp_path / "b", figures=False, **FAST) as b:
        by_keywords = b.check(1, model)
    by_config.pop("wall_s"), by_keywords.pop("wall_s")
    assert by_config == by_keywords
    with pytest.raises(BiasgenError, match="Unknown monitor setting.*n_sample"):
        biasgen.Monitor(train, heldout, tmp_path / "c", n_sample=3)
    with pytest.raises(BiasgenError, match="--n-loss must be at least 1"):
        MonitorConfig(n_loss=0)
    assert not (tmp_path / "c").exists()

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(CheckpointMonitorConfig)} <= flags  # every setting is a flag
    toml = tmp_path / "mon.toml"
    toml.write_text("copy_z_threshold = 3.0\nn_samples = 16\n")
    args = parser.parse_args(["--checkpoints", "ck", "--config", str(toml), "--n-samples", "8", "--grayscale"])
    got = build_config(CheckpointMonitorConfig, {}, None, args.config, flags_given(args, CheckpointMonitorConfig))
    assert (got.copy_z_threshold, got.n_samples, got.grayscale, got.sample_steps) == (3.0, 8, True, 50)
