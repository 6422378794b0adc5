"""Class-conditional twins and classifier-free guidance: the guided sampler, the class embedding, label dropout,
class-balanced splits, per-w evaluation end to end, and every bad input (docs/guidance.md)."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.guidance import check_scales, guided_eps
from biasgen.images.conditional import PER_SCALE_KEYS, nearest_in_class
from biasgen.images.data import make_class_splits
from biasgen.images.diffusers_model import DiffusersEps
from biasgen.images.loaders import folder_labels
from biasgen.images.report_view import VIEW, guidance_section
from biasgen.images.unet import UNet
from biasgen.losses import EpsMSEConditionalLoss, EpsMSELoss, Labelled
from biasgen.report.kinds import read_run
from biasgen.runs import read_jsonl
from biasgen.sampler import sample, x0_from_eps_model
from biasgen.schedule import NoiseSchedule
from biasgen.checkpoint import load_tensors

SCHEDULE = NoiseSchedule.linear(T=50)
SEEDS = [3, 14, 15, 92, 65]
LABELS = torch.tensor([0, 1, 2, 0, 1])


def tiny_net(seed=0, **changes):
    torch.manual_seed(seed)
    return UNet(**{**dict(channels=1, base_width=8, channel_mults=(1, 2), attention_levels=(), res_blocks=1,
                          dropout=0.0, num_classes=3), **changes}).eval()


def draw(eps_model, labels=LABELS, method="ddpm"):
    """Samples ``(5, 1, 8, 8)`` of ``eps_model`` from fixed per-sample noise streams."""
    with torch.no_grad():
        return sample(x0_from_eps_model(eps_model, SCHEDULE, clip=1.0), SCHEDULE, (1, 8, 8), SEEDS, method=method,
                      steps=10, batch_size=2, labels=labels)


# -- the guided sampler ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_w0_is_the_unconditional_sampler_and_w1_the_conditional_one_bit_for_bit(method):
    net = tiny_net()
    unconditional = draw(lambda x, t: net(x, t), labels=None, method=method)  # y None: the null label
    conditional = draw(net, method=method)
    assert torch.equal(draw(guided_eps(net, 0.0, null_label=3), method=method), unconditional)
    assert torch.equal(draw(guided_eps(net, 1.0, null_label=3), method=method), conditional)
    assert not torch.equal(unconditional, conditional)  # the labels matter to this network
    guided = draw(guided_eps(net, 3.0, null_label=3), method=method)
    assert not torch.equal(guided, conditional) and not torch.equal(guided, unconditional)


def test_equal_conditional_and_unconditional_predictions_give_the_same_samples_at_every_w():
    net = tiny_net()
    torch.nn.init.zeros_(net.class_emb.weight)  # every label, the null one included, embeds to the same vector
    reference = draw(guided_eps(net, 0.0, null_label=3))
    for w in (0.5, 1.0, 2.0, 3.0, 7.5):
        assert torch.equal(draw(guided_eps(net, w, null_label=3)), reference), w


def test_guided_prediction_and_the_delayed_start():
    def model(x, t, y):  # eps_c = (y + 1) x, eps_u = (null + 1) x = 5 x
        return x * (y.float() + 1).view(-1, 1, 1, 1)

    x, y = torch.ones(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([5, 10, 20, 40])
    eps_c, eps_u = model(x, t, y), model(x, t, torch.full_like(y, 4))
    assert torch.equal(guided_eps(model, 3.0, null_label=4)(x, t, y), eps_u + 3.0 * (eps_c - eps_u))
    delayed = guided_eps(model, 3.0, null_label=4, start=10)(x, t, y)  # guided at t <= 10, conditional above
    assert torch.equal(delayed[:2], (eps_u + 3.0 * (eps_c - eps_u))[:2])
    assert torch.equal(delayed[2:], eps_c[2:])


@pytest.mark.parametrize("bad", [-1.0, -0.01, float("inf"), float("nan")])
def test_a_negative_or_non_finite_scale_is_refused(bad):
    with pytest.raises(BiasgenError, match=">= 0"):
        check_scales([0.0, bad])
    with pytest.raises(BiasgenError, match=">= 0"):
        guided_eps(tiny_net(), bad, null_label=3)


def test_sampler_wants_one_label_per_sample():
    with pytest.raises(BiasgenError, match="One label per sample"):
        draw(tiny_net(), labels=LABELS[:3])


# -- the networks ------------------------------------------------------------------------------

def test_unet_class_embedding():
    plain, cond = tiny_net(num_classes=0), tiny_net()
    assert plain.class_emb is None and "num_classes" not in plain.config
    shared = {k: v for k, v in cond.state_dict().items() if not k.startswith("class_emb")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())  # the same initial weights
    assert cond.class_emb.num_embeddings == 4 and UNet.from_config(cond.config).config == cond.config
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 10, 40])
    with torch.no_grad():
        assert torch.equal(cond(x, t), cond(x, t, torch.full((3,), 3)))  # no label = the null label
    with pytest.raises(BiasgenError, match="unconditional"):
        plain(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(BiasgenError, match="num_classes"):
        tiny_net(num_classes=-1)


def test_unet2dmodel_class_embedding():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                 layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D"],
                                 up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4, num_class_embeds=4)
    net = DiffusersEps(unet=unet).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 30])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.full((2,), 3)))  # the last class is "no label"
        assert not torch.equal(net(x, t), net(x, t, torch.tensor([0, 1])))
    torch.manual_seed(0)
    plain = DiffusersEps(unet=diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                                    block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                                    down_block_types=["DownBlock2D", "DownBlock2D"],
                                                    up_block_types=["UpBlock2D", "UpBlock2D"]))
    with pytest.raises(BiasgenError, match="no class embedding"):
        plain(x, t, torch.tensor([0, 1]))


def test_label_dropout_in_the_loss():
    net = tiny_net()
    batch = Labelled(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss = EpsMSEConditionalLoss(SCHEDULE, label_dropout=1.0, null_label=3)
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(pickle.loads(pickle.dumps(loss))(net, batch, g()), loss(net, batch, g()))  # sent to workers
    # every label dropped: the unconditional loss on the same (t, eps) draws
    assert torch.equal(loss(net, batch, g()), EpsMSELoss(SCHEDULE)(lambda x, t: net(x, t), batch.x, g()))
    kept = EpsMSEConditionalLoss(SCHEDULE, label_dropout=0.0, null_label=3)
    assert torch.equal(kept(net, batch, g()), EpsMSELoss(SCHEDULE)(lambda x, t: net(x, t, batch.y), batch.x, g()))


# -- the data ----------------------------------------------------------------------------------

def test_class_balanced_splits_never_leak_labels():
    labels = torch.arange(300) % 3
    labels[:30] = 0  # unequal classes: 120 / 90 / 90
    images = torch.arange(300, dtype=torch.float32).view(300, 1, 1, 1)  # each image is its own index
    splits = make_class_splits(images, labels, n=30, k=3, n_test=60, seed=7)
    sets = [set(i.tolist()) for i in splits.train_index] + [set(splits.test_index.tolist())]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 3 * 30 + 60  # disjoint
    for index, x, y in zip(splits.train_index, splits.train, splits.train_labels):
        assert torch.equal(x.view(-1).long(), index) and torch.equal(y, labels[index])  # labels travel with images
        assert torch.bincount(y).tolist() == [12, 9, 9]  # the pool's class shares
    assert torch.equal(splits.test_labels, labels[splits.test_index])
    assert torch.bincount(splits.test_labels[:30]).tolist() == [12, 9, 9]  # the first n test images: like a split


def test_a_class_too_rare_for_every_split_is_refused():
    labels = torch.cat([torch.zeros(100), torch.ones(100), torch.full((3,), 2)]).long()
    with pytest.raises(BiasgenError, match="class 2 would have 0 image"):
        make_class_splits(torch.zeros(203, 1, 2, 2), labels, n=20, k=2, n_test=20, seed=0)
    labels = torch.cat([torch.zeros(100), torch.ones(100), torch.full((30,), 2)]).long()
    with pytest.raises(BiasgenError, match="class 2 would have 1 image.* in the test set of 10; .* --n-test"):
        make_class_splits(torch.zeros(230, 1, 2, 2), labels, n=40, k=2, n_test=10, seed=0)


def test_nearest_neighbours_within_the_own_class():
    reference = Labelled(torch.tensor([0.0, 1.0, 10.0, 11.0]).view(4, 1, 1, 1), torch.tensor([0, 0, 1, 1]))
    samples = Labelled(torch.tensor([10.4, 10.4, 0.2]).view(3, 1, 1, 1), torch.tensor([0, 1, 0]))
    found = nearest_in_class(samples, reference)
    assert found["index"].tolist() == [1, 2, 0]  # sample 0 is near image 2, but image 2 is of another class
    assert found["l2"].tolist() == pytest.approx([9.4, 0.4, 0.2])


def test_folder_labels_from_sub_folders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name / f"{i}.png")
    assert folder_labels(tmp_path, None).tolist() == [0, 0, 1, 1]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "loose.png")
    assert folder_labels(tmp_path, None) is None


# -- bad inputs on the command line: one clear line, nothing written -----------------------------

TINY = ["audit", "--preset", "tiny", "--quiet"]


@pytest.fixture(scope="module")
def rare_class_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rare.npz"
    labels = np.r_[np.zeros(100), np.ones(100), [2, 2]].astype(np.int64)
    np.savez(path, images=np.random.default_rng(0).random((202, 8, 8)).astype(np.float32), labels=labels)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--guidance", "0,1,3"], "--guidance needs class-conditional twins"),
    (["--use-guidance", "1"], "--use-guidance needs class-conditional twins"),
    (["--conditional", "--guidance=-1,1"], "must be finite and >= 0"),
    (["--conditional", "--guidance", "0,1,1"], "lists a scale twice"),
    (["--conditional", "--guidance", "0,1", "--use-guidance", "3"], "not among the evaluated scales"),
    (["--conditional", "--label-dropout", "1"], "--label-dropout must be in [0, 1)"),
    (["--conditional", "--guidance", "0,1", "--label-dropout", "0"], "never trains the unconditional"),
    (["--conditional", "--guidance-start", "5000"], "--guidance-start must be a diffusion step"),
    (["--conditional", "--data", "RARE"], "class 2 would have"),
])
def test_bad_guidance_settings(extra, message, rare_class_npz, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(TINY + ["--out", str(out)] + [str(rare_class_npz) if e == "RARE" else e for e in extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()


def test_conditional_on_data_without_labels(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(80):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / f"{i:03d}.png")
    code = main(TINY + ["--out", str(tmp_path / "out"), "--data", str(folder), "--conditional"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a class label per image" in err and "sub-folder per class" in err, err
    assert not (tmp_path / "out").exists()


# -- end to end: a memorizing conditional model, evaluated at w = 0, 1, 3 --------------------------

@pytest.fixture(scope="module")
def memorizing_run(tmp_path_factory):
    """Three digit classes, 2 images per class per split, trained long enough to copy them (~30 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("guided")
    digits = load_digits()
    keep = digits.target < 3
    np.savez(folder / "digits3.npz", images=(digits.images[keep] / 16).astype(np.float32), labels=digits.target[keep])
    out = folder / "run"
    assert main(TINY + ["--out", str(out), "--data", str(folder / "digits3.npz"), "--conditional",
                        "--guidance", "0,1,3", "--use-guidance", "1", "--n", "6", "--batch-size", "6",
                        "--base-width", "16", "--dropout", "0", "--lr", "5e-3", "--steps", "1500",
                        "--checkpoints", "2", "--first-checkpoint", "375", "--n-samples", "40",
                        "--sample-steps", "20", "--threads", "1"]) == 0
    return out


def test_conditional_audit_writes_per_w_results(memorizing_run):
    summary = json.loads((memorizing_run / "summary.json").read_text())
    records = read_jsonl(memorizing_run / "metrics.jsonl")
    guidance = summary["guidance"]
    assert guidance["scales"] == [0.0, 1.0, 3.0] and guidance["use_guidance"] == 1.0
    assert set(guidance["per_scale"]) == {"0", "1", "3"}
    for judged in guidance["per_scale"].values():
        assert judged["verdict"] and judged["recommended_step"] in summary["checkpoints"]
        assert {"tau_bias", "tau_loss", "tau_data", "tau_mem"} <= set(judged)
    assert guidance["recommended_step"] == guidance["per_scale"]["1"]["recommended_step"]
    assert summary["data"]["class_counts_per_split"] == [2, 2, 2]
    for r in records:
        assert set(r["guidance"]) == {"0", "1", "3"}
        keys = [k for k in PER_SCALE_KEYS if not k.startswith("same_split")]  # 1 seed per split: no controls
        assert all(set(keys) <= set(m) for m in r["guidance"].values())
        assert all(r[key] == r["guidance"]["1"][key] for key in keys)  # the top level: --use-guidance
    kept, _ = load_tensors(memorizing_run / "samples" / f"step_{summary['checkpoints'][-1]:07d}")
    assert kept["samples"].shape == kept["samples_w0"].shape == kept["samples_w3"].shape == (2, 40, 1, 8, 8)
    assert kept["labels"].tolist() == [j % 3 for j in range(40)]  # the same labels for both twins
    for name in ("fig_guidance_curves.png", "fig_guidance_taus.png"):
        assert (memorizing_run / name).stat().st_size > 0
        assert name in (memorizing_run / "report.html").read_text()


def test_report_shows_one_verdict_row_per_scale(memorizing_run):
    summary = json.loads((memorizing_run / "summary.json").read_text())
    html = (memorizing_run / "report.html").read_text()
    section = html[html.index("Verdict per guidance scale"):html.index("<h2>Figures</h2>")]
    assert html.index("<h2>Verdict</h2>") < html.index("Verdict per guidance scale")
    last = read_jsonl(memorizing_run / "metrics.jsonl")[-1]["guidance"]
    for w, judged in summary["guidance"]["per_scale"].items():
        row = section[section.index(f'<th scope="row">{w}'):]
        row = row[:row.index("</tr>")]
        assert judged["verdict"] in row and f"<td>{judged['recommended_step']}" in row
        assert f"{last[w]['f_mem']:.3f}" in row
        assert ("(--use-guidance)" in row) == (w == "1")
    unconditional = read_run(memorizing_run)
    unconditional.summary = {k: v for k, v in unconditional.summary.items() if k != "guidance"}
    assert guidance_section(unconditional, VIEW) == ""


def test_judge_write_restores_the_per_scale_verdicts(memorizing_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(memorizing_run, run)
    written = json.loads((run / "summary.json").read_text())
    tampered = {**written, "guidance": {**written["guidance"], "per_scale": {"0": {"verdict": "no-bias-detected"}}}}
    (run / "summary.json").write_text(json.dumps(tampered))
    assert main(["judge", str(run)]) == 0  # without --write nothing changes
    assert json.loads((run / "summary.json").read_text()) == tampered
    assert main(["judge", str(run), "--write"]) == 0
    assert json.loads((run / "summary.json").read_text())["guidance"] == written["guidance"]
    assert "no-bias-detected" not in (run / "report.html").read_text().split("Verdict per guidance scale")[1][:3000] \
        or written["guidance"]["per_scale"]["0"]["verdict"] == "no-bias-detected"


def test_memorizing_model_copies_more_with_guidance(memorizing_run):
    last = read_jsonl(memorizing_run / "metrics.jsonl")[-1]["guidance"]
    f_mem = {w: last[w]["f_mem"] for w in ("0", "1", "3")}
    ci = {w: last[w]["f_mem_ci"] for w in ("0", "1", "3")}
    # unguided samples copy an image of their own class only by chance; conditional and guided ones do so often
    assert ci["0"][1] < ci["1"][0] and ci["0"][1] < ci["3"][0], (f_mem, ci)
    assert f_mem["3"] >= f_mem["1"] - 1 / 80, f_mem  # 80 samples per scale: no drop beyond one copy from 1 to 3


def test_sweep_takes_the_conditional_settings_and_draws_a_phase_diagram_per_w(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "--preset", "tiny", "--conditional", "--guidance", "0,3", "--sizes", "20,30",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert set(result["guidance"]) == {"0", "3"}
    for w in ("0", "3"):
        assert [r["n"] for r in result["guidance"][w]["rows"]] == [20, 30]
        assert {"tau_bias", "tau_mem", "verdict"} <= set(result["guidance"][w]["rows"][0])
        assert (out / f"fig_phase_diagram_w{w}.png").stat().st_size > 0
    size = json.loads((out / "n000020" / "summary.json").read_text())
    assert result["rows"][0]["tau_bias"]["value"] == result["guidance"]["3"]["rows"][0]["tau_bias"]["value"]
    assert size["guidance"]["use_guidance"] == 3.0


def test_a_loss_interval_that_starts_too_early_to_test_is_said_in_words():
    """The rise is there at the loss minimum but its interval's early end has too few checkpoints before it (the
    guidance preset at w = 3): the reason says so instead of failing."""
    from biasgen.verdict_text import reason_for

    end = {"drift": {"value": 0.05, "ci95": [0.01, 0.09], "end_steps": [985, 3000], "floor_steps": [20, 61]},
           "until_step": 3000, "noise_sd": 0.01, "p_value": 0.01, "persist": 3}
    tests = {"at": None, "end": end, "p_value": 1.0, "p_value_at_tau_loss": 0.02, "tested_until": 185}
    tau_loss = {"step": 565, "ci95": [185, 565]}
    reason = reason_for("loss-unresolved", tests, tau_loss, False, 0.05, None)
    assert "step 185 is too early to test" in reason and "p = 0.020 at step 565" in reason
