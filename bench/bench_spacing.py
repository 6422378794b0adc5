"""How sampler step schedules keep the data's variance, in closed form (no sampling; seconds).

    python bench/bench_spacing.py                      # the table of docs/samplers.md
    python bench/bench_spacing.py --steps 250,500 --variances 0.001,0.25

Gaussian data of each variance, its exact denoiser, ancestral sampling on the image schedule (linear, T = 1000):
the variance of the samples over the data's variance (:func:`biasgen.sampler.ancestral_gaussian_variance`),
for all T steps (the paper's sampler) and for each step count evenly and quadratically spaced.
"""
from __future__ import annotations

import argparse

from biasgen.sampler import ancestral_gaussian_variance, step_grid
from biasgen.schedule import NoiseSchedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="250,500", help="step counts to compare with all T steps")
    parser.add_argument("--variances", default="0.001,0.01,0.25,1", help="data variances")
    args = parser.parse_args()
    schedule = NoiseSchedule.linear()
    grids = {f"all {schedule.T} steps": step_grid(schedule.T)}
    for n in (int(v) for v in args.steps.split(",")):
        for spacing in ("uniform", "quadratic"):
            grid = step_grid(schedule.T, n, spacing)
            grids[f"{n} {spacing} ({len(grid)} calls)"] = grid
    print("| data variance | " + " | ".join(grids) + " |\n|---|" + "---|" * len(grids))
    for var in (float(v) for v in args.variances.split(",")):
        cells = [f"{ancestral_gaussian_variance(schedule, grid, var) / var:.3f}" for grid in grids.values()]
        print(f"| {var:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
