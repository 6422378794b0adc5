"""biasgen judge: a finished run is re-judged from its files alone, on the twin-vs-control contrast."""
import json
import shutil

from biasgen.cli import main
from biasgen.images.audit import audit
from biasgen.runs import read_jsonl


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
