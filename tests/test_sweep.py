"""`biasgen sweep`: tiny sweeps end to end, resume after a kill, the censored fits, the advice and every bad input."""
import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import biasgen.sweep as sweep_module
from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.runs import read_jsonl
from biasgen.hierarchy.experiment import HierarchyExperiment
from biasgen.images.audit import ImageAudit
from biasgen.memorization import memorization_onset, wilson
from biasgen.sweep import located_tau, onset_tau, sweep
from biasgen.sweep.fit import censored_mle, extrapolate, fit_power_law, predict

TINY = ["sweep", "--preset", "tiny", "--quiet", "--target-n", "100"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps") / "tiny"
    assert main(TINY + ["--out", str(out)]) == 0
    return out


def experiment_of(cls, summary: dict):
    """The experiment of a finished run, rebuilt from its summary's config."""
    return cls.from_settings(None, None, **{**summary["config"], "device": "cpu"})


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timing"}


# -- end to end -----------------------------------------------------------------------------------------------
def test_tiny_sweep_writes_rows_fits_and_the_diagram(tiny_sweep, capsys):
    result = json.loads((tiny_sweep / "sweep.json").read_text())
    rows = read_jsonl(tiny_sweep / "sweep.jsonl")
    assert json.loads((tiny_sweep / "run.json").read_text())["kind"] == "sweep"
    assert [r["n"] for r in rows] == result["sizes"] == [8, 12, 16]
    assert rows == result["rows"] and result["complete"]
    for row in rows:
        summary = json.loads((tiny_sweep / row["folder"] / "summary.json").read_text())
        assert summary["config"]["n"] == row["n"] and summary["config"]["steps"] == row["steps"] == row["n"]  # 1 step/image
        assert row["verdict"] == summary["verdict"] and row["checkpoints"] == summary["checkpoints"]
        for name in ("tau_bias", "tau_loss"):
            tau, last = row[name], len(summary["checkpoints"]) - 1
            if summary[name]["index"] == last:  # not reached: a lower bound at the last step, never a number
                assert tau["step"] is None and tau["bound"] == "lower" and tau["value"] == summary["checkpoints"][-1]
            elif summary[name]["index"] > 0:
                assert tau["located"] and tau["step"] == tau["value"] == summary[name]["step"]
        share = experiment_of(ImageAudit, summary).memorized_share(read_jsonl(tiny_sweep / row["folder"] / "metrics.jsonl"))
        assert [s["share"] for s in share] == [r["f_mem"] for r in read_jsonl(tiny_sweep / row["folder"] / "metrics.jsonl")]
        assert row["tau_mem"] == memorization_onset(share, 0.0) == summary["tau_mem"]  # the run's own tau_mem (level 0)
    for name in ("tau_bias", "tau_loss", "tau_mem"):
        fit = result["fits"][name]
        assert fit["n_points"] == 3 and fit["censoring"] == [r[name]["bound"] or "value" for r in rows]
    assert result["target"]["target_n"] == 100 and result["target"]["reach"] == pytest.approx(100 / 16)
    assert Image.open(tiny_sweep / "fig_phase_diagram.png").size[0] > 300
    assert (tiny_sweep / "n000012" / "fig_loss_twin.png").exists()  # each size is an ordinary run folder


def test_resume_after_a_kill_mid_sweep_gives_the_same_sweep(tiny_sweep, tmp_path, monkeypatch):
    out, real, calls = tmp_path / "killed", sweep_module.run_experiment, []

    def dying(experiment, folder, **kwargs):  # killed when the second size starts
        calls.append(folder.name)
        if folder.name == "n000012" and calls.count("n000012") == 1:
            raise KeyboardInterrupt
        return real(experiment, folder, **kwargs)

    monkeypatch.setattr(sweep_module, "run_experiment", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep(out, preset="tiny", target_n=100, progress=False)
    assert [r["n"] for r in read_jsonl(out / "sweep.jsonl")] == [8] and not (out / "sweep.json").exists()
    with pytest.raises(BiasgenError, match="--resume"):
        sweep(out, preset="tiny", target_n=100, progress=False)
    resumed = sweep(out, preset="tiny", target_n=100, progress=False, resume=True)
    assert calls == ["n000008", "n000012", "n000012", "n000016"]  # the complete size is not recomputed
    assert without_timing(resumed) == without_timing(json.loads((tiny_sweep / "sweep.json").read_text()))
    again = sweep(out, preset="tiny", target_n=200, progress=False, resume=True)  # new advice, nothing rerun
    assert len(calls) == 4 and again["target"]["target_n"] == 200 and again["rows"] == resumed["rows"]


def test_a_sweep_of_an_older_biasgen_resumes_without_rerunning(tiny_sweep, tmp_path, monkeypatch):
    out = tmp_path / "old"
    shutil.copytree(tiny_sweep, out)
    for path in [out / "run.json", *out.glob("n*/run.json"), *out.glob("n*/summary.json")]:
        info = json.loads(path.read_text())  # written before --sample-spacing existed: the setting is missing
        config = info["config"]["settings"] if path.parent == out else info["config"]
        del config["sample_spacing"]
        path.write_text(json.dumps(info))
    calls = []
    monkeypatch.setattr(sweep_module, "run_experiment", lambda *args, **kwargs: calls.append(args))
    resumed = sweep(out, preset="tiny", target_n=100, progress=False, resume=True)
    assert calls == []  # every size is recognised as complete with the setting's default
    assert without_timing(resumed) == without_timing(json.loads((tiny_sweep / "sweep.json").read_text()))


def test_hierarchy_sweep_counts_near_copies(tmp_path):
    out = tmp_path / "h"
    result = sweep(out, kind="hierarchy", sizes=[8, 16], preset="tiny-hierarchy", progress=False)
    for row in result["rows"]:
        records = read_jsonl(out / row["folder"] / "metrics.jsonl")
        config = json.loads((out / row["folder"] / "summary.json").read_text())["config"]
        hierarchy = experiment_of(HierarchyExperiment, {"config": config})
        share = hierarchy.memorized_share(records)
        total = config["n_samples"] * len(records[0]["gen_mem_share"])
        assert [s["share"] for s in share] == pytest.approx([sum(r["gen_mem_share"]) / 2 for r in records])
        assert all(s["ci"] == pytest.approx(wilson(round(s["share"] * total), total)) for s in share)
        assert all(m >= c for r in records for m, c in zip(r["gen_mem_share"], r["gen_copy_share"]))
        assert row["tau_mem"] == memorization_onset(share, 0.0) and row["mem_share"] == "gen_mem_share"
    assert "Hamming" in result["definitions"]["memorized share"]
    assert not result["fits"]["tau_bias"]["fit"]  # two sizes: no power law
    assert (out / "fig_phase_diagram.png").exists()


def test_memorized_share_of_sequences_pools_models_and_reads_older_runs():
    records = [{"step": 10, "gen_mem_share": [0.0, 0.25], "gen_copy_share": [0.0, 0.0]},
               {"step": 20, "gen_mem_share": [0.5, 0.25], "gen_copy_share": [0.25, 0.0]}]
    hierarchy = HierarchyExperiment.from_settings("tiny", None, n_samples=4)
    share = hierarchy.memorized_share(records)
    assert [s["share"] for s in share] == [1 / 8, 3 / 8] and share[1]["ci"] == wilson(3, 8)
    older = [{k: v for k, v in r.items() if k != "gen_mem_share"} for r in records]  # recorded before near-copies
    assert [s["key"] for s in share] == ["gen_mem_share"] * 2
    assert [(s["share"], s["key"]) for s in hierarchy.memorized_share(older)] == [(0.0, "gen_copy_share"),
                                                                                 (1 / 8, "gen_copy_share")]


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--sizes", "16,8"], "must increase"),
    (["--sizes", "8,8,16"], "twice"),
    (["--sizes", "8,x"], "integers"),
    (["--sizes", "8,1000"], "largest size that fits is 882"),  # (1797 digits - 32 test) // 2 splits
    (["--kind", "hierarchy", "--preset", "tiny-hierarchy", "--sizes", "8,200"], "largest size that fits is 168"),
    (["--target-n", "10"], "smaller than the largest size"),
    (["--kind", "hierarchy"], "is a audit sweep"),
    (["--n", "32"], "--n is set per size"),
    (["--steps", "30", "--steps-per-image", "2"], "not both"),
    (["--resume", "--force"], "contradict"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["sweep", "--preset", "tiny", "--quiet", "--out", str(out)] + args) == 2
    assert message in capsys.readouterr().err
    assert not (out / "n000008").exists()


def test_a_folder_holding_something_else_is_refused(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(TINY + ["--out", str(other)]) == 2
    assert "holds no biasgen run" in capsys.readouterr().err
    audit_run = tmp_path / "audit"
    audit_run.mkdir()
    (audit_run / "run.json").write_text(json.dumps({"kind": "audit", "config": {}}))
    assert main(TINY + ["--out", str(audit_run), "--resume"]) == 2
    assert "holds a different audit run" in capsys.readouterr().err


# -- per-size taus --------------------------------------------------------------------------------------------
def test_taus_at_the_edges_of_the_run_are_bounds():
    steps = [10, 20, 40, 80]
    tau = {"step": 80, "index": 3, "ci": [40, 80], "ci95": [20, 80]}
    assert located_tau(tau, steps) | {"ci": None, "ci95": None} == {
        "step": None, "ci": None, "ci95": None, "located": False, "bound": "lower", "value": 80}
    assert located_tau(tau | {"step": 10, "index": 0}, steps)["bound"] == "upper"
    assert located_tau(tau | {"step": 40, "index": 2}, steps)["step"] == 40
    series = [{"step": s, "share": f, "ci": ci} for s, f, ci in
              [(10, 0.0, [0, 0]), (20, 0.01, [0.0, 0.03]), (40, 0.05, [0.02, 0.08]), (80, 0.2, [0.1, 0.3])]]
    onset = memorization_onset(series, 0.0)
    assert onset["step"] == 40 and onset["ci"] == [20, 40] and onset["located"]
    assert memorization_onset(series, 0.05)["step"] == 80  # a higher level: later
    assert memorization_onset(series, 0.5) | {"share_last": 0, "share_last_ci": 0} == {
        "step": None, "ci": None, "located": False, "bound": "lower", "value": 80, "level": 0.5, "share_last": 0,
        "share_last_ci": 0}
    assert memorization_onset([s | {"ci": [0.1, 0.2], "share": 0.1} for s in series], 0.0)["bound"] == "upper"


def test_wilson_interval():
    assert wilson(0, 100)[0] == 0.0 and wilson(1, 512)[0] > 0
    assert wilson(5, 100) == pytest.approx([0.02154, 0.11175], abs=1e-4)


# -- the fits ---------------------------------------------------------------------------------------------
SIZES = [16, 32, 64, 128, 256]


def test_an_exact_power_law_is_recovered():
    fit = fit_power_law(SIZES, [3 * n**0.8 for n in SIZES], ["value"] * 5, sigma_floor=1e-3)
    assert fit["exponent"] == pytest.approx(0.8, abs=1e-6) and fit["prefactor"] == pytest.approx(3, rel=1e-5)
    lo, hi = fit["exponent_ci"]
    assert lo < 0.8 < hi and hi - lo < 0.01
    assert predict(fit, 5000)["step"] == pytest.approx(3 * 5000**0.8, rel=1e-5)


def test_without_bounds_the_intervals_are_the_classical_ones():
    rng = np.random.default_rng(1)
    taus = [3 * n**0.8 * math.exp(0.2 * rng.standard_normal()) for n in SIZES]
    fit = fit_power_law(SIZES, taus, ["value"] * 5)
    x, y = np.log(SIZES), np.log(taus)
    ols, t = stats.linregress(x, y), stats.t.ppf(0.975, 3)
    assert fit["exponent_ci"] == pytest.approx([ols.slope - t * ols.stderr, ols.slope + t * ols.stderr], abs=1e-5)
    s = math.sqrt(((y - ols.intercept - ols.slope * x) ** 2).sum() / 3)
    x0 = math.log(4000)
    half = t * s * math.sqrt(1 + 1 / 5 + (x0 - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum())
    centre = ols.intercept + ols.slope * x0
    assert predict(fit, 4000)["interval"] == pytest.approx([math.exp(centre - half), math.exp(centre + half)], rel=1e-4)


def test_censoring_recovers_the_exponent_that_dropping_bounds_biases():
    """tau = 2 n, log-normal scatter 0.5, every run stopped at step 400: the large sizes are mostly bounds."""
    rng, sizes, budget = np.random.default_rng(0), np.array([16, 32, 64, 128, 256, 512]), 400.0
    censored, dropped, as_values = [], [], []
    for _ in range(40):
        tau = 2 * sizes * np.exp(0.5 * rng.standard_normal(len(sizes)))
        seen = np.minimum(tau, budget)
        codes = ["lower" if t > budget else "value" for t in tau]
        keep = tau <= budget
        if keep.sum() < 3:
            continue
        censored.append(censored_mle(sizes, seen, codes)["exponent"])
        dropped.append(np.polyfit(np.log(sizes[keep]), np.log(seen[keep]), 1)[0])
        as_values.append(np.polyfit(np.log(sizes), np.log(seen), 1)[0])
    assert len(censored) >= 30
    assert abs(np.mean(censored) - 1.0) < 0.1
    assert np.mean(dropped) < 0.88 and np.mean(as_values) < 0.8  # both biased low
    assert np.mean(censored) - np.mean(dropped) > 0.08
    one = fit_power_law([16, 32, 64, 128], [40, 70, 120, 200], ["value", "value", "value", "lower"])
    drop = fit_power_law([16, 32, 64], [40, 70, 120], ["value"] * 3)
    assert one["exponent"] > drop["exponent"]  # the bound pulls the exponent up instead of vanishing


def test_too_few_located_values_give_no_fit():
    fit = fit_power_law([16, 32, 64], [50, 100, 100], ["value", "lower", "lower"])
    assert not fit["fit"] and "at least 2 located" in fit["reason"]


# -- the advice ------------------------------------------------------------------------------------------
def test_target_advice_and_its_refusals():
    good = fit_power_law(SIZES, [3 * n * (1.05 if i % 2 else 0.95) for i, n in enumerate(SIZES)], ["value"] * 5)
    wide = fit_power_law(SIZES[:3], [50, 400, 60], ["value"] * 3)
    fits = {"tau_bias": good, "tau_loss": good, "tau_mem": wide}
    advice = extrapolate(fits, SIZES, 2560)
    assert advice["refused"] is None and advice["reach"] == pytest.approx(10.0) and "10x" in advice["statement"]
    bias = advice["taus"]["tau_bias"]
    assert bias["interval"][0] < bias["step"] < bias["interval"][1]
    assert advice["recommended_step"] == int(bias["interval"][0])
    why = advice["taus"]["tau_mem"]["refused"]
    assert why.startswith("the 95% interval of its exponent is unbounded") and "limit 1.0" in why
    assert "from 3 sizes with 3 located" in why and "measure more sizes" in why
    assert "at least 3" in extrapolate(fits, SIZES[:2], 2560)["refused"]
    no_bias = extrapolate({**fits, "tau_bias": wide}, SIZES, 2560)
    assert no_bias["recommended_step"] is None and "tau_bias cannot be extrapolated" in no_bias["refused"]
    # with controls the data-specific onset decides; when it cannot be extrapolated, tau_bias does and says so
    early = fit_power_law(SIZES, [n * (1.05 if i % 2 else 0.95) for i, n in enumerate(SIZES)], ["value"] * 5)
    with_data = extrapolate({**fits, "tau_data": early}, SIZES, 2560)
    assert with_data["recommendation_basis"].endswith("tau_data")
    assert with_data["recommended_step"] == int(with_data["taus"]["tau_data"]["interval"][0]) < advice["recommended_step"]
    censored = fit_power_law(SIZES, [40, 80, 90, 90, 90], ["value", "value", "lower", "lower", "lower"])
    fallback = extrapolate({**fits, "tau_data": censored}, SIZES, 2560)
    assert fallback["recommendation_basis"].endswith("tau_bias")
    assert "train longer (3 size(s) ended before this tau)" in fallback["taus"]["tau_data"]["refused"]


def test_tau_data_of_a_size_is_a_bound_until_the_contrast_has_risen():
    steps = [20, 40, 80, 160]
    tau = {"step": 40, "index": 1, "ci": [20, 80], "ci95": [20, 160]}
    assert onset_tau({"tau_data": tau, "p_value_end": 0.01, "level": 0.05}, steps)["step"] == 40
    assert onset_tau({"tau_data": tau, "p_value_end": 0.3, "level": 0.05}, steps) == {
        "step": None, "ci": None, "ci95": None, "located": False, "bound": "lower", "value": 160}
    assert onset_tau({"tau_data": None}, steps) is None  # no same-split controls


def test_memorization_onset_needs_copies_that_persist():
    shares = [(10, [0, 0]), (20, [0.001, 0.01]), (40, [0, 0.01]), (80, [0.02, 0.05]), (160, [0.1, 0.2])]
    series = [{"step": s, "share": sum(ci) / 2, "ci": ci} for s, ci in shares]
    onset = memorization_onset(series, 0.0)
    assert onset["step"] == 80 and onset["ci"] == [20, 80]  # the lone near-copies at step 20 are its first sign only
    assert memorization_onset(series[:3], 0.0)["bound"] == "lower"  # gone again by the last checkpoint: not reached


def test_extrapolation_bench_checks_a_held_out_size_against_its_prediction():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_extrapolation", Path(__file__).parents[1] / "bench" / "bench_extrapolation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(n, bias, loss):
        tau = lambda v: {"step": v, "ci": [v, v], "located": True, "bound": None, "value": v}
        return {"n": n, "complete": True, "checkpoints": np.geomspace(20, 6400, 14).round().tolist(), "tau_bias": tau(bias),
                "tau_data": None, "tau_loss": tau(loss),
                "tau_mem": {"step": None, "ci": None, "located": False, "bound": "lower", "value": 25 * n}}

    rows = [row(n, round(2 * n * f), round(9 * n * f)) for n, f in zip((16, 32, 64, 128), (1.03, 0.97, 1.02, 0.98))]
    on_the_line = bench.compare(rows + [row(256, 512, 2300)], 256, 1.0)
    assert [e["agreement"] for e in on_the_line] == ["inside", "no fit", "inside", "no fit"]
    off = bench.compare(rows + [row(256, 60, 2300)], 256, 1.0)
    assert off[0]["agreement"] == "outside" and "| tau_bias |" in bench.table(off, 256)
