"""The audit's evaluation done in several ways, on the SAME trained models, one after the other.

    python bench/bench_eval_speed.py RUN --out /tmp/evalspeed                   # RUN: a finished default audit
    python bench/bench_eval_speed.py RUN --out /tmp/evalspeed --ways compiled,held
    python bench/bench_eval_speed.py RUN --adaptive                             # seconds, no sampling

RUN is read, never written: its config and ``models/`` are copied into ``OUT/<way>`` (a folder biasgen did not
write is refused, never emptied) and each copy is resumed (training finds every checkpoint done, so only the evaluation runs, with the preset's worker
processes). The ways: ``eager`` (``--compile off``) and ``compiled`` (``--compile on``; what ``auto`` does for
the default audit on a CPU), both with the paper's sampler; ``held``: compiled, with the network's prediction held
for 4 steps above t = 300 (``--hold-above 300 --hold-every 4``, the ``default`` preset's sampler; docs/samplers.md). Point ``TORCHINDUCTOR_CACHE_DIR`` at an empty folder to time a machine's first
run (every worker compiles), or at a filled one for later runs.

``--adaptive`` asks instead whether an adaptive evaluation grid would save sampling: a coarse grid of the
saved checkpoints (one in ``--every`` and the last) is judged, then the grid steps next to every located tau
and interval end (tau_bias, tau_data, tau_loss's 95% interval, tau_mem) are added, until nothing is added. Each
round is judged by the audit's own judge on RUN's ``metrics.jsonl`` records of the chosen checkpoints: how many
checkpoints such an evaluation would end up sampling, and what each intermediate round would have decided.

For each way: wall and CPU seconds of the evaluation (this process and its workers), the verdict, p, tau_bias,
tau_data, tau_loss and tau_mem with their intervals, and the largest sample difference from the first way.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from biasgen.checkpoint import load_tensors
from biasgen.experiments import experiments
from biasgen.images.audit import ImageAudit
from biasgen.pipeline import judge_records, run_experiment
from biasgen.runs import STEP, environment, prepare_run_dir, read_json, read_jsonl
from biasgen.twins import make_members

PAPER = dict(hold_above=0, hold_every=1)  # the paper's sampler: a network call at every step
WAYS = {"eager": dict(compile="off", **PAPER), "compiled": dict(compile="on", **PAPER),
        "held": dict(compile="on", hold_above=300, hold_every=4)}  # way -> settings


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decisions(judged: dict) -> dict:
    """The verdict, p and the taus with their intervals (tau_loss: its 95% interval)."""
    tau = lambda name, ci="ci": None if not judged.get(name) else [judged[name]["step"], judged[name][ci]]
    return {"verdict": judged["verdict"], "p_value": judged["p_value"], "tau_bias": tau("tau_bias"),
            "tau_data": tau("tau_data"), "tau_loss": tau("tau_loss", "ci95"),
            "tau_mem": judged["tau_mem"].get("step"), "recommended_step": judged["recommended_step"]}


def evaluate_way(run: Path, out: Path, way: str) -> dict:
    """Evaluate the copied models of ``run`` in ``out / way``; timing and the judged taus."""
    folder, info = out / way, read_json(run / "run.json")
    config = {**info["config"], **WAYS[way]}  # RUN's settings, sampled this way
    # a fresh run folder with that config; --force empties only a folder biasgen wrote (biasgen.runs)
    prepare_run_dir(folder, config, resume=False, force=True, kind=info["kind"], inputs=(run,))
    shutil.copytree(run / "models", folder / "models")
    experiment = ImageAudit.from_settings(None, None, **config)
    cpu0, wall0 = cpu_seconds(), time.time()
    summary = run_experiment(experiment, folder, resume=True, progress=False)
    return {"way": way, "evaluation_wall_s": summary["timing"]["evaluation_s_this_invocation"],
            "total_wall_s": round(time.time() - wall0, 1), "cpu_s": round(cpu_seconds() - cpu0, 1),
            **decisions(summary)}


def sample_difference(out: Path, ways: list[str]) -> dict:
    """Largest absolute difference of every way's stored samples from the first way's, over all checkpoints."""
    first = sorted((out / ways[0] / "samples").glob("*.safetensors"))
    result = {}
    for way in ways[1:]:
        diff = 0.0
        for path in first:
            a = load_tensors(path.with_suffix(""))[0]["samples"]
            b = load_tensors((out / way / "samples" / path.name).with_suffix(""))[0]["samples"]
            diff = max(diff, float((a - b).abs().max()))
        result[way] = diff
    return result


def adaptive_rounds(run: Path, every: int) -> list[dict]:
    """Rounds of the adaptive grid on ``run``'s own records, from one checkpoint in ``every`` and the last."""
    records = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl", STEP)}
    grid = sorted(records)
    info = read_json(run / "run.json")
    experiment = experiments()[info["kind"]].from_settings(None, None, **{**info["config"], "device": "cpu"})
    members = make_members(experiment.cfg.splits, experiment.cfg.seeds_per_split)
    chosen, rounds = set(grid[::every]) | {grid[-1]}, []
    while True:
        judged = judge_records(experiment, [records[s] for s in sorted(chosen)], members)
        rounds.append({"n_checkpoints": len(chosen), "steps": sorted(chosen), **decisions(judged)})
        located = {judged["tau_bias"]["step"], *judged["tau_bias"]["ci"], judged["tau_loss"]["step"],
                   *judged["tau_loss"]["ci95"], *(judged["tau_mem"].get("ci") or [])}
        if judged.get("tau_data"):
            located |= {judged["tau_data"]["step"], *judged["tau_data"]["ci"]}
        near = {grid[j] for s in located for j in (grid.index(s) - 1, grid.index(s) + 1) if 0 <= j < len(grid)}
        if near <= chosen:
            return rounds
        chosen |= near


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished audit run folder (read only)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_eval_speed"), help="where the copies go")
    parser.add_argument("--ways", default="eager,compiled", help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--adaptive", action="store_true", help="only the adaptive-grid study (seconds)")
    parser.add_argument("--every", default="2,3", help="--adaptive: coarse grids to start from, one checkpoint in N")
    args = parser.parse_args()
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, python {env['python']}")
    if args.adaptive:
        full = len(read_jsonl(args.run / "metrics.jsonl", STEP))
        for every in (int(e) for e in args.every.split(",")):
            print(f"\ncoarse grid: one checkpoint in {every} and the last, of {full}, on {args.run}'s records:")
            for i, r in enumerate(adaptive_rounds(args.run, every)):
                print(f"  round {i}: {r['n_checkpoints']} checkpoints -> "
                      f"{json.dumps({k: v for k, v in r.items() if k != 'steps'})}")
        return
    ways = args.ways.split(",")
    rows = [evaluate_way(args.run, args.out, way) for way in ways]
    print(f"\nlargest sample difference from {ways[0]}: {sample_difference(args.out, ways)}")
    print("\n| way | evaluation wall | CPU (user+sys) | verdict | p | tau_bias [68%] | tau_data [68%] | "
          "tau_loss [95%] | tau_mem | recommended |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['evaluation_wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['verdict']} | "
              f"{r['p_value'] if r['p_value'] is None else round(r['p_value'], 3)} | {r['tau_bias']} | "
              f"{r['tau_data']} | {r['tau_loss']} | {r['tau_mem']} | {r['recommended_step']} |")
    (args.out / "bench_eval_speed.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
