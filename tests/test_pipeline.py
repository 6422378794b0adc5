"""The pipeline serves any experiment definition: the toy definition of docs/pipeline.md runs end to end."""
import json
import re
from pathlib import Path

from biasgen.runs import read_jsonl

DOC = Path(__file__).parents[1] / "docs" / "pipeline.md"


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/pipeline.md should hold exactly one python example"
    return blocks[0]


def test_toy_definition_of_the_docs_runs_through_the_pipeline(tmp_path):
    namespace = {"out_dir": tmp_path / "toy", "__name__": "toy_example"}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    run = tmp_path / "toy"
    summary = json.loads((run / "summary.json").read_text())
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == summary["checkpoints"] and len(records) == 4
    assert json.loads((run / "run.json").read_text())["kind"] == "toy"
    assert summary["verdict"] in ("biased-generalization-detected", "no-bias-detected", "inconclusive")
    assert summary["units"] == {"tau_loss": "test points", "tau_bias": "twin pairs"}
    assert summary["seeds"]["model_init"] == [1, 2] and summary["n_twin_pairs"] == 1
    assert all(len(r["twin_sq_distance_pairs"]) == 1 and r["twin_sq_distance_pairs"][0] > 0 for r in records)
    # trained models are on disk and a second call resumes without retraining or re-evaluating
    assert (run / "models" / "model1" / f"step_{summary['checkpoints'][-1]:07d}.safetensors").exists()
    again = namespace["run_experiment"](namespace["ToyExperiment"].from_settings(), run, resume=True, progress=False)
    assert again["tau_bias"] == summary["tau_bias"] and len(read_jsonl(run / "metrics.jsonl")) == 4


def test_the_toy_gets_a_report_page_and_a_sweep_from_experiments_alone(tmp_path, monkeypatch, capsys):
    """Registering the class in ``experiments()`` is the only edit outside its definition: ``biasgen report`` shows
    its view and ``biasgen sweep --kind toy`` runs it at each size (its config fields are flags)."""
    import biasgen.experiments
    import biasgen.sweep
    from biasgen.cli import main

    namespace = {"out_dir": tmp_path / "toy", "__name__": "toy_example"}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    toy = namespace["ToyExperiment"]
    table = {**biasgen.experiments.experiments(), "toy": toy}
    monkeypatch.setattr(biasgen.experiments, "experiments", lambda: table)  # the one line in experiments()
    monkeypatch.setattr(biasgen.sweep, "experiments", biasgen.experiments.experiments)  # its imported name

    assert main(["report", str(tmp_path / "toy")]) == 0
    page = (tmp_path / "toy" / "report.html").read_text()
    assert "biasgen toy twins report" in page and "twin squared distance" in page and "test loss" in page

    out = tmp_path / "sweep"
    assert main(["sweep", "--kind", "toy", "--sizes", "16,24", "--width", "16", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["experiment"] == "toy" and [r["n"] for r in result["rows"]] == [16, 24]
    assert all(r["tau_mem"] is None for r in result["rows"]) and not result["fits"]["tau_mem"]["fit"]
    size = json.loads((out / "n000016" / "summary.json").read_text())
    assert size["config"]["width"] == 16 and size["config"]["n"] == 16
    assert "not measured" in capsys.readouterr().out
    assert "toy" in (out / "report.html").read_text() and (out / "fig_phase_diagram.png").exists()
    assert "biasgen toy twins report" in (out / "n000024" / "report.html").read_text()
