"""biasgen finetune: grouped splits, the shared base (bit-identical start, sha256), LoRA adapters, the leak list."""
import csv
import os

import pytest
import torch

from biasgen.checkpoint import load_tensors
from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.images.audit import audit
from biasgen.images.base_model import FinetuneNet, merged_network, resolve_base
from biasgen.images.finetune import export_merged, finetune
from biasgen.images.groups import group_ids, make_grouped_splits
from biasgen.images.leaks import leak_list, near_copies
from biasgen.twins import build_model

try:
    import peft
except ImportError:  # CI installs biasgen[finetune]: there the LoRA tests must run, not skip
    peft = None
needs_peft = pytest.mark.skipif(peft is None and not os.environ.get("CI"),
                                reason='needs pip install "biasgen[finetune]"')
FAST = dict(preset="tiny", progress=False, threads=1)


# -- grouped splits ---------------------------------------------------------------------------------

def test_grouped_splits_never_straddle_and_record_group_counts():
    group = [f"person{i // 5}" for i in range(200)]  # 40 groups of 5 images
    splits = make_grouped_splits(torch.arange(200.0)[:, None], group, n=48, k=2, n_test=40, seed=3)
    sets = [splits.test_index, *splits.train_index]
    assert [len(s) for s in sets] == [40, 48, 48]
    owners = [{group[i] for i in s.tolist()} for s in sets]
    assert not owners[0] & owners[1] and not owners[0] & owners[2] and not owners[1] & owners[2]
    assert splits.groups["n_groups"] == 40 and splits.groups["per_split"] == [len(owners[1]), len(owners[2])]
    assert torch.equal(splits.train[0][:, 0], splits.train_index[0].float())  # the images follow their indices


def test_grouped_split_errors_name_the_group_or_the_missing_row(tmp_path):
    group = ["big"] * 30 + [str(i) for i in range(70)]
    with pytest.raises(BiasgenError, match="group 'big' holds 30 images"):
        make_grouped_splits(torch.zeros(100, 1), group, n=20, k=2, n_test=20, seed=0)
    table = tmp_path / "groups.csv"
    table.write_text("file,group\na_1.png,a\nb_1.png,b\n")
    assert group_ids(["a_1.png", "b_1.png"], groups_file=table) == ["a", "b"]
    with pytest.raises(BiasgenError, match="c_1.png"):
        group_ids(["a_1.png", "c_1.png"], groups_file=table)
    assert group_ids(["x/anna_01.png", "x/bob_02.png"], regex=r"/(\w+?)_") == ["anna", "bob"]
    with pytest.raises(BiasgenError, match="does not match the image 'z.png'"):
        group_ids(["z.png"], regex=r"_(\d+)")


def test_audit_with_group_regex_keeps_groups_inside_one_split(tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for person in range(30):
        for shot in range(3):
            pixels = (torch.rand(8, 8, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"p{person:02d}_{shot}.png")
    summary = audit(tmp_path / "run", data=str(folder), group_by_regex=r"^(p\d+)_", n=24, n_test=24, **FAST)
    assert summary["data"]["groups"]["n_groups"] == 30


# -- the shared base --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The last checkpoint of a tiny audit on the digits: a biasgen base."""
    run = tmp_path_factory.mktemp("base") / "run"
    audit(run, **FAST)
    return sorted((run / "models" / "model0").glob("step_*.safetensors"))[-1]


@pytest.mark.parametrize("adapter", ["none", pytest.param("lora", marks=needs_peft)])
def test_twins_start_bit_identical_from_the_base(base, adapter):
    spec = resolve_base(base)
    a, b = (build_model(FinetuneNet, dict(base=spec, adapter=adapter), seed) for seed in (1, 2))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    plain = build_model(FinetuneNet, dict(base=spec), 0).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 300, 900])
    assert torch.allclose(a.eval()(x, t), plain(x, t), atol=1e-6)  # LoRA starts as the base's function (B = 0)


def test_a_changed_base_is_refused(base, tmp_path):
    spec = resolve_base(base)
    with pytest.raises(BiasgenError, match="has changed since the run started"):
        FinetuneNet(base=dict(spec, sha256="0" * 64))
    with pytest.raises(BiasgenError, match="the run expects"):
        finetune(tmp_path / "ft", base=str(base), base_sha256="f" * 64, **FAST)
    assert not (tmp_path / "ft").exists()
    with pytest.raises(BiasgenError, match="needs a base: --base PATH .* or --pretrain DATA"):
        finetune(tmp_path / "ft", **FAST)


PRETRAIN = dict(pretrain="digits", pretrain_classes=(0, 1, 2, 3, 4), classes=(5, 6, 7, 8, 9), pretrain_n=60,
                pretrain_steps=8)


def test_pretrain_trains_the_base_in_the_run_folder_once_and_records_it(tmp_path):
    summary = finetune(tmp_path / "ft", **PRETRAIN, **FAST)
    base = summary["data"]["base"]
    assert base["weights"] == str((tmp_path / "ft" / "base" / "step_0000008.safetensors").resolve())
    assert base["pretrained"] == {"data": "digits", "classes": [0, 1, 2, 3, 4], "n": 60, "steps": 8, "seed": 900}
    assert base["sha256"] == resolve_base(base["weights"])["sha256"]
    _, meta = load_tensors(tmp_path / "ft" / "models" / "model1" / "step_0000012")
    assert meta["model"]["base"]["sha256"] == base["sha256"]  # every fine-tune checkpoint points to this base
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "ft" / "base").iterdir()}
    metrics = (tmp_path / "ft" / "metrics.jsonl").read_bytes()
    again = finetune(tmp_path / "ft", resume=True, **PRETRAIN, **FAST)  # reused, not retrained
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ft" / "base").iterdir()} == files
    assert again["data"]["base"] == base and (tmp_path / "ft" / "metrics.jsonl").read_bytes() == metrics
    elsewhere = finetune(tmp_path / "other", **PRETRAIN, **FAST)  # the same settings give the same base
    assert elsewhere["data"]["base"]["sha256"] == base["sha256"]


def test_pretrain_settings_that_cannot_work_are_refused_before_the_run_folder(base, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--preset", "tiny", "--out", str(out), "--base", str(base), "--pretrain", "digits"]) == 2
    assert "--base and --pretrain both give the base" in capsys.readouterr().err
    with pytest.raises(BiasgenError, match="the base would see the private images"):
        finetune(out, **dict(PRETRAIN, pretrain_classes=(4, 5)), **FAST)
    with pytest.raises(BiasgenError, match="fewer than --pretrain-n 5000; lower --pretrain-n to at most"):
        finetune(out, **dict(PRETRAIN, pretrain_n=5000), **FAST)
    assert not out.exists()


@needs_peft
def test_a_lora_target_that_matches_no_layer_is_refused_before_the_run_folder(base, tmp_path):
    with pytest.raises(BiasgenError, match="--lora-targets nope name no layer of the base network"):
        finetune(tmp_path / "ft", base=str(base), adapter="lora", lora_targets=("nope",), **FAST)
    with pytest.raises(BiasgenError, match="--lora-targets nope name no layer"):
        finetune(tmp_path / "ft", adapter="lora", lora_targets=("nope",), **PRETRAIN, **FAST)
    assert not (tmp_path / "ft").exists()


def test_a_base_folder_holding_a_pickle_is_refused_and_never_loaded(tmp_path):
    import pickle

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"sample_size": 8, "in_channels": 1, "out_channels": 1}')
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"weights": [0.0]}))
    with pytest.raises(BiasgenError, match="holds no diffusers UNet2DModel .*diffusion_pytorch_model.safetensors"):
        finetune(tmp_path / "ft", base=str(folder), **FAST)
    assert not (tmp_path / "ft").exists()


def test_a_base_that_never_saw_the_private_images_leaks_none(base, tmp_path):
    import numpy as np

    np.save(tmp_path / "noise.npy", np.random.default_rng(0).random((80, 1, 8, 8), dtype=np.float32))
    summary = finetune(tmp_path / "ft", base=str(base), data=str(tmp_path / "noise.npy"), lr=1e-9, **FAST)
    assert summary["leaks"]["n_images"] == 48 and summary["leaks"]["n_leaked"] == 0


def test_a_base_for_other_images_is_refused_before_the_run_folder(base, tmp_path):
    import numpy as np

    np.save(tmp_path / "rgb.npy", np.random.default_rng(0).random((80, 3, 8, 8), dtype=np.float32))
    with pytest.raises(BiasgenError, match="1-channel images but the data has 3"):
        finetune(tmp_path / "ft", base=str(base), data=str(tmp_path / "rgb.npy"), **FAST)
    assert not (tmp_path / "ft").exists()


@needs_peft
def test_lora_finetune_stores_adapters_only_and_merges(base, tmp_path):
    summary = finetune(tmp_path / "ft", base=str(base), adapter="lora", **FAST)
    tensors, meta = load_tensors(tmp_path / "ft" / "models" / "model0" / "step_0000012")
    assert tensors and all("lora_" in k for k in tensors)
    assert meta["model"]["base"]["sha256"] == resolve_base(base)["sha256"] == summary["data"]["base"]["sha256"]
    assert summary["leaks"]["n_images"] == 2 * 24 and (tmp_path / "ft" / "leaks.csv").is_file()
    assert summary["tau_data"] is None or summary["tau_data"]["step"] in summary["checkpoints"]
    assert main(["export-merged", str(tmp_path / "ft"), "--step", "12", "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged.safetensors"
    with pytest.raises(BiasgenError, match="exists"):
        export_merged(tmp_path / "ft", model=0, step=12, out=tmp_path / "merged")
    net = FinetuneNet(base=meta["model"]["base"], adapter="lora")
    net.load_state_dict(tensors)
    again = build_model(FinetuneNet, dict(base=resolve_base(merged)), 0).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    assert torch.allclose(net.eval()(x, t), again(x, t), atol=1e-5)  # base + adapters == the merged base


def diffusers_lora_run(tmp_path):
    """A tiny LoRA fine-tune of a diffusers UNet2DModel folder, checked and exported; returns its run folder."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                 layers_per_block=1, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                 up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, attention_head_dim=4)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    spec = resolve_base(tmp_path / "unet")
    net = build_model(FinetuneNet, dict(base=spec, adapter="lora", lora_rank=2), 7)
    keys = list(net.state_dict())
    assert keys and all("lora_" in k for k in keys) and any("to_q" in k for k in keys)
    for p in net.parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    out = net.eval()(x, t)
    assert torch.allclose(merged_network(net).eval()(x, t), out, atol=1e-5)
    summary = finetune(tmp_path / "ft", base=str(tmp_path / "unet"), adapter="lora", **FAST)
    assert summary["data"]["base"]["format"] == "diffusers"
    pipeline = export_merged(tmp_path / "ft", model=1, step=12, out=tmp_path / "pipeline")
    assert type(diffusers.DDPMPipeline.from_pretrained(pipeline).unet).__name__ == "UNet2DModel"
    return tmp_path / "ft"


@needs_peft
def test_lora_on_a_diffusers_unet_folder(tmp_path):
    assert (diffusers_lora_run(tmp_path) / "summary.json").is_file()


@needs_peft
def test_a_killed_lora_finetune_of_a_diffusers_base_resumes_to_identical_metrics(tmp_path, monkeypatch, kill_at):
    import biasgen.images.audit as audit_module

    straight = diffusers_lora_run(tmp_path)
    settings = dict(base=str(tmp_path / "unet"), adapter="lora", **FAST)
    real_loss, real_eval, dying = audit_module.EpsMSELoss, audit_module.evaluate_checkpoint, kill_at(18)
    monkeypatch.setattr(audit_module, "EpsMSELoss", lambda schedule: dying(real_loss(schedule)))  # in training
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "killed", **settings)
    monkeypatch.setattr(audit_module, "EpsMSELoss", real_loss)
    monkeypatch.setattr(audit_module, "evaluate_checkpoint", kill_at(2)(real_eval))  # after one checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune(tmp_path / "killed", resume=True, **settings)
    monkeypatch.setattr(audit_module, "evaluate_checkpoint", real_eval)
    finetune(tmp_path / "killed", resume=True, **settings)
    assert (tmp_path / "killed" / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


# -- the leak list ----------------------------------------------------------------------------------

def test_near_copies_and_the_first_leak_step():
    train = [torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    members = [(0, 0), (1, 0)]
    far = torch.randn(2, 3, 1, 4, 4) * 5
    exact = far.clone()
    exact[0, 1] = train[0][3]  # model 0 (split 0) copies image 3 of split 0
    records = [dict(step=10, **near_copies(far, members, train)), dict(step=20, **near_copies(exact, members, train))]
    assert records[1]["near_copies"] == [[0, 1, 3, 0.0]]
    leaks = leak_list(records, members, [[f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]])
    assert leaks[0] == dict(split=0, index=3, name="a3", first_leak_step=20, model=0, sample=1, closest_l2=0.0,
                            closest_step=20)
    assert all(e["first_leak_step"] is None for e in leaks[1:]) and len(leaks) == 10


def test_a_memorizing_finetune_shows_leaks(base, tmp_path):
    summary = finetune(tmp_path / "ft", base=str(base), n=2, steps=300, lr=3e-3, checkpoints=3, first_checkpoint=50,
                       n_samples=16, sample_steps=10, **FAST)
    leaks = summary["leaks"]
    assert leaks["n_leaked"] >= 2 and leaks["first_leak_step"] in summary["checkpoints"]
    with open(tmp_path / "ft" / "leaks.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["first_leak_step"] == str(leaks["first_leak_step"])
    assert (tmp_path / "ft" / "fig_leaks.png").is_file()
    assert "fig_leaks.png" in (tmp_path / "ft" / "report.html").read_text()


@needs_peft
def test_a_resumed_lora_finetune_is_bit_identical(base, tmp_path):
    from biasgen.losses import EpsMSELoss
    from biasgen.schedule import NoiseSchedule
    from biasgen.training import train

    spec, data = resolve_base(base), torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    options = dict(loss_fn=EpsMSELoss(NoiseSchedule.from_name("linear", 1000)), data=data, batch_size=4, lr=1e-3,
                   seed=0, meta={}, progress=False)
    train(FinetuneNet(spec, adapter="lora"), steps=10, checkpoints=[3, 6, 10], out_dir=tmp_path / "straight", **options)
    train(FinetuneNet(spec, adapter="lora"), steps=6, checkpoints=[3, 6], out_dir=tmp_path / "resumed", **options)
    train(FinetuneNet(spec, adapter="lora"), steps=10, checkpoints=[3, 6, 10], out_dir=tmp_path / "resumed", **options)
    straight, _ = load_tensors(tmp_path / "straight" / "step_0000010")
    resumed, _ = load_tensors(tmp_path / "resumed" / "step_0000010")
    assert straight and all(torch.equal(straight[k], resumed[k]) for k in straight)
