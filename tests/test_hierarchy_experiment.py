"""End-to-end `biasgen hierarchy` on a seconds-long config: outputs, resume, and bad input."""
import json

import pytest
import torch

from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.hierarchy import experiment
from biasgen.hierarchy.experiment import PRESETS, HierarchyConfig, hierarchy, make_data
from biasgen.seeds import SeedPlan
from biasgen.runs import read_jsonl
from biasgen.twins import build_model

FIGS = ["fig_kl.png", "fig_kl_along_t.png", "fig_nn.png", "fig_loss_decomposition.png", "fig_uturn.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "run"
    summary = hierarchy(out, preset="tiny", progress=False)
    return out, summary


def test_tiny_run_writes_summary_metrics_and_figures(tiny_run):
    out, summary = tiny_run
    records = read_jsonl(out / "metrics.jsonl")
    steps = summary["checkpoints"]
    assert [r["step"] for r in records] == steps and summary["complete"]
    for name in ("tau_bias", "tau_nn", "tau_oracle", "tau_loss"):
        assert summary[name]["step"] in steps and len(summary[name]["ci"]) == 2
    assert summary["tau_bias"]["n_units"] == 1 and summary["tau_loss"]["n_units"] == 2  # 1 twin pair, 2 models
    assert summary["verdict"] in ("biased-generalization-detected", "no-bias-detected", "inconclusive")
    assert len(summary["coarse_to_fine"]["oracle_kl_argmin_step"]) == 3 + 1  # k = 0..depth
    rec = records[-1]
    assert len(rec["oracle_kl"]) == 2 and len(rec["oracle_kl"][0]) == 4
    assert all(r > 0 for r in rec["oracle_kl"][0]) and all(0 <= g <= 1 for g in rec["gen_grammatical"])
    for m in range(2):  # l = l* + l~ per model
        assert rec["test_l"][m] == pytest.approx(rec["test_l_star"][m] + rec["test_l_tilde"][m], rel=1e-9)
    assert rec["test_l"][0] > summary["bp_reference"]["test_ce"]  # an untrained net is worse than the exact denoiser
    assert json.loads((out / "summary.json").read_text())["tau_bias"] == summary["tau_bias"]
    for fig in FIGS:
        assert (out / fig).stat().st_size > 1000


def test_resume_skips_finished_models_and_evaluated_checkpoints(tiny_run):
    out, summary = tiny_run
    weights = sorted((out / "models").rglob("step_*.safetensors"))
    mtimes = [w.stat().st_mtime_ns for w in weights]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # as if killed before the last evaluation
    again = hierarchy(out, preset="tiny", resume=True, progress=False)
    assert [w.stat().st_mtime_ns for w in weights] == mtimes  # no model retrained
    new_lines = (out / "metrics.jsonl").read_text().splitlines()
    assert new_lines[:-1] == lines[:-1] and json.loads(new_lines[-1]) == json.loads(lines[-1])  # deterministic
    assert again["tau_bias"] == summary["tau_bias"]


def test_refuses_a_different_run_foreign_folder_and_corrupt_checkpoint(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(BiasgenError, match="different"):
        hierarchy(out, preset="tiny", resume=True, progress=False, n=40)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BiasgenError, match="not empty"):
        hierarchy(foreign, preset="tiny", progress=False)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    stem = sorted((copy / "models" / "model0").glob("step_*.safetensors"))[0]
    stem.write_bytes(b"not a checkpoint")
    (copy / "metrics.jsonl").unlink()
    with pytest.raises(BiasgenError, match="corrupt"):
        hierarchy(copy, preset="tiny", resume=True, progress=False)


def test_bad_config_values():
    with pytest.raises(BiasgenError, match="pool"):
        HierarchyConfig(**{**PRESETS["tiny"], "pool": 100}).validate()
    with pytest.raises(BiasgenError, match="splits"):
        HierarchyConfig(splits=1)
    with pytest.raises(BiasgenError, match="divisible"):
        HierarchyConfig(width=30, heads=4).validate()
    with pytest.raises(BiasgenError, match="t-frac"):
        HierarchyConfig(t_frac=1.5).validate()
    with pytest.raises(BiasgenError, match="q-eff"):
        HierarchyConfig(q_eff=7).validate()
    with pytest.raises(BiasgenError, match="Unknown preset"):
        hierarchy("unused", preset="laptop")


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["hierarchy", "--preset", "tiny", "--out", str(tmp_path / "r"), "--n", "-3", "--quiet"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    def nan_loss(schedule, q):
        return lambda model, x0, gen: model(torch.zeros(len(x0), x0.shape[1], q), torch.ones(len(x0)).long()).sum() * float("nan")

    monkeypatch.setattr(experiment, "x0_cross_entropy_loss", nan_loss)
    with pytest.raises(BiasgenError, match="non-finite loss"):
        hierarchy(tmp_path / "nan", preset="tiny", progress=False)


def test_splits_and_test_are_disjoint():
    cfg = HierarchyConfig(**PRESETS["tiny"])
    data = make_data(cfg, SeedPlan(cfg.seed))
    codes = lambda x: set(map(tuple, x.tolist()))
    train = codes(torch.cat(data.train))
    assert len(data.train) == 2 and all(len(b) == cfg.n for b in data.train)
    assert len(data.test) == cfg.n_test and not (codes(data.test) & train)


def test_paper_preset_is_the_papers_setting_and_its_model_runs():
    cfg = HierarchyConfig(**{**PRESETS["paper"], "device": "cpu"})
    cfg.validate()
    assert (cfg.layers, cfg.width, cfg.heads, cfg.ffn, cfg.lr, cfg.batch_size, cfg.checkpoints) == (8, 512, 4, 1024, 3e-4, 512, 25)
    model = build_model(*experiment.HierarchyExperiment(cfg).network(None), seed=0)
    logits = model(torch.randn(3, 16, 6), torch.tensor([1, 250, 500]))
    assert logits.shape == (3, 16, 6) and torch.isfinite(logits).all()


def test_grammar_file_loads_the_tensor_and_bad_files_are_refused(tmp_path):
    import numpy as np

    from biasgen.hierarchy import Grammar

    g = Grammar.random(q=4, depth=3, q_eff=3, seed=5)
    np.save(tmp_path / "M.npy", g.M.numpy())
    torch.save(g.M, tmp_path / "M.pt")
    cfg = HierarchyConfig(**{**PRESETS["tiny"], "q": 4, "q_eff": 3})
    for name in ("M.npy", "M.pt"):
        data = make_data(HierarchyConfig(**{**PRESETS["tiny"], "q": 4, "q_eff": 3, "grammar_file": str(tmp_path / name)}),
                         SeedPlan(0))
        assert torch.equal(data.extra["grammar"].M, g.M)
    assert not torch.equal(make_data(cfg, SeedPlan(0)).extra["grammar"].M, g.M)  # the seeded grammar differs
    with pytest.raises(BiasgenError, match="shape"):
        make_data(HierarchyConfig(**{**PRESETS["tiny"], "grammar_file": str(tmp_path / "M.npy")}), SeedPlan(0))  # q=6
    with pytest.raises(BiasgenError, match="does not exist"):
        make_data(HierarchyConfig(**{**PRESETS["tiny"], "grammar_file": str(tmp_path / "none.npy")}), SeedPlan(0))


def test_paper_preset_trains_as_the_authors_code():
    cfg = HierarchyConfig(**{**PRESETS["paper"], "device": "cpu"})
    assert cfg.grad_clip is None and cfg.lr_schedule == "halve-cosine" and cfg.ema_decay is None
