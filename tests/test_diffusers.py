"""diffusers networks: configs, schedules, export to DDPMPipeline, the monitor and `biasgen monitor` on their checkpoints."""
import json
import sys

import numpy as np
import pytest
import torch

from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.images import diffusers_model as dm
from biasgen.images.data import load_images, scale_images
from biasgen.losses import EpsMSELoss
from biasgen.runs import read_jsonl
from biasgen.schedule import NoiseSchedule
from biasgen.training import train

diffusers = pytest.importorskip("diffusers", reason='the diffusers extra: pip install -e ".[diffusers]"')

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
            down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
            norm_num_groups=4, attention_head_dim=4)
FAST = ["--n-samples", "6", "--sample-steps", "4", "--n-loss", "32", "--quiet"]


@pytest.fixture(scope="module")
def digits():
    return scale_images(load_images("digits").images)[0]  # (1797, 1, 8, 8) in [-1, 1]


@pytest.fixture(scope="module")
def data_files(digits, tmp_path_factory):
    """Training and held-out images as .npy files in [0, 1], as a user would pass them."""
    folder = tmp_path_factory.mktemp("data")
    np.save(folder / "train.npy", ((digits[:40] + 1) / 2).numpy())
    np.save(folder / "heldout.npy", ((digits[40:80] + 1) / 2).numpy())
    return folder / "train.npy", folder / "heldout.npy"


def tiny_unet(seed=0, **changes):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**TINY, **changes})


def test_without_diffusers_the_message_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(BiasgenError, match=r'pip install "biasgen\[diffusers\]"'):
        dm.load_unet_config(TINY)


def test_unet_config_as_diffusers_writes_it(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    config = dm.load_unet_config(tmp_path / "unet")  # the folder, or its config.json
    assert config == dm.load_unet_config(tmp_path / "unet" / "config.json")
    assert config["block_out_channels"] == [8, 16] and not any(k.startswith("_") for k in config)
    # an EMA model's config.json carries extra keys: dropped
    ema = json.loads((tmp_path / "unet" / "config.json").read_text()) | {"decay": 0.9999, "optimization_step": 10}
    assert dm.load_unet_config(ema) == config
    rebuilt = dm.build_unet(config)
    assert [v.shape for v in rebuilt.state_dict().values()] == [v.shape for v in unet.state_dict().values()]


def test_bad_unet_configs():
    with pytest.raises(BiasgenError, match="UNet2DConditionModel, not a UNet2DModel"):
        dm.load_unet_config({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768})
    with pytest.raises(BiasgenError, match="DDPMScheduler, not a UNet2DModel"):
        dm.load_unet_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})
    with pytest.raises(BiasgenError, match=r"does not take: \['beta_start'\]"):
        dm.load_unet_config({"sample_size": 8, "beta_start": 1e-4})
    with pytest.raises(BiasgenError, match="class-conditional"):
        dm.load_unet_config(dict(TINY, class_embed_type=None, num_class_embeds=10))
    with pytest.raises(BiasgenError, match="cannot build"):
        dm.build_unet(dict(TINY, norm_num_groups=3))
    with pytest.raises(BiasgenError, match=r"in_channels=1 .* images have 3 channel"):
        dm.check_unet_fits(TINY, (3, 8, 8))
    with pytest.raises(BiasgenError, match=r"sample_size=8 but the images are 16x16.*--resolution 8"):
        dm.check_unet_fits(TINY, (1, 16, 16))
    dm.check_unet_fits(TINY, (1, 8, 8))


def test_adapter_shifts_biasgen_steps_to_diffusers_timesteps():
    unet = tiny_unet().eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 1000])
    with torch.no_grad():
        assert torch.equal(dm.DiffusersEps(unet=unet)(x, t), unet(x, t - 1).sample)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_scheduler_configs_read_into_the_same_alpha_bar(kind):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=kind, beta_end=0.02)
    schedule = dm.schedule_from_scheduler_config(dict(scheduler.config))
    assert schedule.T == 200
    # biasgen's alpha_bar[t] is diffusers' alphas_cumprod[t - 1]
    torch.testing.assert_close(schedule.alpha_bar[1:], scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


def test_scheduler_configs_biasgen_cannot_use():
    with pytest.raises(BiasgenError, match="sigmoid.*not supported"):
        dm.schedule_from_scheduler_config({"beta_schedule": "sigmoid"})
    with pytest.raises(BiasgenError, match="v_prediction"):
        dm.schedule_from_scheduler_config({"prediction_type": "v_prediction"})


@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(), NoiseSchedule.cosine(300), NoiseSchedule.onehot(250)])
def test_biasgen_schedules_write_as_ddpm_scheduler_configs(schedule):
    scheduler = diffusers.DDPMScheduler(**dm.scheduler_config(schedule))
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), schedule.alpha_bar[1:], rtol=1e-5, atol=1e-6)
    assert dm.schedule_from_scheduler_config(dict(scheduler.config)).T == schedule.T


def test_trained_checkpoint_exports_to_a_ddpm_pipeline(digits, tmp_path):
    schedule = NoiseSchedule.linear()
    torch.manual_seed(0)
    net = dm.DiffusersEps(dm.load_unet_config(TINY))
    train(net, EpsMSELoss(schedule), digits[:32], steps=4, batch_size=8, lr=1e-3, checkpoints=[4], seed=0,
          out_dir=tmp_path / "models", meta={"model": {"config": TINY}}, progress=False)
    out = dm.export_pipeline(tmp_path / "models" / "step_0000004", tmp_path / "exported", schedule)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "scheduler", "unet"]
    with pytest.raises(BiasgenError, match="not empty"):
        dm.export_pipeline(net, out, schedule)

    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    # the exported network is the trained one, and the scheduler biasgen's schedule
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t - 1).sample, net.eval()(x, t))
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), schedule.alpha_bar[1:], rtol=1e-5, atol=1e-6)
    image = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 1) and np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1


def test_monitor_takes_a_unet2dmodel_directly(digits, tmp_path):
    import biasgen

    unet = tiny_unet()
    unet.train()
    monitor = biasgen.Monitor(digits[:32], digits[32:64], tmp_path / "mon", n_samples=6, sample_steps=4,
                              figures=False, verbose=False)
    direct = monitor.check(1, unet)
    assert unet.training  # mode restored
    unet.eval()
    wrapped = biasgen.Monitor(digits[:32], digits[32:64], tmp_path / "mon2", n_samples=6, sample_steps=4,
                              figures=False, verbose=False).check(1, dm.DiffusersEps(unet=unet))
    assert not unet.training  # every submodule keeps its own mode
    assert direct["val_loss"] == wrapped["val_loss"] and direct["copy_z"] == wrapped["copy_z"]


def save_run(folder, steps, **changes):
    """diffusers-style checkpoint-<step>/unet folders of one (untrained, seed-varied) tiny UNet."""
    for step in steps:
        tiny_unet(seed=step, **changes).save_pretrained(folder / f"checkpoint-{step}" / "unet")


def test_biasgen_monitor_over_checkpoint_folders(data_files, tmp_path):
    train_file, heldout_file = data_files
    ckpts, out = tmp_path / "ddpm-run", tmp_path / "mon"
    save_run(ckpts, [20, 5, 10])
    (ckpts / "logs").mkdir()  # no step number: ignored
    args = ["monitor", "--checkpoints", str(ckpts), "--train", str(train_file), "--heldout", str(heldout_file),
            "--out", str(out)] + FAST
    assert main(args) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 20]  # step order, not name order
    assert (out / "fig_monitor.png").exists() and (out / "fig_monitor_gallery.png").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "monitor" and run["config"]["meta"]["model_config"]["block_out_channels"] == [8, 16]

    save_run(ckpts, [40])  # training went on: the next call measures only the new checkpoint
    assert main(args) == 0
    again = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in again] == [5, 10, 20, 40] and again[:3] == records


def test_biasgen_monitor_over_safetensors_files(data_files, tmp_path, capsys):
    from safetensors.torch import save_file

    train_file, heldout_file = data_files
    ckpts = tmp_path / "files"
    ckpts.mkdir()
    for step in (3, 30):
        save_file(tiny_unet(seed=step).state_dict(), str(ckpts / f"step_{step:07d}.safetensors"))
    args = ["monitor", "--checkpoints", str(ckpts), "--train", str(train_file), "--heldout", str(heldout_file)] + FAST
    assert main(args + ["--out", str(tmp_path / "a")]) == 2  # bare files need the config
    assert "--model-config" in capsys.readouterr().err
    (tmp_path / "unet.json").write_text(json.dumps(TINY))
    assert main(args + ["--out", str(tmp_path / "b"), "--model-config", str(tmp_path / "unet.json")]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [3, 30]


def test_biasgen_monitor_bad_input_writes_nothing(data_files, tmp_path, capsys):
    train_file, heldout_file = data_files
    base = ["monitor", "--train", str(train_file), "--heldout", str(heldout_file)] + FAST

    mixed = tmp_path / "mixed"
    save_run(mixed, [1, 2])
    save_run(mixed, [3], block_out_channels=[8, 8])
    assert main(base + ["--checkpoints", str(mixed), "--out", str(tmp_path / "out1")]) == 2
    err = capsys.readouterr().err
    assert "not all of the architecture" in err and "checkpoint-3" in err and "block_out_channels" in err

    rgb = tmp_path / "rgb.json"
    rgb.write_text(json.dumps(dict(TINY, in_channels=3, out_channels=3)))
    assert main(base + ["--checkpoints", str(mixed), "--model-config", str(rgb), "--out", str(tmp_path / "out2")]) == 2
    assert "channel" in capsys.readouterr().err

    scheduler = tmp_path / "scheduler.json"
    scheduler.write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}))
    good = tmp_path / "good"
    save_run(good, [1])
    assert main(base + ["--checkpoints", str(good), "--scheduler-config", str(scheduler),
                        "--out", str(tmp_path / "out3")]) == 2
    assert "sigmoid" in capsys.readouterr().err
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))


# -- `biasgen audit --model diffusers`: a UNet2DModel under the twin protocol ---------------------

AUDIT = ["audit", "--preset", "tiny", "--quiet", "--model", "diffusers"]


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory):
    """A tiny UNet2DModel config and a (scaled-linear) scheduler config, as diffusers writes them."""
    folder = tmp_path_factory.mktemp("configs")
    tiny_unet().save_config(folder / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear").save_config(folder / "scheduler")
    return ["--model-config", str(folder / "unet" / "config.json"),
            "--scheduler-config", str(folder / "scheduler" / "scheduler_config.json")]


@pytest.fixture(scope="module")
def diffusers_audit(audit_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ddpm"
    assert main(AUDIT + audit_files + ["--out", str(out)]) == 0
    return out


def test_audit_trains_a_unet2dmodel_under_the_twin_protocol(diffusers_audit):
    from biasgen.checkpoint import load_tensors

    summary = json.loads((diffusers_audit / "summary.json").read_text())
    records = read_jsonl(diffusers_audit / "metrics.jsonl")
    assert [r["step"] for r in records] == summary["checkpoints"] == [4, 7, 12]
    assert summary["config"]["model"] == "diffusers" and summary["seeds"]["model_init"] == [1, 2]
    for key in ("test_loss", "twin_distance", "nn_own_l2", "f_mem", "copy_z", "score_sim"):
        assert records[-1][key] is not None, key
    w0, meta = load_tensors(diffusers_audit / "models" / "model0" / "step_0000004")
    w1, _ = load_tensors(diffusers_audit / "models" / "model1" / "step_0000004")
    assert dm.architecture(meta["model"]["config"]) == dm.architecture(TINY)  # the sidecar rebuilds the network
    assert set(w0) == {f"unet.{k}" for k in tiny_unet().state_dict()}
    assert not torch.equal(w0["unet.conv_in.weight"], w1["unet.conv_in.weight"])  # twins start apart


def test_audit_checkpoint_exports_to_a_ddpm_pipeline(diffusers_audit, tmp_path):
    from biasgen.images.audit import export_checkpoint
    from biasgen.training import checkpoint_stem
    from biasgen.twins import load_model

    out = export_checkpoint(diffusers_audit, model=1, step=12, out=tmp_path / "twin1")
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    config = json.loads((diffusers_audit / "run.json").read_text())["config"]
    schedule = dm.schedule_from_scheduler_config(config["scheduler_config"])  # the run's scaled-linear schedule
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), schedule.alpha_bar[1:], rtol=1e-5, atol=1e-6)
    net = load_model(dm.DiffusersEps, {"config": dm.load_unet_config(TINY)},
                     checkpoint_stem(diffusers_audit / "models" / "model1", 12), "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t - 1).sample, net(x, t))
    image = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 8, 8, 1) and np.isfinite(image).all()


def test_diffusers_audit_resumes_to_the_same_metrics(diffusers_audit, audit_files, tmp_path, monkeypatch, kill_at):
    import biasgen.images.audit as audit_module

    out = tmp_path / "killed"
    real_loss, dying = audit_module.EpsMSELoss, kill_at(18)  # killed during the second model's training
    monkeypatch.setattr(audit_module, "EpsMSELoss", lambda schedule: dying(real_loss(schedule)))
    assert main(AUDIT + audit_files + ["--out", str(out)]) == 130
    monkeypatch.setattr(audit_module, "EpsMSELoss", real_loss)
    assert main(AUDIT + audit_files + ["--out", str(out), "--resume"]) == 0
    resumed, straight = read_jsonl(out / "metrics.jsonl"), read_jsonl(diffusers_audit / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        for key in ("test_loss", "train_loss", "twin_distance", "nn_own_l2", "copy_z"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_diffusers_audit_bad_input(audit_files, tmp_path, capsys):
    from biasgen.images.audit import export_checkpoint
    from biasgen.runs import write_json

    def run(*extra):
        code = main(AUDIT + list(extra) + ["--out", str(tmp_path / "out")])
        return code, capsys.readouterr().err

    code, err = run()
    assert code == 2 and "--model-config" in err
    scheduler_as_model = audit_files[3]
    code, err = run("--model-config", scheduler_as_model)
    assert code == 2 and "not a UNet2DModel" in err
    rgb = tmp_path / "rgb.json"
    rgb.write_text(json.dumps(dict(TINY, in_channels=3, out_channels=3)))
    code, err = run("--model-config", str(rgb))
    assert code == 2 and "images have 1 channel" in err
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 500}))
    code, err = run(audit_files[0], audit_files[1], "--scheduler-config", str(short))
    assert code == 2 and "--T 500" in err
    assert not (tmp_path / "out").exists()  # nothing written

    write_json(tmp_path / "unet-run" / "run.json", {"kind": "audit", "config": {"model": "unet"}})
    with pytest.raises(BiasgenError, match="only runs with --model diffusers"):
        export_checkpoint(tmp_path / "unet-run", model=0, step=12, out=tmp_path / "x")
