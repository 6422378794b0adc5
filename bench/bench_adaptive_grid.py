"""Would an adaptive evaluation grid save sampling? Re-judges subsets of a finished run's own records.

    python bench/bench_adaptive_grid.py RUN            # RUN: a finished audit (read only); seconds, no sampling

An adaptive evaluation would sample a coarse grid of the saved checkpoints first (one in ``--every`` and the
last), judge it, then add the grid steps next to every located tau and interval end (tau_bias, tau_data,
tau_loss's 95% interval, tau_mem), and repeat until nothing is added. Here each round is judged by the audit's
own judge on the run's ``metrics.jsonl`` records of the chosen checkpoints, so the bench shows how many
checkpoints such an evaluation would end up sampling and what each intermediate round would have decided.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from biasgen.experiments import experiments
from biasgen.pipeline import judge_records
from biasgen.runs import STEP, environment, read_json, read_jsonl
from biasgen.twins import make_members


def decisions(judged: dict) -> dict:
    """The verdict, p and the taus with their intervals (tau_loss: its 95% interval)."""
    tau = lambda name, ci="ci": None if not judged.get(name) else [judged[name]["step"], judged[name][ci]]
    return {"verdict": judged["verdict"], "p_value": judged["p_value"], "tau_bias": tau("tau_bias"),
            "tau_data": tau("tau_data"), "tau_loss": tau("tau_loss", "ci95"),
            "tau_mem": judged["tau_mem"].get("step"), "recommended_step": judged["recommended_step"]}


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
    parser.add_argument("--every", default="2,3", help="coarse grids to start from: one checkpoint in N")
    args = parser.parse_args()
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, python {env['python']}")
    full = len(read_jsonl(args.run / "metrics.jsonl", STEP))
    for every in (int(e) for e in args.every.split(",")):
        print(f"\ncoarse grid: one checkpoint in {every} and the last, of {full}, on {args.run}'s records:")
        for i, r in enumerate(adaptive_rounds(args.run, every)):
            print(f"  round {i}: {r['n_checkpoints']} checkpoints -> "
                  f"{json.dumps({k: v for k, v in r.items() if k != 'steps'})}")


if __name__ == "__main__":
    main()
