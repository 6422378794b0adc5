"""End to end: `biasgen audit` on the tiny preset, resume after a kill, and every bad input."""
import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import biasgen.images.audit as audit_module
from biasgen.images.audit import audit
from biasgen.cli import main
from biasgen.runs import read_jsonl
from biasgen.records import IMAGE_KEYS

TINY = ["audit", "--preset", "tiny", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(TINY + ["--out", str(out), "--workers", "2"]) == 0  # the process-pool path
    return out


def test_tiny_audit_writes_every_output(tiny_run, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    records = read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in records] == summary["checkpoints"] == [4, 7, 12]
    assert summary["verdict"] in ("biased-generalization-detected", "no-bias-detected", "inconclusive")
    assert summary["reason"]
    assert summary["recommended_step"] in summary["checkpoints"]
    for tau in ("tau_bias", "tau_loss"):
        assert summary[tau]["step"] in summary["checkpoints"] and len(summary[tau]["ci"]) == 2
    assert summary["data"]["name"] == "digits" and "duplicates" in summary["data"]
    assert summary["config"]["n"] == 24 and summary["seeds"]["model_init"] == [1, 2]
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["sampler"] == {"method": "ddim", "steps": 5, "spacing": "uniform", "hold_above": 0, "hold_every": 1,
                                  "calls": 5, "eta": 0.0, "name": "ddim-5", "validated": False}
    assert "Note: sampled with ddim-5, which was not validated" in summary["reason"]
    for r in records:
        assert set(r) <= IMAGE_KEYS, set(r) - IMAGE_KEYS  # every key documented in biasgen.records
    r = records[-1]
    for key in ("test_loss", "train_loss", "twin_distance", "twin_distance_sem", "nn_own_sim", "nn_other_sim",
                "nn_test_sim", "nn_own_l2", "f_mem", "f_mem_ci", "copy_z", "score_sim"):
        assert r[key] is not None, key
    assert 0 <= r["twin_distance"] <= 2 and 0 <= r["f_mem"] <= 1
    assert set(r["score_sim"]["50"]) == {"train", "train_sem", "test", "test_sem"}
    by_t = r["test_loss_by_t"]
    assert len(by_t["mean"]) == 10 and sum(by_t["count"]) == summary["config"]["n_test"]
    for fig in ("fig_loss_twin.png", "fig_score_similarity.png", "fig_memorization.png", "fig_gallery.png"):
        assert Image.open(tiny_run / fig).size[0] > 100
    sidecar = json.loads((tiny_run / "models" / "model0" / "step_0000012.json").read_text())
    assert sidecar["step"] == 12 and sidecar["model"]["base_width"] == 8 and sidecar["split"] == 0
    assert (tiny_run / "samples" / "step_0000012.safetensors").exists()


def test_held_predictions_reach_the_sampler_and_change_only_the_samples(tiny_run, tmp_path):
    held = tmp_path / "held"  # the network called on visited steps 0, 2 and 4 of 5 (docs/samplers.md)
    assert main(TINY + ["--out", str(held), "--hold-above", "0", "--hold-every", "2"]) == 0
    summary = json.loads((held / "summary.json").read_text())
    assert (summary["sampler"]["calls"], summary["sampler"]["name"]) == (3, "ddim-5-hold0x2")
    assert "Note: sampled with ddim-5-hold0x2, which was not validated" in summary["reason"]
    for a, b in zip(read_jsonl(held / "metrics.jsonl"), read_jsonl(tiny_run / "metrics.jsonl")):
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)  # the same training
        assert a["twin_distance_samples"] != b["twin_distance_samples"]  # other samples


def test_a_run_of_an_older_biasgen_resumes(tiny_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    for later in ("sample_spacing", "hold_above", "hold_every"):  # settings added later; the run used their defaults
        del info["config"][later]
    (run / "run.json").write_text(json.dumps(info))
    before = (run / "metrics.jsonl").read_bytes()
    assert main(TINY + ["--out", str(run), "--resume"]) == 0
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_preset_changed_since_the_run_says_how_to_resume_it(tiny_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    for later in ("hold_above", "hold_every"):  # made before these settings; the preset now sets them
        del info["config"][later]
    (run / "run.json").write_text(json.dumps(info))
    monkeypatch.setitem(audit_module.PRESETS, "tiny", {**audit_module.PRESETS["tiny"], "hold_every": 2})
    before = (run / "metrics.jsonl").read_bytes()
    assert main(TINY + ["--out", str(run), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "hold_every (the run: 1; now: 2)" in err and "pass its settings: --resume --hold-every 1" in err, err
    assert main(TINY + ["--out", str(run), "--resume", "--hold-every", "1"]) == 0
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """The tiny audit in-process (one worker), with progress on and stderr a log file rather than a terminal:
    (run folder, summary, what it wrote on stderr)."""
    out, log = tmp_path_factory.mktemp("runs") / "api", io.StringIO()
    with contextlib.redirect_stderr(log):
        summary = audit(out, preset="tiny", progress=True)
    return out, summary, log.getvalue()


def test_progress_off_a_terminal_is_lines_not_bars(api_run):
    log = api_run[2]
    assert "\r" not in log and log.count("\n") <= 5, log[-500:]  # tqdm here would write a line per update


def test_python_api_matches_cli(tiny_run, api_run):
    summary = api_run[1]
    cli = json.loads((tiny_run / "summary.json").read_text())
    for tau in ("tau_loss", "tau_bias"):  # a pool (1 thread per worker) vs in-process: equal up to float rounding
        assert summary[tau]["step"] == cli[tau]["step"] and summary[tau]["ci"] == cli[tau]["ci"]
    assert summary["verdict"] == cli["verdict"] and summary["p_value"] == cli["p_value"]
    a, b = read_jsonl(api_run[0] / "metrics.jsonl"), read_jsonl(tiny_run / "metrics.jsonl")
    assert [x["test_loss"] for x in a] == pytest.approx([x["test_loss"] for x in b], rel=1e-5)


def test_resume_after_kill_gives_the_same_metrics(api_run, tmp_path, monkeypatch, kill_at):
    out = tmp_path / "killed"
    real_loss, real_eval = audit_module.EpsMSELoss, audit_module.evaluate_checkpoint
    dying = kill_at(18)  # killed during the second model's training
    monkeypatch.setattr(audit_module, "EpsMSELoss", lambda schedule: dying(real_loss(schedule)))
    with pytest.raises(KeyboardInterrupt):
        audit(out, preset="tiny", progress=False)  # in-process (workers=1), so the patch applies
    monkeypatch.setattr(audit_module, "EpsMSELoss", real_loss)

    monkeypatch.setattr(audit_module, "evaluate_checkpoint", kill_at(2)(real_eval))  # killed after one checkpoint
    with pytest.raises(KeyboardInterrupt):
        audit(out, preset="tiny", progress=False, resume=True)
    assert len(read_jsonl(out / "metrics.jsonl")) == 1
    monkeypatch.setattr(audit_module, "evaluate_checkpoint", real_eval)

    assert main(TINY + ["--out", str(out), "--resume"]) == 0
    resumed, straight = read_jsonl(out / "metrics.jsonl"), read_jsonl(api_run[0] / "metrics.jsonl")
    assert resumed == straight  # bit for bit: same process, same threads, the same chain of random draws


# -- bad input: clear message, exit code 2, nothing half-written --------------------------------

def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def _folder(tmp_path, sizes):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate(sizes):
        Image.fromarray(np.full(size, i * 10 % 255, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/faces"], "nor an existing file or folder"),
    (["--data", "imagenet"], "imagenet"),
    (["--splits", "1"], "at least 2"),
    (["--n", "1000", "--splits", "2"], "n_test|more than|only"),
    (["--preset", "huge"], "Unknown preset"),
    (["--lr", "-3"], "--lr must be positive"),
    (["--steps", "many"], "Bad value 'many'"),
])
def test_bad_arguments(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(TINY + ["--out", str(out)] + extra, capsys)
    assert code == 2 and "error:" in err
    assert any(m in err for m in message.split("|")), err
    assert not out.exists()


def test_bad_image_folders(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(TINY + ["--out", str(tmp_path / "o1"), "--data", str(empty)], capsys)
    assert code == 2 and "empty" in err.lower() or "no image" in err.lower()
    mixed = _folder(tmp_path, [(8, 8)] * 3 + [(9, 7)])
    code, err = _run(TINY + ["--out", str(tmp_path / "o2"), "--data", str(mixed)], capsys)
    assert code == 2 and "--resolution" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("n = [unclosed\n")
    code, err = _run(TINY + ["--out", str(tmp_path / "o"), "--config", str(bad)], capsys)
    assert code == 2 and "not valid TOML" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = 0.1\n")
    code, err = _run(TINY + ["--out", str(tmp_path / "o"), "--config", str(unknown)], capsys)
    assert code == 2 and "learning_rate" in err


def test_output_folder_of_another_run_is_refused(tiny_run, tmp_path, capsys):
    code, err = _run(TINY + ["--out", str(tiny_run), "--n", "20"], capsys)
    assert code == 2 and "different audit run" in err and "--force" in err
    code, err = _run(TINY + ["--out", str(tiny_run)], capsys)
    assert code == 2 and "--resume" in err
    code, err = _run(TINY + ["--out", str(tiny_run), "--resume", "--force"], capsys)
    assert code == 2 and "contradict" in err


def test_resume_on_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(tiny_run, out)
    (out / "metrics.jsonl").unlink()
    (out / "models" / "model1" / "step_0000007.safetensors").write_bytes(b"\x00not a safetensors file")
    code, err = _run(TINY + ["--out", str(out), "--resume"], capsys)
    assert code == 2 and "corrupt" in err and "step_0000007" in err


def test_non_finite_loss_stops_training(tmp_path, capsys):
    out = tmp_path / "diverged"
    code, err = _run(TINY + ["--out", str(out), "--lr", "1e30", "--grad-clip", "none"], capsys)
    assert code == 2 and "non-finite loss at step" in err and "Lower --lr" in err
    assert "new --out" in err  # the advice keeps the run's checkpoints (--force would delete them)
