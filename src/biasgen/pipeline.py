"""One twin pipeline for every experiment: data -> splits -> models -> training -> evaluation -> onset -> summary.

An experiment is a :class:`TwinExperiment` subclass that says only what is
specific to it: how to load data and cut splits, the network and its loss, how
to evaluate all models at one checkpoint, which curves locate the taus, and its
figures. :func:`run_experiment` does everything else, the same way for all:
the run folder (refusing to mix two runs), parallel training and parallel
checkpoint evaluation (worker processes here, or Ray tasks on several GPUs or
machines: docs/scale-out.md; what every job needs is sent to each worker
once), resume after a kill, atomic writes, progress bars, timing, and the
shared part of ``summary.json`` (verdict, taus, window, advice, models, seeds,
sampler, config, versions).

    class MyExperiment(TwinExperiment):
        kind = "my-experiment"
        config_class, presets = MyConfig, {"default": {}}
        def load(self): ...                       # -> Data(train=[...], description={...}, ...)
        def network(self, data): ...              # -> (model class, constructor kwargs)
        def loss(self): ...                       # -> a picklable loss(model, x0_batch, generator)
        def evaluate(self, models, shared): ...   # -> (metrics record, {name: tensor} to store)
        def curves(self, records): ...            # -> {"tau_bias": ..., "tau_loss": ...}
    summary = run_experiment(MyExperiment(cfg), "runs/mine")

docs/pipeline.md walks through a complete small definition.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from .checkpoint import save_tensors
from .config import TwinConfig, build_config, config_defaults
from .jobs import Backend, torch_threads
from .memorization import memorization_onset
from .report import write_report
from .report.kinds import ReportView
from .onset import checkpoint_minimum, public_tau
from .verdict import VerdictBlock, judge
from .errors import BiasgenError
from .runs import (STEP, RunLock, append_jsonl, check_out, environment, open_run_dir, progress_bar, read_json,
                   read_jsonl, write_json)
from .sampler import is_paper_sampler
from .seeds import SeedPlan
from .training import LossFn, checkpoint_stem, checkpoint_steps
from .twins import load_model, make_members, model_pairs, train_members


@dataclass
class Data:
    """What an experiment's :meth:`TwinExperiment.load` returns."""

    train: list[torch.Tensor]  # one training set per split, (n, ...) each
    test: torch.Tensor  # held-out examples (n_test, ...)
    description: dict  # summary.json's "data" block (sources, sizes, duplicates)
    extra: dict = field(default_factory=dict)  # anything else the experiment needs later (a grammar, a mean image)


@dataclass
class Curve:
    """A table whose checkpoint minimum locates one tau: ``table`` is ``(n_units, n_checkpoints)``."""

    table: torch.Tensor
    reduce: str  # "median" or "mean" over units
    units: str  # what a unit is, for the summary ("twin pairs", "test examples", ...)


@dataclass
class Shared:
    """Everything one checkpoint evaluation needs besides its step: sent to each worker once."""

    experiment: "TwinExperiment"
    run: Path
    members: list[tuple[int, int]]
    model_class: type
    model_kwargs: dict
    reference: Any  # the experiment's precomputed evaluation inputs (see TwinExperiment.reference)


def metric_table(records: list[dict], key: str, column: int | None = None) -> torch.Tensor:
    """``(n_units, n_ckpt)`` float64 table of a per-unit metric of ``metrics.jsonl`` records.

    ``records[c][key]`` is a list with one value per unit (pair, model, example); ``column`` picks
    one entry when each unit holds a list (e.g. ``oracle_kl``: one value per k).
    """
    rows = [r[key] if column is None else [u[column] for u in r[key]] for r in records]
    return torch.tensor(rows, dtype=torch.float64).T


class TwinExperiment:
    """The definition of one kind of twin experiment; see the module docstring."""

    kind: ClassVar[str]  # run.json's "kind" and the CLI subcommand
    config_class: ClassVar[type[TwinConfig]]
    presets: ClassVar[dict[str, dict]]
    default_preset: ClassVar[str] = "default"
    default_out: ClassVar[str] = "runs/experiment"
    help: ClassVar[str] = ""
    memorization_rule: ClassVar[str] = "not measured"  # what counts as a memorized sample, for people
    # what a sampler other than the paper's may change, for the note in the verdict of such a run
    sampler_caveat: ClassVar[str] = "every quantity computed from samples may differ from the paper's answer"
    # how report.html shows a run (captions, table columns, gallery); None: every metric, figures by file name
    report_view: ClassVar[ReportView | None] = None
    # every model starts from one set of weights (twin fine-tunes of one base): the twin distance starts at zero,
    # so the judge ignores its minimum and decides on the contrast with same-split controls alone
    shared_start: ClassVar[bool] = False
    # biasgen sweep presets, name -> {"sizes", "steps_per_image", "experiment_preset", "settings"} (each optional;
    # see biasgen.sweep); the first is the default of `biasgen sweep --kind KIND`
    sweep_presets: ClassVar[dict[str, dict]] = {}

    def __init__(self, cfg: TwinConfig):
        self.cfg = cfg
        self.seeds = SeedPlan(cfg.seed, cfg.same_init)

    @classmethod
    def from_settings(cls, preset: str | None = None, config: str | Path | None = None, **settings) -> "TwinExperiment":
        """The experiment of a preset, a TOML file and keyword settings (in that order of precedence)."""
        return cls(build_config(cls.config_class, cls.presets, preset or cls.default_preset, config, settings))

    # -- what every experiment defines -------------------------------------------------------------
    def load(self) -> Data:
        """Load or generate the data and cut ``cfg.splits`` disjoint training splits and a test set."""
        raise NotImplementedError

    def network(self, data: Data) -> tuple[type, dict]:
        """``(model class, constructor kwargs)``; the class knows nothing of the noise schedule."""
        raise NotImplementedError

    def loss(self) -> LossFn:
        """The training loss ``loss(model, x0_batch, generator) -> scalar``, picklable (it is sent to worker processes):
        e.g. :class:`biasgen.losses.EpsMSELoss`."""
        raise NotImplementedError

    def training_data(self, data: Data) -> list:
        """What each split's models train on, one per split, indexable like a tensor; default: ``data.train``
        (a conditional experiment pairs each example with its label, e.g. :class:`biasgen.losses.Labelled`)."""
        return data.train

    def reference(self, data: Data, members: list[tuple[int, int]]) -> Any:
        """Evaluation inputs computed once per run (frozen noise, exact references); default: the data."""
        return data

    def evaluate(self, models: list[torch.nn.Module], shared: Shared) -> tuple[dict, dict[str, torch.Tensor]]:
        """Evaluate every model at one checkpoint: ``(metrics record, tensors to keep)``.

        The tensors (e.g. ``{"samples": (M, n_samples, ...)}``) are stored under ``samples/`` per step.
        """
        raise NotImplementedError

    def curves(self, records: list[dict]) -> dict[str, Curve]:
        """The curves the verdict is judged on, by name.

        ``tau_bias``: rows = twin pairs in :func:`biasgen.twins.model_pairs` order, larger = more different;
        ``tau_loss``: rows = test examples (or models); ``control`` (when the run has same-split pairs):
        rows = control pairs. Any other entry is one more tau located at its curve's minimum.
        """
        raise NotImplementedError

    def summarize(self, records: list[dict], data: Data, reference: Any, judged: dict) -> dict:
        """The experiment-specific part of ``summary.json`` (``judged``: the verdict part, taus included)."""
        return {}

    def further_verdicts(self, records: list[dict], members: list[tuple[int, int]]) -> dict:
        """More verdict blocks of ``summary.json`` judged from the records alone, by key (e.g. ``"guidance"``: one
        verdict per guidance scale); ``biasgen judge --write`` rewrites them with the main verdict. Default: none."""
        return {}

    def prepare(self, run: Path, data: Data, progress: bool) -> None:
        """Work done once per run inside its locked folder ``run`` before the models train (e.g. pretraining the
        shared base of twin fine-tunes); it must resume after a kill. Default: none."""

    def plot(self, run: Path, records: list[dict], summary: dict, data: Data) -> None:
        """Write the experiment's figures ``fig_*.png`` into ``run``."""

    def terminal_lines(self, summary: dict) -> list[str]:
        """Extra lines of the terminal summary."""
        return []

    def largest_size(self) -> int | None:
        """The largest training-set size per split the data holds with ``cfg.splits`` splits and ``cfg.n_test``
        test examples (``biasgen sweep`` refuses larger sizes); default: None, no limit (generated data)."""
        return None

    def memorized_share(self, records: list[dict]) -> list[dict] | None:
        """Per checkpoint ``{"step", "share", "ci": [lo, hi], "key"}``: the share of generated samples that copy a
        training example, with its 95% interval, and the ``metrics.jsonl`` key it was read from
        (``memorization_rule`` says what it counts); it locates tau_mem (:mod:`biasgen.memorization`).
        Default: not measured."""
        return None

    validated_samplers: tuple[str, ...] = ()  # sampler names measured to agree with the paper's (docs/samplers.md)

    def sampler_validated(self, name: str) -> bool:
        """Whether the cheaper sampler ``name`` (e.g. ``'ddpm-1000-hold300x4'``) was measured to give the decisions
        of the paper's all-T DDPM sampler in this experiment's setting (``validated_samplers``; docs/samplers.md).
        A run with a sampler that was not gets a note in its verdict reason."""
        return name in self.validated_samplers


def run_experiment(experiment: TwinExperiment, out: str | Path, *, resume: bool = False, force: bool = False,
                   progress: bool = True, inputs: tuple[str | Path, ...] = ()) -> dict:
    """Run (or resume) ``experiment`` in the folder ``out``; returns ``summary.json`` as a dict.

    The run holds the folder's lock throughout (:class:`biasgen.runs.RunLock`); ``out`` may not overlap the
    config's input paths (:meth:`TwinConfig.input_paths`) or the further ``inputs`` (e.g. the ``--config`` file).
    """
    cfg = experiment.cfg
    inputs = (*cfg.input_paths(), *inputs)
    check_out(out, inputs, force=force)  # before the (possibly long) data loading
    backend = cfg.job_backend
    with torch_threads(cfg.threads), backend.session():
        started = time.time()
        data = experiment.load()
        with open_run_dir(out, dataclasses.asdict(cfg), resume=resume, force=force, kind=experiment.kind,
                          runtime_keys=cfg.RUNTIME_KEYS, inputs=inputs, defaults=config_defaults(cfg)) as run:
            return _train_and_evaluate(experiment, run.resolve(), data, backend, started, progress)


def _train_and_evaluate(experiment: TwinExperiment, run: Path, data: Data, backend: Backend, started: float,
                        progress: bool) -> dict:
    """The body of :func:`run_experiment` in the prepared, locked, absolute run folder ``run``."""
    cfg = experiment.cfg
    backend.check_shared_storage(run)
    members = make_members(cfg.splits, cfg.seeds_per_split)
    steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)
    experiment.prepare(run, data, progress)
    model_class, model_kwargs = experiment.network(data)

    t0 = time.time()
    meta = {"config": dataclasses.asdict(cfg), "model": model_kwargs, "environment": environment()}
    train_members(model_class, model_kwargs, experiment.loss(), experiment.training_data(data), members, run / "models",
                  seeds=experiment.seeds, meta=meta, backend=backend, device=cfg.device, progress=progress,
                  steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, checkpoints=steps,
                  grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, lr_schedule=cfg.lr_schedule)
    training_s = time.time() - t0

    t0 = time.time()
    shared = Shared(experiment, run, members, model_class, model_kwargs, experiment.reference(data, members))
    evaluate_checkpoints(shared, steps, backend, progress)
    evaluation_s = time.time() - t0

    records = sorted(read_jsonl(run / "metrics.jsonl", STEP), key=lambda r: r["step"])
    summary = summarize(experiment, records, data, shared.reference, members, complete=len(records) == len(steps))
    summary["timing"] = {"wall_s_this_invocation": round(time.time() - started, 1),
                         "training_s_this_invocation": round(training_s, 1),
                         "evaluation_s_this_invocation": round(evaluation_s, 1)}
    write_json(run / "summary.json", summary)
    experiment.plot(run, records, summary, data)
    write_report(run)
    return summary


def evaluate_checkpoints(shared: Shared, steps: list[int], backend: Backend, progress: bool) -> None:
    """Evaluate every checkpoint not yet in ``metrics.jsonl`` on ``backend`` (local workers at a time, or as Ray
    places them), appending in step order."""
    metrics = shared.run / "metrics.jsonl"
    done = {r["step"] for r in read_jsonl(metrics, STEP)}
    todo = [step for step in steps if step not in done]
    order, pending = list(todo), {}
    results = backend.run(_evaluate_step, todo, shared)
    for step, record in progress_bar(results, progress, "evaluating checkpoints", len(todo)):
        pending[step] = record
        while order and order[0] in pending:  # keep metrics.jsonl in step order
            append_jsonl(metrics, {"step": order[0], **pending.pop(order.pop(0))})
            write_report(shared.run)  # marked "in progress: k of C checkpoints" until the summary exists


def _evaluate_step(step: int, shared: Shared) -> tuple[int, dict]:
    """Load every model at ``step``, evaluate them, and store the kept tensors (a worker-process job)."""
    cfg = shared.experiment.cfg
    models = [load_model(shared.model_class, shared.model_kwargs, checkpoint_stem(shared.run / "models" / f"model{m}", step),
                         cfg.device) for m in range(len(shared.members))]
    with torch.no_grad():
        record, keep = shared.experiment.evaluate(models, shared)
    if keep:
        save_tensors(shared.run / "samples" / f"step_{step:07d}", keep,
                     {"step": step, "sampler": cfg.sampler_name, "calls": cfg.sample_step_count, "eta": cfg.eta})
    return step, record


def judge_records(experiment: TwinExperiment, records: list[dict], members: list[tuple[int, int]],
                  sampler: dict | None = None) -> VerdictBlock:
    """The verdict part of ``summary.json`` from ``metrics.jsonl`` records alone (``biasgen judge`` reruns it).

    ``sampler``: the run's :func:`sampler_summary` when the caller has it (default: computed here); the
    reason notes a sampler not validated against the paper's.

    The twin curve, the control curve (when the experiment has same-split pairs), the test loss and the members
    go to :func:`biasgen.verdict.judge` (which also runs the negative controls and their placebo gate); any further
    curve of the experiment (e.g. ``tau_nn``) is located with :func:`biasgen.onset.checkpoint_minimum`.
    """
    cfg, seeds = experiment.cfg, experiment.seeds
    steps = [r["step"] for r in records]
    curves = experiment.curves(records)
    twins, controls = model_pairs(members)
    control = curves.get("control")
    judged: VerdictBlock = judge(steps, curves["tau_bias"].table, twins, curves["tau_loss"].table,
                                 control.table if control else None, controls if control else None,
                                 members=members, n_boot=cfg.n_boot, seed=seeds.bootstrap(),
                                 shared_start=experiment.shared_start)
    others = {name: public_tau(checkpoint_minimum(steps, c.table, n_boot=cfg.n_boot, seed=seeds.bootstrap(i + 1),
                                                  reduce=c.reduce))
              for i, (name, c) in enumerate(curves.items()) if name not in ("tau_bias", "tau_loss", "control")}
    sampler = sampler or sampler_summary(cfg, experiment.sampler_validated)
    if not sampler["validated"]:
        judged["reason"] += (f" Note: sampled with {sampler['name']}, which was not validated against the paper's "
                             f"{cfg.T}-step DDPM sampler (docs/samplers.md): {experiment.sampler_caveat}.")
    share = experiment.memorized_share(records)
    if share is not None:
        judged["tau_mem"] = memorization_onset(share)
    return {
        **judged,
        **others,
        "units": {name: c.units for name, c in curves.items()},
    }


def rejudge(run_dir: str | Path, experiments: dict[str, type[TwinExperiment]], *,
            write: bool = False) -> tuple[dict, list[str]]:
    """Judge a run again from its ``run.json`` and ``metrics.jsonl`` alone (no models, no data).

    With ``write``, the verdict part of ``summary.json`` (with the experiment's further verdicts) is replaced
    (and ``report.html`` rebuilt);
    a run without ``summary.json`` (killed mid-way) is judged on the checkpoints evaluated so far.
    ``experiments``: kind -> TwinExperiment class (the built-in ones: :func:`biasgen.experiments.experiments`).
    Returns the judgement and the experiment's extra terminal lines (e.g. one per guidance scale; none for a
    run without ``summary.json``).
    """
    run = Path(run_dir)
    if not (run / "run.json").exists():
        raise BiasgenError(f"{run} holds no biasgen run (no run.json); pass the --out folder of a run.")
    info = read_json(run / "run.json", keys=("kind", "config"))
    table = experiments
    if info.get("kind") not in table:
        raise BiasgenError(f"{run} holds a {info.get('kind')!r} run; biasgen judge knows {', '.join(table)}.")
    exp_class = table[info["kind"]]
    if not isinstance(info["config"], dict):
        raise BiasgenError(f"{run / 'run.json'} holds no config object; restore the file from a copy.")
    config = {**info["config"], "device": "cpu"}  # judging needs no device; the run may have used a GPU
    experiment = exp_class(build_config(exp_class.config_class, {}, None, None, config))
    records = sorted(read_jsonl(run / "metrics.jsonl", STEP), key=lambda r: r["step"])
    if not records:
        raise BiasgenError(f"{run} has no evaluated checkpoint yet (metrics.jsonl is empty); nothing to judge.")
    members = make_members(experiment.cfg.splits, experiment.cfg.seeds_per_split)
    judged = {**judge_records(experiment, records, members), **experiment.further_verdicts(records, members)}
    if not (run / "summary.json").exists():
        return judged, []
    summary = {**read_json(run / "summary.json"), **judged}
    if write:
        with RunLock(run):  # not while the run itself writes
            write_json(run / "summary.json", summary)
            write_report(run)
    return judged, experiment.terminal_lines(summary)


def summarize(experiment: TwinExperiment, records: list[dict], data: Data, reference: Any,
              members: list[tuple[int, int]], complete: bool) -> dict:
    """``summary.json``: the verdict, taus and advice (:func:`judge_records`), then the experiment's own part."""
    cfg, seeds = experiment.cfg, experiment.seeds
    sampler = sampler_summary(cfg, experiment.sampler_validated)
    judged = judge_records(experiment, records, members, sampler)
    twins, controls = model_pairs(members)
    return {
        **judged,
        **experiment.further_verdicts(records, members),
        **experiment.summarize(records, data, reference, judged),
        "checkpoints": [r["step"] for r in records],
        "complete": complete,
        "models": [{"model": m, "split": s, "split_seed": k} for m, (s, k) in enumerate(members)],
        "n_twin_pairs": len(twins),
        "n_control_pairs": len(controls),
        "sampler": sampler,
        "data": data.description,
        "config": dataclasses.asdict(cfg),
        "seeds": seeds.describe(len(members)),
        "environment": environment(),
    }


def sampler_summary(cfg: TwinConfig, validated: Callable[[str], bool]) -> dict:
    """``summary.json``'s "sampler" block; ``validated`` is true for the paper's all-T DDPM and where ``validated(name)``."""
    name = cfg.sampler_name
    paper = is_paper_sampler(cfg.sampler, cfg.sample_steps, cfg.T, cfg.hold_every)
    return {"method": cfg.sampler, "steps": cfg.T if cfg.sample_steps is None else cfg.sample_steps,
            "spacing": cfg.sample_spacing, "hold_above": cfg.hold_above, "hold_every": cfg.hold_every,
            "calls": cfg.sample_step_count, "eta": cfg.eta, "name": name, "validated": paper or validated(name)}


def terminal_summary(experiment: TwinExperiment, summary: VerdictBlock, out: Path) -> str:
    """A few lines for the terminal: the verdict, the taus with their intervals, the window and the advice."""
    def tau(name: str) -> str:
        t = summary[name]
        return f"step {t['step']:>6}  (68% interval {t['ci'][0]}..{t['ci'][1]}, over {t['n_units']} {summary['units'][name]})"

    window = "not defined: the models start from one set of weights (read tau_data)" if summary.get("shared_start") \
        else "none"
    if summary["window"]:
        window = f"steps {summary['window'][0]}..{summary['window'][1]}"
        if summary["tau_loss_open"]:
            window += " and beyond (the test loss was still falling at the end)"
    return "\n".join([
        f"biasgen {experiment.kind}: {summary['verdict']}",
        f"  tau_bias (twins agree most)  = {tau('tau_bias')}"
        + ("  (not meaningful: the models start from one set of weights)" if summary.get("shared_start") else ""),
        *([f"  tau_data (data-specific onset) = step {summary['tau_data']['step']:>6}  (68% interval "
           f"{summary['tau_data']['ci'][0]}..{summary['tau_data']['ci'][1]}, from the contrast's checkpoint noise)"]
          if summary.get("tau_data") else []),
        f"  tau_loss (test-loss minimum) = {tau('tau_loss')}",
        *([f"  tau_mem (copies appear)     = {describe_tau_mem(summary['tau_mem'])}"] if "tau_mem" in summary else []),
        *[f"  {line}" for line in experiment.terminal_lines(summary)],
        f"  biased window: {window}",
        "  test loss at each candidate: " + ", ".join(f"{name} (step {c['step']}) {c['test_loss']:.4g}"
                                                      for name, c in summary["candidate_costs"].items()),
        f"  recommended stopping checkpoint: step {summary['recommended_step']} — {summary['recommendation']}",
        f"  why: {summary['reason']}",
        f"  results in {out}: summary.json, metrics.jsonl, fig_*.png",
    ])


def describe_tau_mem(tau: dict) -> str:
    """tau_mem for people: the onset step with its first sign, or the bound when copies never clearly appear."""
    if tau["bound"] == "lower":
        return f"not reached: no clear copies up to step {tau['value']} (share {tau['share_last']:.3f} at the end)"
    share = f"share {tau['share_at_onset']:.3f}, 95% CI {tau['share_at_onset_ci'][0]:.3f}..{tau['share_at_onset_ci'][1]:.3f}"
    if tau["bound"] == "upper":
        return f"at or before the first checkpoint, step {tau['value']} ({share})"
    return f"step {tau['step']:>6}  (first copies at step {tau['ci'][0]}; {share})"
