"""biasgen judge: a finished run is re-judged from its files alone, on the twin-vs-control contrast."""
import json
import shutil

import numpy as np
import pytest

from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.images.audit import ImageAudit, audit
from biasgen.verdict import judge, placebo_gate
from biasgen.pipeline import judge_records
from biasgen.runs import read_jsonl
from biasgen.twins import make_members, model_pairs


def test_judge_rejudges_a_run_from_its_files_alone_using_the_controls(tmp_path, capsys):
    run = tmp_path / "run"
    summary = audit(run, preset="tiny", seeds_per_split=2, steps=30, checkpoints=9, first_checkpoint=2, progress=False)
    assert len(read_jsonl(run / "metrics.jsonl")) >= 7  # enough checkpoints for the drift test
    assert summary["evidence"].startswith("twin-vs-control contrast") and summary["control"]["balanced"]
    assert summary["n_twin_pairs"] == 4 and summary["n_control_pairs"] == 2
    assert all(len(r["same_split_distance_pairs"]) == 2 for r in read_jsonl(run / "metrics.jsonl"))
    assert summary["negative_controls"]["placebo_contrast"]["verdict"] in ("no-bias-detected", "inconclusive", "biased-generalization-detected")

    shutil.rmtree(run / "models")  # judging needs no model
    shutil.rmtree(run / "samples")
    before = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**before, "verdict": "tampered", "reason": "tampered"}))
    assert main(["judge", str(run), "--write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(before["verdict"] + ":")
    after = json.loads((run / "summary.json").read_text())
    for key in ("verdict", "reason", "p_value", "tau_bias", "tau_loss", "recommended_step", "negative_controls"):
        assert after[key] == before[key], key
    assert "tampered" not in (run / "report.html").read_text()


def test_judge_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["judge", str(tmp_path)]) == 2
    assert "holds no biasgen run" in capsys.readouterr().err


def synthetic_records(transient: float, seed: int = 0) -> list[dict]:
    """18 checkpoints of a 2 splits x 2 seeds audit: twins converge, then drift apart (by 0.1) while same-split
    controls stay at their floor; the cross-seed twin pairs get an extra early transient of size ``transient``."""
    rng = np.random.default_rng(seed)
    steps = np.unique(np.geomspace(10, 3000, 18).astype(int))
    x = np.arange(len(steps))
    base = 0.05 + 0.3 * np.exp(-x / 2)
    rise = 0.1 * np.clip((x - 7) / 6, 0, 1)
    loss = 0.1 + 0.002 * (x - 12) ** 2
    records = []
    for i, step in enumerate(steps):
        early = transient * np.exp(-i / 1.5)
        twins = [base[i] + rise[i] + (early if cross else 0.0) + 0.003 * rng.standard_normal()
                 for cross in (False, True, True, False)]  # pairs (0,2), (0,3), (1,2), (1,3)
        controls = [base[i] + 0.003 * rng.standard_normal() for _ in range(2)]
        records.append({"step": int(step), "twin_distance_pairs": twins, "same_split_distance_pairs": controls,
                        "test_loss_units": (loss[i] + 0.01 * rng.standard_normal(64)).tolist(),
                        "f_mem": 0.0, "f_mem_ci": [0.0, 0.0]})
    return records


def test_a_failing_placebo_turns_a_detection_into_inconclusive():
    experiment = ImageAudit.from_settings("tiny", None, seeds_per_split=2, n_boot=200)
    members = make_members(2, 2)
    clean = judge_records(experiment, synthetic_records(0.0), members)
    assert clean["verdict"] == "biased-generalization-detected"
    assert clean["recommendation_basis"] == "tau_data"  # the contrast rises after step 104 (index 7)
    assert clean["tau_data"]["ci95"][0] <= 104 <= clean["tau_data"]["ci95"][1]
    assert clean["negative_controls"]["placebo_contrast"]["verdict"] != "biased-generalization-detected"
    assert clean["tau_mem"]["bound"] == "lower"  # no copies: memorization not reached

    judged = judge_records(experiment, synthetic_records(0.6), members)
    assert judged["negative_controls"]["placebo_contrast"]["verdict"] == "biased-generalization-detected"
    assert judged["verdict"] == "inconclusive" and "negative control fails" in judged["reason"]
    assert "--seeds-per-split 3 or more; this run has 2" in judged["reason"]  # advice beyond the run's design
    assert judged["recommendation_basis"] == "tau_loss"
    assert placebo_gate(clean, seeds_per_split=2) == {}


def judge_inputs(records: list[dict]) -> tuple:
    """The positional arguments of :func:`biasgen.verdict.judge` for :func:`synthetic_records`."""
    table = lambda key: np.array([r[key] for r in records]).T  # (n_units, C)
    twins, controls = model_pairs(make_members(2, 2))
    return ([r["step"] for r in records], table("twin_distance_pairs"), twins, table("test_loss_units"),
            table("same_split_distance_pairs"), controls)


def test_the_pure_judge_applies_the_placebo_gate_when_given_the_members():
    members = make_members(2, 2)
    args = judge_inputs(synthetic_records(0.6))  # the cross-seed twin pairs go through an early transient
    blind = judge(*args, n_boot=200)  # without members the judge cannot form the placebo
    assert blind["verdict"] == "biased-generalization-detected" and "negative_controls" not in blind

    gated = judge(*args, members=members, n_boot=200)
    assert gated["negative_controls"]["placebo_contrast"]["verdict"] == "biased-generalization-detected"
    assert gated["verdict"] == "inconclusive" and "negative control fails" in gated["reason"]
    assert gated["recommended_step"] == gated["tau_loss"]["step"] != blind["recommended_step"]


def test_the_judge_refuses_members_that_contradict_the_pairs():
    args = judge_inputs(synthetic_records(0.0))
    with pytest.raises(BiasgenError, match="contradict members"):
        judge(*args, members=make_members(1, 4))
    with pytest.raises(BiasgenError, match="lists 3 models"):
        judge(*args, members=make_members(1, 3))


def test_judge_records_notes_the_sampler_block_it_is_given():
    experiment = ImageAudit.from_settings("tiny", None, seeds_per_split=2, n_boot=50)
    records = synthetic_records(0.0)
    assert "Note: sampled with" not in judge_records(experiment, records, make_members(2, 2), {"validated": True})["reason"]
    judged = judge_records(experiment, records, make_members(2, 2), {"name": "ddim-7", "validated": False})
    assert "Note: sampled with ddim-7, which was not validated" in judged["reason"]
    assert "understate the twin distance and the memorized fraction" in judged["reason"]  # the audit's caveat
