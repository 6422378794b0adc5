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
