"""``biasgen sweep``: one twin experiment per training-set size, the phase diagram, and advice for a size N.

    from biasgen.sweep import sweep
    result = sweep("runs/sweep")                                     # the 'default' preset: digits, 4 sizes
    result = sweep("runs/sweep-h", preset="hierarchy-cpu", target_n=5000)
    result = sweep("runs/mine", sizes=[32, 64, 128], steps_per_image=20, data="./faces")   # images of a folder

or from the shell: ``biasgen sweep --sizes 16,32,64,128 --out runs/sweep``. The
sweep folder holds ``run.json`` (kind ``sweep``: the sweep's settings and
versions), one ordinary run folder per size (``n000016/``, ...), each its own
resumable run of the shared twin pipeline, and the results: ``sweep.json``
(per-size rows, power-law fits, the advice for ``--target-n``), ``sweep.jsonl``
(one row per size), ``fig_phase_diagram.png`` and ``report.html`` (the page a
person reads, rebuilt after each size; ``biasgen report OUT``). ``--resume`` continues an
interrupted sweep; sizes whose run is complete are not recomputed. The
definitions (tau_mem, the censored fits, the advice): docs/sweep.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from ..config import add_config_flags, config_defaults, flags_given
from ..errors import BiasgenError, run_command
from ..experiments import experiments
from ..pipeline import TwinExperiment, run_experiment
from ..report import write_report
from ..runs import STEP, environment, open_run_dir, read_json, read_jsonl, with_defaults, write_bytes, write_json
from ..memorization import memorization_onset
from .fit import extrapolate, fit_power_law

TAUS = ("tau_bias", "tau_data", "tau_loss", "tau_mem")

RUNTIME_KEYS = ("preset", "sizes", "target_n", "max_exponent_ci_width", "runtime")  # may change on --resume


@dataclasses.dataclass
class Plan:
    """A resolved sweep: the experiment of each size and the settings that define the sweep."""

    kind: str
    sizes: list[int]
    experiments: list[TwinExperiment]
    config: dict  # run.json's config
    target_n: int | None
    mem_level: float
    max_exponent_ci_width: float


def sweep_presets() -> dict[str, tuple[type[TwinExperiment], dict]]:
    """Every sweep preset by name: ``(its experiment class, its settings)``, from each experiment's ``sweep_presets``
    (:func:`biasgen.experiments.experiments`). A preset's settings: ``sizes``, ``steps_per_image`` (None: the
    experiment's ``steps`` at every size), ``experiment_preset`` (default: the experiment's) and ``settings`` (config
    fields for every size); each optional."""
    table: dict[str, tuple[type[TwinExperiment], dict]] = {}
    for exp_class in experiments().values():
        for name, preset in exp_class.sweep_presets.items():
            if name in table:
                raise BiasgenError(f"Sweep preset {name!r} is defined by both the {table[name][0].kind} and the "
                                   f"{exp_class.kind} experiment; rename one of them.")
            table[name] = (exp_class, preset)
    return table


def resolve_preset(kind: str | None, preset: str | None) -> tuple[type[TwinExperiment], str | None, dict]:
    """The experiment class, the preset's name and its settings for ``--kind``/``--preset`` (either may be None).

    No preset: the first sweep preset of the kind (of the first experiment when no kind is given either), or, for an
    experiment without sweep presets, none (the experiment's default preset; ``--sizes`` is then required).
    """
    table, presets = experiments(), sweep_presets()
    if kind is not None and kind not in table:
        raise BiasgenError(f"Unknown --kind {kind!r}; biasgen sweep knows {', '.join(table)}.")
    if preset is None:
        exp_class = table[kind] if kind is not None else next(iter(table.values()))
        preset = next(iter(exp_class.sweep_presets), None)
        return exp_class, preset, exp_class.sweep_presets.get(preset, {})
    if preset not in presets:
        raise BiasgenError(f"Unknown sweep preset {preset!r}. Available: {', '.join(presets)}.")
    exp_class, settings = presets[preset]
    if kind not in (None, exp_class.kind):
        raise BiasgenError(f"Preset {preset!r} is a {exp_class.kind} sweep but --kind {kind} was given; drop one of them.")
    return exp_class, preset, settings


def plan_sweep(kind: str | None = None, sizes=None, preset: str | None = None, config: str | Path | None = None,
               steps_per_image: float | None = None, target_n: int | None = None, mem_level: float = 0.0,
               max_exponent_ci_width: float = 1.0, **settings) -> Plan:
    """Resolve a sweep's settings and check them all before anything runs (see :func:`sweep`)."""
    exp_class, preset, p = resolve_preset(kind, preset)
    kind = exp_class.kind
    if sizes is None and "sizes" not in p:
        raise BiasgenError(f"The {kind} experiment has no sweep preset: give the sizes, e.g. --sizes 16,32,64.")
    sizes = check_sizes(p["sizes"] if sizes is None else sizes)
    if "n" in settings:
        raise BiasgenError("--n is set per size by --sizes in a sweep; drop --n.")
    if steps_per_image is not None and "steps" in settings:
        raise BiasgenError("Give either --steps (the same budget for every size) or --steps-per-image, not both.")
    spi = steps_per_image if steps_per_image is not None else (None if "steps" in settings else p.get("steps_per_image"))
    if spi is not None and not spi > 0:
        raise BiasgenError(f"--steps-per-image must be positive, got {spi}.")
    merged = {**p.get("settings", {}), **settings}
    experiment_preset = p.get("experiment_preset", exp_class.default_preset)
    base = exp_class.from_settings(experiment_preset, config, **merged, n=1)
    largest = base.largest_size()
    if largest is not None and sizes[-1] > largest:
        raise BiasgenError(f"Size {sizes[-1]} is too large for the data: with {base.cfg.splits} splits and "
                           f"{base.cfg.n_test} test examples the largest size that fits is {largest}.")
    if target_n is not None and target_n < sizes[-1]:
        raise BiasgenError(f"--target-n {target_n} is smaller than the largest size measured ({sizes[-1]}); "
                           "the advice extrapolates to a training set at least as large as the sweep's sizes.")
    steps = {n: max(1, math.ceil(spi * n)) if spi is not None else base.cfg.steps for n in sizes}
    per_size = [exp_class.from_settings(experiment_preset, config, **merged, n=n, steps=steps[n]) for n in sizes]
    stored = json.loads(json.dumps(dataclasses.asdict(base.cfg)))
    runtime = {k: stored.pop(k) for k in base.cfg.RUNTIME_KEYS}
    for k in ("n", "steps"):
        stored.pop(k)
    sweep_config = {"experiment": kind, "preset": preset, "sizes": sizes, "steps_per_image": spi,
                    "steps": None if spi is not None else base.cfg.steps, "mem_level": mem_level,
                    "target_n": target_n, "max_exponent_ci_width": max_exponent_ci_width,
                    "settings": stored, "runtime": runtime}
    return Plan(kind, sizes, per_size, sweep_config, target_n, mem_level, max_exponent_ci_width)


def check_sizes(sizes) -> list[int]:
    """``sizes`` as a strictly increasing list of positive ints (a clear error otherwise)."""
    if isinstance(sizes, str):
        sizes = [s for s in sizes.replace(" ", "").split(",") if s]
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError) as e:
        raise BiasgenError(f"--sizes must be comma-separated integers, e.g. 16,32,64; got {sizes!r}.") from e
    if not sizes or min(sizes) < 1:
        raise BiasgenError(f"--sizes must hold at least one positive size, got {sizes}.")
    if len(set(sizes)) != len(sizes):
        raise BiasgenError(f"--sizes holds a size twice: {sizes}. Give each size once, increasing.")
    if sizes != sorted(sizes):
        raise BiasgenError(f"--sizes must increase: got {sizes}; give them as {sorted(sizes)}.")
    return sizes


def sweep(out: str | Path = "runs/sweep", kind: str | None = None, sizes=None, preset: str | None = None,
          config: str | Path | None = None, *, steps_per_image: float | None = None, target_n: int | None = None,
          mem_level: float = 0.0, max_exponent_ci_width: float = 1.0, resume: bool = False, force: bool = False,
          progress: bool = True, **settings) -> dict:
    """Run (or resume) a sweep in ``out`` and return ``sweep.json`` as a dict.

    ``kind``: an experiment of :func:`biasgen.experiments.experiments` (default: the preset's); ``sizes``: increasing
    training-set sizes per split; ``preset``: a sweep preset (:func:`sweep_presets`); ``steps_per_image``:
    each size trains ``ceil(steps_per_image * n)`` steps (``None`` with ``steps=...``: the same
    budget for all); ``target_n``: the user's training-set size for the advice; ``mem_level``:
    tau_mem is the first checkpoint from which the 95% lower bound of the memorized share stays above it;
    ``settings``: fields of the experiment's config.
    """
    started = time.time()
    plan = plan_sweep(kind, sizes, preset, config, steps_per_image, target_n, mem_level, max_exponent_ci_width,
                      **settings)
    inputs = (*plan.experiments[0].cfg.input_paths(), *([config] if config else []))
    defaults = {"settings": config_defaults(plan.experiments[0].cfg)}  # a sweep of an older biasgen resumes
    with open_run_dir(out, plan.config, resume=resume, force=force, kind="sweep", runtime_keys=RUNTIME_KEYS,
                      inputs=inputs, defaults=defaults) as out:
        rows, timing = [], {}
        for n, experiment in zip(plan.sizes, plan.experiments):
            folder = out / f"n{n:06d}"
            summary = completed_summary(folder, experiment)
            if summary is None:
                t0 = time.time()
                summary = run_experiment(experiment, folder, resume=True, progress=progress)
                timing[str(n)] = round(time.time() - t0, 1)
            rows.append(size_row(n, folder, summary, read_jsonl(folder / "metrics.jsonl", STEP), plan, experiment))
            write_bytes(out / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
            write_report(out)  # "in progress: k of K sizes" until sweep.json exists
        result = assemble(plan, rows)
        result["timing"] = {"wall_s_this_invocation": round(time.time() - started, 1), "wall_s_per_size_run": timing}
        from .figure import plot_phase_diagram

        plot_phase_diagram(out / "fig_phase_diagram.png", result)
        for w in rows[0].get("guidance", {}):  # one phase diagram per guidance scale
            at_w = assemble(plan, [{**r, **r["guidance"][w]} for r in rows])
            plot_phase_diagram(out / f"fig_phase_diagram_w{w}.png", at_w)
            result.setdefault("guidance", {})[w] = {"rows": [{"n": r["n"], **r["guidance"][w]} for r in rows],
                                                    "fits": at_w["fits"], "target": at_w["target"]}
        write_json(out / "sweep.json", result)
        write_report(out)
        return result


def completed_summary(folder: Path, experiment: TwinExperiment) -> dict | None:
    """The size's ``summary.json`` when its run is complete and has this size's config, else ``None``."""
    if not (folder / "summary.json").exists():
        return None
    summary = read_json(folder / "summary.json", fix="Delete that file, then continue with --resume: the size's "
                        "summary is rebuilt from its metrics and models, which are kept.")
    want = json.loads(json.dumps(dataclasses.asdict(experiment.cfg)))
    runtime = experiment.cfg.RUNTIME_KEYS
    stored = with_defaults(summary.get("config", {}), want, json.loads(json.dumps(config_defaults(experiment.cfg))))
    same = all(stored.get(k) == v for k, v in want.items() if k not in runtime)
    return summary if summary.get("complete") is True and same else None


def located_tau(tau: dict, checkpoints: list[int]) -> dict:
    """A summary tau as a sweep entry: the step when located inside the run, else a bound.

    A minimum at the last checkpoint (the curve still falling) means tau lies at or after it:
    a lower bound; a minimum at the first checkpoint means tau lies at or before it: an upper bound.
    """
    entry = {"step": tau["step"], "ci": tau["ci"], "ci95": tau.get("ci95"), "located": True, "bound": None,
             "value": tau["step"]}
    if tau["index"] == len(checkpoints) - 1:
        entry.update(step=None, located=False, bound="lower", value=checkpoints[-1])
    elif tau["index"] == 0:
        entry.update(step=None, located=False, bound="upper", value=checkpoints[0])
    return entry


def onset_tau(summary: dict, checkpoints: list[int]) -> dict | None:
    """The size's tau_data as a sweep entry (None without same-split controls): located when the contrast has
    risen by the end of the run (``p_value_end`` at most the run's level), else a lower bound at the last
    checkpoint (no data-specific rise yet); an onset at the first checkpoint is an upper bound."""
    tau = summary.get("tau_data")
    if not tau:
        return None
    p_end = summary.get("p_value_end")
    if p_end is None or p_end > summary.get("level", 0.05):
        return {"step": None, "ci": None, "ci95": None, "located": False, "bound": "lower", "value": checkpoints[-1]}
    return located_tau(tau, checkpoints)


def size_row(n: int, folder: Path, summary: dict, records: list[dict], plan: Plan, experiment: TwinExperiment) -> dict:
    """One row of ``sweep.jsonl``: the taus of size ``n`` (each a step or a bound), its verdict and advice.

    tau_mem is located at the sweep's own ``mem_level`` (the run's summary uses level 0); it is None (and so is
    ``mem_share``) for an experiment that does not measure copies (no ``memorized_share``)."""
    steps = summary["checkpoints"]
    share = experiment.memorized_share(records)
    row = {"n": n, "steps": steps[-1], "folder": folder.name, "verdict": summary["verdict"],
           "reason": summary["reason"], "recommended_step": summary["recommended_step"],
           "tau_bias": located_tau(summary["tau_bias"], steps), "tau_data": onset_tau(summary, steps),
           "tau_loss": located_tau(summary["tau_loss"], steps),
           "tau_mem": memorization_onset(share, plan.mem_level) if share else None,
           "mem_share": share[0]["key"] if share else None,
           "tau_loss_open": summary["tau_loss_open"], "checkpoints": steps, "complete": summary["complete"]}
    if "guidance" in summary:  # class-conditional twins: tau_bias and tau_mem per guidance scale (docs/guidance.md)
        from ..images.conditional import at_scale

        row["guidance"] = {w: {"verdict": judged["verdict"], "tau_bias": located_tau(judged["tau_bias"], steps),
                               "tau_data": onset_tau(judged, steps),
                               "tau_mem": memorization_onset(experiment.memorized_share(at_scale(records, float(w))),
                                                             plan.mem_level)}
                           for w, judged in summary["guidance"]["per_scale"].items()}
    return row


def fit_taus(done: list[dict], kind: str) -> dict[str, dict]:
    """A censored power-law fit (:func:`biasgen.sweep.fit.fit_power_law`) of each tau over the complete rows ``done``.

    The scatter floor is the resolution of the rows' log-spaced checkpoint grid (a uniform error over one log step).
    A tau missing from a row (tau_data without same-split controls) is not fitted."""
    grid = [math.log(r["checkpoints"][-1] / r["checkpoints"][0]) / max(1, len(r["checkpoints"]) - 1) for r in done]
    floor = max(0.02, (sum(grid) / len(grid)) / math.sqrt(12)) if grid else 0.05
    absent = {"tau_data": "no same-split controls (--seeds-per-split 2 measures tau_data)"}
    return {name: fit_power_law([r["n"] for r in done], [r[name]["value"] for r in done],
                                [r[name]["bound"] or "value" for r in done], sigma_floor=floor)
            if done and all(r.get(name) for r in done) else
            {"fit": False, "reason": "no size measured" if not done else
             absent.get(name, f"not measured by the {kind} experiment")}
            for name in TAUS}


def assemble(plan: Plan, rows: list[dict]) -> dict:
    """``sweep.json``: the rows, a censored power-law fit per tau, and the advice for ``target_n``."""
    done = [r for r in rows if r["complete"]]
    fits = fit_taus(done, plan.kind)
    target = None
    if plan.target_n is not None:
        target = extrapolate(fits, [r["n"] for r in done], plan.target_n, max_ci_width=plan.max_exponent_ci_width)
    return {"kind": "sweep", "experiment": plan.kind, "sizes": plan.sizes, "complete": len(done) == len(plan.sizes),
            "rows": rows, "fits": fits, "target": target,
            "definitions": {
                "tau_bias": "checkpoint of the twin-distance minimum (each size's summary.json)",
                "tau_data": "last checkpoint before the twin-minus-control contrast rises (each size's summary.json); "
                            "a lower bound when the contrast has not risen by the end of the run",
                "tau_loss": "checkpoint of the test-loss minimum (each size's summary.json)",
                "tau_mem": f"first checkpoint from which the 95% lower bound of the memorized share stays above {plan.mem_level}",
                "memorized share": plan.experiments[0].memorization_rule,
                "bounds": "lower: the tau lies after the last checkpoint; upper: at or before the first",
                "fit": "log tau = log c + a log n + sigma z, bounds censored (Tobit), docs/sweep.md"},
            "config": plan.config, "environment": environment()}


def describe_tau(t: dict) -> str:
    """``'211 [142, 211]'``, ``'>= 1500'`` (not reached by the last step), ``'<= 20'`` or ``'not measured'`` (None)."""
    if t is None:
        return "not measured"
    if t["bound"] == "lower":
        return f">= {t['value']}"
    if t["bound"] == "upper":
        return f"<= {t['value']}"
    return f"{t['step']} [{t['ci'][0]}, {t['ci'][1]}]"


def terminal_summary(result: dict, out: Path) -> str:
    """The per-size table, the exponents and the advice, for the terminal."""
    lines = [f"biasgen sweep ({result['experiment']}): {len(result['rows'])} sizes",
             f"  {'n':>7} {'steps':>7}  " + "".join(f"{t:<20}" for t in TAUS) + "verdict"]
    for r in result["rows"]:
        lines.append(f"  {r['n']:>7} {r['steps']:>7}  " + "".join(f"{describe_tau(r.get(t)):<20}" for t in TAUS)
                     + r["verdict"])
    for name, fit in result["fits"].items():
        if fit["fit"]:
            lo, hi = (f"{v:.2f}" if v is not None else "unbounded" for v in fit["exponent_ci"])
            lines.append(f"  {name} ~ {fit['prefactor']:.3g} n^{fit['exponent']:.2f}  (95% interval of the exponent "
                         f"{lo}..{hi}; {fit['n_lower_bounds'] + fit['n_upper_bounds']} bound(s) censored)")
        else:
            lines.append(f"  {name}: no fit ({fit['reason']})")
    if result["target"]:
        lines.append(f"  advice for N = {result['target']['target_n']}: {result['target']['recommendation']}")
    lines.append(f"  results in {out}: report.html, sweep.json, sweep.jsonl, fig_phase_diagram.png, one run folder per size")
    return "\n".join(lines)


def _kind_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kind`` and ``--preset``, their choices from the experiments (:func:`biasgen.experiments.experiments`)."""
    defaults = "; ".join(f"{kind}: {next(iter(e.sweep_presets), 'none, give --sizes')}" for kind, e in experiments().items())
    parser.add_argument("--kind", choices=tuple(experiments()), help="the experiment run at each size (default: the "
                        f"preset's, else {next(iter(experiments()))})")
    parser.add_argument("--preset", choices=tuple(sweep_presets()), help=f"sweep preset (default per kind: {defaults})")


def build_parser(exp_class: type[TwinExperiment]) -> argparse.ArgumentParser:
    """The parser of ``biasgen sweep`` with the config flags of ``exp_class``."""
    parser = argparse.ArgumentParser(prog="biasgen sweep", description=__doc__.split("\n\n")[0])
    _kind_arguments(parser)
    parser.add_argument("--sizes", help="increasing training-set sizes per split, e.g. 16,32,64,128")
    parser.add_argument("--steps-per-image", type=float, help="each size trains ceil(X * n) steps")
    parser.add_argument("--target-n", type=int, help="your training-set size: extrapolate the taus to it")
    parser.add_argument("--mem-level", type=float, default=0.0, help="tau_mem: first checkpoint from which the 95%% lower "
                                                                     "bound of the memorized share stays above this")
    parser.add_argument("--max-exponent-ci-width", type=float, default=1.0,
                        help="refuse to extrapolate a tau whose exponent interval is wider than this")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of the experiment's settings")
    parser.add_argument("--out", default="runs/sweep", help="sweep folder (default: runs/sweep)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    parser.add_argument("--force", action="store_true", help="delete the biasgen sweep in --out and start over "
                        "(never a folder biasgen did not write; docs/safety.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(parser, exp_class.config_class)
    return parser


def main(argv: list[str]) -> int:
    """``biasgen sweep ...``: the experiment's flags depend on the kind, so ``--kind``/``--preset`` are read first."""
    first = argparse.ArgumentParser(prog="biasgen sweep", add_help=False)
    _kind_arguments(first)
    known, _ = first.parse_known_args(argv)
    exp_class = (experiments()[known.kind] if known.kind else sweep_presets()[known.preset][0] if known.preset
                 else next(iter(experiments().values())))
    args = build_parser(exp_class).parse_args(argv)

    def run() -> int:
        if args.resume and args.force:
            raise BiasgenError("--resume and --force contradict each other: pick one.")
        settings = flags_given(args, exp_class.config_class)
        result = sweep(args.out, args.kind, args.sizes, args.preset, args.config, steps_per_image=args.steps_per_image,
                       target_n=args.target_n, mem_level=args.mem_level, max_exponent_ci_width=args.max_exponent_ci_width,
                       resume=args.resume, force=args.force, progress=not args.quiet, **settings)
        print(terminal_summary(result, Path(args.out)))
        return 0

    return run_command("sweep", run, out=args.out)
