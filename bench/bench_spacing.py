"""How sampler step schedules keep the data's variance, in closed form, and how far held predictions move a
sample (seconds).

    python bench/bench_spacing.py                      # the tables of docs/samplers.md
    python bench/bench_spacing.py --steps 250,500 --variances 0.001,0.25

Gaussian data of each variance, its exact denoiser, ancestral sampling on the image schedule (linear, T = 1000):
the variance of the samples over the data's variance (:func:`biasgen.sampler.ancestral_gaussian_variance`),
for all T steps (the paper's sampler) and for each step count evenly and quadratically spaced. Then held
predictions (``sample(..., hold_above, hold_every)``), sampled on 500 seeds of 8 dimensions: the RMS distance
of each sample from the paper's sample of the same seed, in units of the data's sd, and the variance ratio;
and the weight of ``x0_hat`` in the DDPM posterior mean at a few steps (what a held prediction can move).
"""
from __future__ import annotations

import argparse
import math

import torch

from biasgen.sampler import ancestral_gaussian_variance, sample, step_grid
from biasgen.schedule import NoiseSchedule

HOLDS = ((300, 4), (200, 8), (0, 50))  # (hold_above, hold_every): the presets', a longer hold, one call in 50


def zero_mean_denoiser(schedule: NoiseSchedule, var: float):
    """``E[x0 | x_t]`` of ``x0 ~ N(0, var I)``, for the sampler."""
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.abar(t, like=x_t).reshape(-1, 1)
        return a.sqrt() * var / (a * var + 1 - a) * x_t
    return denoise


def held_rows(schedule: NoiseSchedule, variances: list[float]) -> list[str]:
    """Markdown rows: per data variance, each hold's RMS distance from the paper's samples and variance ratio."""
    rows = []
    for var in variances:
        draw = lambda **hold: sample(zero_mean_denoiser(schedule, var), schedule, (8,), list(range(500)),
                                     batch_size=500, **hold)
        paper = draw()
        cells = []
        for above, every in HOLDS:
            x = draw(hold_above=above, hold_every=every)
            rms = float((x - paper).pow(2).mean().sqrt()) / math.sqrt(var)
            cells.append(f"{rms:.2e} / {float(x.var(0).mean() / paper.var(0).mean()):.4f}")
        rows.append(f"| {var:g} | " + " | ".join(cells) + " |")
    return rows


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
    print("\nHeld predictions against the paper's sampler, the same seeds: RMS distance (data sd) / variance ratio\n")
    print("| data variance | " + " | ".join(f"hold above {a}, every {e}" for a, e in HOLDS) + " |\n|---|"
          + "---|" * len(HOLDS))
    print("\n".join(held_rows(schedule, [float(v) for v in args.variances.split(",")])))
    zero, one = torch.zeros(1), torch.ones(1)
    weights = {t: float(schedule.posterior_mean_var(zero, one, t)[0]) for t in (100, 300, 500, 1000)}
    print("\nweight of x0_hat in the posterior mean: " + ", ".join(f"t = {t}: {w:.2e}" for t, w in weights.items()))


if __name__ == "__main__":
    main()
