"""The benchmark scripts stay runnable: each imports against today's package, and the sampler comparison
(bench/bench_sample_count.py, the evidence behind a validated sampler) and the side-by-side evaluation
(bench/bench_eval_speed.py) run end to end on a tiny audit."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from biasgen.cli import main
from biasgen.sampler import network_call_count

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports; main() is guarded by __name__
    return module


@pytest.mark.parametrize("path", sorted(BENCH.glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_bench_imports(path):
    assert callable(load(path).main)


def test_sampler_comparison_on_a_finished_audit(tmp_path, monkeypatch, capsys):
    run = tmp_path / "tiny"
    assert main(["audit", "--preset", "tiny", "--quiet", "--out", str(run)]) == 0
    bench = load(BENCH / "bench_sample_count.py")
    assert bench.parse_sampler("ddpm-250-quadratic/alt") == (
        dict(method="ddpm", steps=250, spacing="quadratic", hold_above=0, hold_every=1), True)
    held, alt = bench.parse_sampler("ddpm-1000-hold300x4")
    assert (held["hold_above"], held["hold_every"], alt) == (300, 4, False)
    assert network_call_count(1000, **{k: v for k, v in held.items() if k != "method"}) == 300 + 700 // 4 == 475
    monkeypatch.setattr(sys, "argv", ["bench", str(run), "--out", str(tmp_path / "cmp"), "--threads", "1",
                                      "--samplers", "ddpm-20,ddpm-20-quadratic,ddpm-20/alt", "--counts", "8,4"])
    bench.main()
    table = (tmp_path / "cmp" / "table.md").read_text()
    first = table.split("Replicates")[0]
    rows = [line.split(" | ") for line in first.splitlines() if line.startswith("| ddpm-")]
    assert [(r[0], r[1]) for r in rows] == [("| ddpm-20", "8"), ("| ddpm-20", "4"), ("| ddpm-20-quadratic", "8"),
                                            ("| ddpm-20-quadratic", "4"), ("| ddpm-20/alt", "8"), ("| ddpm-20/alt", "4")]
    assert rows[0][8].startswith("0.00 ")  # the reference against itself
    assert not rows[2][8].startswith("0.00 ") and not rows[4][8].startswith("0.00 ")  # other samples, other curves
    assert "| ddpm-20 | 4 | 4 |" in table  # replicates: 8 + 8 /alt samples cut into 4 draws of 4
    assert "| ddpm-20-quadratic | 4 | 2 |" in table
    assert "Paired by sample seed against ddpm-20" in table and "| 12 | " in table
    assert "ddpm-20-quadratic: own sample" in table  # distance to the same seed's reference sample
    meta = json.loads((tmp_path / "cmp" / "ddpm-20-quadratic-12.json").read_text())
    assert meta["sampler"] == "ddpm-20-quadratic" and meta["n_samples"] == 8


def test_evaluation_side_by_side_on_the_same_models(tmp_path, monkeypatch):
    run = tmp_path / "tiny"
    assert main(["audit", "--preset", "tiny", "--quiet", "--out", str(run), "--workers", "1"]) == 0
    bench = load(BENCH / "bench_eval_speed.py")
    monkeypatch.setitem(bench.WAYS, "held", {**bench.WAYS["held"], "compile": "off"})  # no C++ compiler needed
    row = bench.evaluate_way(run, tmp_path / "ways", "held")  # a way whose sampler differs from RUN's
    summary = json.loads((tmp_path / "ways" / "held" / "summary.json").read_text())
    assert summary["sampler"]["name"] == "ddim-5-hold300x4" and row["verdict"] == summary["verdict"]
    assert json.loads((run / "summary.json").read_text())["sampler"]["name"] == "ddim-5"  # RUN untouched


def test_the_sampler_study_names_each_sampler_by_what_it_draws():
    from biasgen.config import build_config
    from biasgen.images.audit import PRESETS, AuditConfig

    bench = load(BENCH / "bench_samplers.py")
    held = build_config(AuditConfig, PRESETS, "default", None, {})  # a run made with held predictions
    assert [bench.sampler_config(held, *s).sampler_name for s in (("ddpm", None, 0.0), ("ddim", 50, 1.0))] == [
        "ddpm-1000", "ddim-50-eta1"]  # each compared sampler without the run's hold
