"""Config resolution (defaults < preset < TOML < flags), run folders and checkpoints."""
import dataclasses

import pytest
import torch

from biasgen.images.audit import PRESETS, AuditConfig, ImageAudit
from biasgen.checkpoint import load_checkpoint, save_checkpoint
from biasgen.config import build_config, coerce
from biasgen.errors import BiasgenError
from biasgen.pipeline import sampler_summary
from biasgen.runs import append_jsonl, prepare_run_dir, read_jsonl, with_defaults, write_json


def test_resolution_order(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 77\nlr = 0.01\nchannel-mults = [1, 2]\n')
    cfg = build_config(AuditConfig, PRESETS, "tiny", toml, {"lr": "0.5", "grayscale": "true"})
    assert cfg.n == PRESETS["tiny"]["n"]  # from the preset
    assert cfg.steps == 77  # TOML over preset
    assert cfg.lr == 0.5  # flag over TOML
    assert cfg.grayscale is True and cfg.channel_mults == (1, 2)
    assert build_config(AuditConfig, PRESETS, None).steps == AuditConfig().steps


def test_coercion_of_flag_strings():
    assert coerce(AuditConfig, "score_ts", "50,100") == (50, 100)
    assert coerce(AuditConfig, "ema_decay", "none") is None
    assert coerce(AuditConfig, "resolution", "16") == 16
    cfg = build_config(AuditConfig, PRESETS, "default", None, {"sampler": "ddpm", "sample_steps": "none",
                                                               "hold_every": "1"})
    assert cfg.sample_steps is None and cfg.sample_step_count == cfg.T  # none: all T steps
    with pytest.raises(BiasgenError, match="Bad value 'abc' for 'n'"):
        coerce(AuditConfig, "n", "abc")


@pytest.mark.parametrize("overrides, message", [
    ({"splits": 1}, "at least 2"),
    ({"lr": -1}, "--lr must be positive"),
    ({"n": 0}, "--n must be at least 1"),
    ({"sampler": "euler"}, "--sampler must be ddpm or ddim"),
    ({"sample_steps": 1001}, "--sample-steps must be in"),
    ({"sampler": "ddpm", "eta": 0.5}, "--eta is a DDIM setting"),
    ({"eta": 2}, r"--eta must be in \[0, 1\]"),
    ({"score_ts": "0,5000"}, "--score-ts"),
    ({"dropout": 1.5}, "--dropout"),
    ({"nonsense": 1}, "Unknown setting"),
])
def test_out_of_range_values_are_refused(overrides, message):
    with pytest.raises(BiasgenError, match=message):
        build_config(AuditConfig, PRESETS, "default", None, overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_paper_preset_without_gpu_says_how_to_run_on_cpu():
    with pytest.raises(BiasgenError, match="--device cuda is not available.*--device cpu"):
        build_config(AuditConfig, PRESETS, "paper")
    assert build_config(AuditConfig, PRESETS, "paper", None, {"device": "cpu"}).n == 1024


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(BiasgenError, match="Unknown preset 'huge'.*default"):
        build_config(AuditConfig, PRESETS, "huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(BiasgenError, match="not valid TOML"):
        build_config(AuditConfig, PRESETS, None, bad)
    with pytest.raises(BiasgenError, match="does not exist"):
        build_config(AuditConfig, PRESETS, None, tmp_path / "missing.toml")


def test_run_folder_refuses_foreign_runs(tmp_path):
    cfg = dataclasses.asdict(AuditConfig())
    out = tmp_path / "run"
    prepare_run_dir(out, cfg, resume=False, force=False, kind="audit")
    with pytest.raises(BiasgenError, match="already holds this run.*--resume"):
        prepare_run_dir(out, cfg, resume=False, force=False, kind="audit")
    assert prepare_run_dir(out, cfg, resume=True, force=False, kind="audit") == out
    other = {**cfg, "n": 3}
    with pytest.raises(BiasgenError, match="different audit run .*differs in: n"):
        prepare_run_dir(out, other, resume=True, force=False, kind="audit")
    prepare_run_dir(out, other, resume=False, force=True, kind="audit")  # --force starts over
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(BiasgenError, match="holds no biasgen run"):
        prepare_run_dir(stranger, cfg, resume=True, force=False, kind="audit")
    assert (stranger / "notes.txt").exists()


def test_a_run_written_before_a_setting_existed_resumes_with_its_default(tmp_path):
    cfg = dataclasses.asdict(AuditConfig())
    old = {k: v for k, v in cfg.items() if k != "sample_spacing"}  # run.json of an older biasgen
    defaults = {"sample_spacing": "uniform"}
    prepare_run_dir(tmp_path / "run", old, resume=False, force=False, kind="audit")
    assert prepare_run_dir(tmp_path / "run", cfg, resume=True, force=False, kind="audit", defaults=defaults)
    with pytest.raises(BiasgenError, match="differs in: sample_spacing"):  # without the default it looks changed
        prepare_run_dir(tmp_path / "run", cfg, resume=True, force=False, kind="audit")
    with pytest.raises(BiasgenError, match="differs in: sample_spacing"):  # and a new value is a different run
        prepare_run_dir(tmp_path / "run", {**cfg, "sample_spacing": "quadratic"}, resume=True, force=False,
                        kind="audit", defaults=defaults)


def test_defaults_fill_only_missing_settings_the_new_config_has_also_when_nested():
    old = {"a": 1, "settings": {"x": 1}}
    new = {"a": 2, "b": 3, "settings": {"x": 1, "y": 5}}
    defaults = {"b": 0, "c": 9, "settings": {"y": 4, "z": 7}}
    assert with_defaults(old, new, defaults) == {"a": 1, "b": 0, "settings": {"x": 1, "y": 4}}


def test_jsonl_and_json_roundtrip(tmp_path):
    append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    append_jsonl(tmp_path / "m.jsonl", {"step": 2})
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
    write_json(tmp_path / "s.json", {"a": [1, 2]})
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{"ste')
    with pytest.raises(BiasgenError, match="bad.jsonl line 2 is cut off mid-record.*remove that line.*--resume"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    a = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "ck", a, {"step": 5})
    b = torch.nn.Linear(3, 2)
    assert load_checkpoint(tmp_path / "ck", b)["step"] == 5
    torch.testing.assert_close(a.weight, b.weight)
    with pytest.raises(BiasgenError, match="does not fit this model"):
        load_checkpoint(tmp_path / "ck", torch.nn.Linear(4, 2))
    with pytest.raises(BiasgenError, match="missing"):
        load_checkpoint(tmp_path / "nothing", b)


def test_summary_names_the_sampler_and_whether_it_was_validated():
    paper = build_config(AuditConfig, PRESETS, "default", None, {"hold_every": 1})
    never = lambda name: False
    assert sampler_summary(paper, never) == {"method": "ddpm", "steps": 1000, "spacing": "uniform", "hold_above": 300,
                                             "hold_every": 1, "calls": 1000, "eta": 0.0, "name": "ddpm-1000",
                                             "validated": True}
    held = build_config(AuditConfig, PRESETS, "default", None, {})
    assert sampler_summary(held, never) == {"method": "ddpm", "steps": 1000, "spacing": "uniform", "hold_above": 300,
                                            "hold_every": 4, "calls": 475, "eta": 0.0, "name": "ddpm-1000-hold300x4",
                                            "validated": False}
    assert sampler_summary(held, ImageAudit(held).sampler_validated)["validated"]
    assert not sampler_summary(build_config(AuditConfig, PRESETS, "default", None, {"hold_every": 8}),
                               ImageAudit(held).sampler_validated)["validated"]  # only the measured setting
    quadratic = build_config(AuditConfig, PRESETS, "default", None, {"sample_steps": 250, "sample_spacing": "quadratic",
                                                                     "hold_every": 1})
    assert sampler_summary(quadratic, never) == {"method": "ddpm", "steps": 250, "spacing": "quadratic", "hold_above": 300,
                                                 "hold_every": 1, "calls": 234, "eta": 0.0,
                                                 "name": "ddpm-250-quadratic", "validated": False}
    cheap = build_config(AuditConfig, PRESETS, "tiny", None, {"sampler": "ddim", "sample_steps": 50, "eta": 1})
    assert sampler_summary(cheap, never)["name"] == "ddim-50-eta1" and not sampler_summary(cheap, never)["validated"]
    assert sampler_summary(cheap, lambda name: name == "ddim-50-eta1")["validated"]
    with pytest.raises(BiasgenError, match="--hold-above must be in"):
        build_config(AuditConfig, PRESETS, "default", None, {"hold_above": 1000})


def test_the_image_and_hierarchy_presets_sample_with_the_papers_sampler_or_a_validated_one():
    """docs/samplers.md: the CPU image presets run the paper's chain with held predictions at high noise, measured
    to give the paper's decisions on their models; the rest use the paper's sampler itself."""
    from biasgen.hierarchy.experiment import PRESETS as HIERARCHY_PRESETS, HierarchyConfig
    never = lambda name: False
    for preset in ("default", "phases", "fashion-mnist"):
        cfg = build_config(AuditConfig, PRESETS, preset, None, {})
        assert cfg.sampler_name == "ddpm-1000-hold300x4" and cfg.sample_step_count == 475 and cfg.n_samples == 48
        assert sampler_summary(cfg, ImageAudit(cfg).sampler_validated)["validated"], preset
    for preset in ("guidance", "paper"):
        cfg = build_config(AuditConfig, PRESETS, preset, None, {"device": "cpu"})
        assert sampler_summary(cfg, never)["validated"] and cfg.sample_step_count == 1000, preset
    from biasgen.images.finetune import PRESETS as FINETUNE_PRESETS, FinetuneConfig, ImageFinetune
    base = {"pretrain": "digits"}  # a fine-tune needs a base to be a valid config
    for preset in ("default", "cpu"):  # fine-tunes were not measured with held predictions
        cfg = build_config(FinetuneConfig, FINETUNE_PRESETS, preset, None, base)
        assert sampler_summary(cfg, never)["validated"] and cfg.sample_step_count == 1000, preset
    held = build_config(FinetuneConfig, FINETUNE_PRESETS, "default", None, {**base, "hold_every": 4})
    assert not ImageFinetune(held).sampler_validated(held.sampler_name)
    guided = build_config(AuditConfig, PRESETS, "default", None, {"conditional": True, "guidance": "0,3"})
    assert guided.sampler_name == "ddpm-1000-hold300x4" and not ImageAudit(guided).sampler_validated(guided.sampler_name)
    for preset in ("cpu", "cpu-depth3"):
        assert sampler_summary(build_config(HierarchyConfig, HIERARCHY_PRESETS, preset, None, {}), never)["validated"]


def test_progress_off_a_terminal_is_one_line_per_interval(monkeypatch, capsys):
    import biasgen.runs as runs

    clock = iter(range(0, 10**6))  # one simulated second per clock read
    monkeypatch.setattr(runs.time, "monotonic", lambda: float(next(clock)))
    bar = runs.progress_bar(None, True, "training", total=2000)  # capsys: stderr is no terminal
    assert isinstance(bar, runs.LineProgress)
    for step in range(2000):
        bar.update(1)
        bar.set_postfix(loss=f"{step:.4f}")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert 2000 // 30 - 1 <= len(lines) <= 2000 // 30 + 2  # ~one line per 30 s of (simulated) time, not per step
    assert lines[-1].startswith("training: 2000/2000 (") and "loss=1999.0000" in lines[-1]
    assert list(runs.progress_bar([1, 2, 3], True, "quick")) == [1, 2, 3]
    assert capsys.readouterr().err.count("\n") <= 1  # a short loop writes at most its closing line
