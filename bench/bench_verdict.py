"""Calibration of biasgen.onset.judge: false-detection rate on simulated nulls, power on simulated drifts.

    python bench/bench_verdict.py              # 1000 runs per null case, 400 per other case (a few minutes)
    python bench/bench_verdict.py --quick      # 200 / 80 runs, for a smoke check

Simulated runs carry the noise structure of real ones (docs/method.md §10): each
model's function fluctuates from checkpoint to checkpoint, and that
fluctuation is shared by every pair containing the model (pair distance =
mean curve + a_i(c) + a_j(c) + small per-pair noise); the test loss is
per-example with frozen noise, plus a shared checkpoint-level fluctuation.
Prints markdown tables for BENCHMARKS.md (verdict rates with Clopper-Pearson 95%
intervals, then the coverage of the judge's intervals), with the machine it ran on.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import beta

from biasgen.drift import drift_test, end_rise
from biasgen.onset import judge
from biasgen.runs import environment
from biasgen.twins import model_pairs

N_CKPT = 14
STEPS = np.unique(np.geomspace(20, 4000, N_CKPT).round().astype(int))  # log-spaced checkpoints
DESIGNS = {  # models as (split, seed)
    "K=2": [(0, 0), (1, 0)],
    "K=4": [(s, 0) for s in range(4)],
    "2x2": [(0, 0), (0, 1), (1, 0), (1, 1)],
}
# (design, twin curve, control curve, test loss, lag-1 autocorrelation of the model noise). Curves: 'flat'
# converges then stays flat, 'falling' keeps falling slowly, 'drift' converges then drifts apart; test loss:
# 'inside' has its minimum inside the run, 'open' still falls at the end
NULLS = [(d, shape, shape, loss, 0.0) for d in DESIGNS for shape in ("flat", "falling") for loss in ("inside", "open")]
NULLS += [("2x2", "drift", "drift", loss, 0.0) for loss in ("inside", "open")]  # twins and controls drift alike
DRIFTS = [(d, "drift", "flat", loss, 0.0) for d in DESIGNS for loss in ("inside", "open")]
# beyond the stated assumptions: model noise correlated from one checkpoint to the next
ROBUSTNESS = [(d, "flat", "flat", "open", 0.5) for d in DESIGNS]
COVERAGE = DRIFTS[::2]  # drifts with the loss minimum inside the run: every true value is well defined


def mean_curve(shape: str, drift: float, drift_ckpts: int) -> np.ndarray:
    """``(N_CKPT,)`` mean pair distance: converges by about checkpoint 6, then flat, falling or drifting."""
    x = np.arange(N_CKPT, dtype=float)
    base = 0.25 + 0.35 * np.exp(-x / 1.5)
    if shape == "falling":
        return base - 0.001 * x
    if shape == "drift":
        onset = N_CKPT - 1 - drift_ckpts
        return base + drift * np.clip((x - onset) / drift_ckpts, 0, 1)
    return base


def mean_loss(loss: str) -> np.ndarray:
    """``(N_CKPT,)`` mean test loss: minimum near checkpoint 10 (``'inside'``), or still falling at the end."""
    x = np.arange(N_CKPT, dtype=float)
    if loss == "inside":
        return 0.06 + 0.3 * np.exp(-x / 2) + 0.0015 * np.clip(x - 10, 0, None) ** 2
    return 0.08 + 0.3 * np.exp(-x / 2) - 0.001 * x


def simulate(design: str, twin: str, control: str, loss: str, rho: float, rng: np.random.Generator, *,
             model_sd: float = 0.005,  # per-model, per-checkpoint fluctuation, shared by all its pairs
             pair_sd: float = 0.002,  # per-pair, per-checkpoint noise (finite number of samples)
             drift: float = 0.02,  # rise of the twin distance after its minimum
             drift_ckpts: int = 6,  # over this many checkpoints, up to the end
             n_test: int = 64,  # test examples
             ) -> dict:
    """One simulated run: keyword arguments of :func:`biasgen.onset.judge`."""
    members = DESIGNS[design]
    twins, controls = model_pairs(members)
    fluct = rng.normal(0, model_sd, (len(members), N_CKPT))
    for c in range(1, N_CKPT):  # AR(1) with lag-1 correlation rho and the same marginal sd
        fluct[:, c] = rho * fluct[:, c - 1] + np.sqrt(1 - rho**2) * fluct[:, c]

    def table(pairs, shape, offset):
        mean = mean_curve(shape, drift, drift_ckpts) + offset
        return np.stack([mean + fluct[i] + fluct[j] + rng.normal(0, pair_sd, N_CKPT) for i, j in pairs])

    test_loss = (mean_loss(loss) + rng.normal(0, 0.02, (n_test, 1))  # frozen noise: each example's own level
                 + rng.normal(0, 0.0005, N_CKPT)  # the models' shared fluctuation
                 + rng.normal(0, 0.002, (n_test, N_CKPT)))
    run = {"steps": STEPS, "twin_distance": table(twins, twin, 0.0), "twin_pairs": twins, "test_loss": test_loss}
    if controls:
        run |= {"control_distance": table(controls, control, -0.03), "control_pairs": controls}
    return run


def clopper_pearson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for ``k`` successes in ``n`` trials."""
    a = (1 - conf) / 2
    lo = beta.ppf(a, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(1 - a, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def run_case(case: tuple, n_runs: int, seed: int, n_boot: int) -> dict:
    """Verdict counts of ``n_runs`` simulated runs of one case."""
    rng = np.random.default_rng(seed)
    counts = {"biased-generalization-detected": 0, "no-bias-detected": 0, "inconclusive": 0}
    for r in range(n_runs):
        counts[judge(**simulate(*case, rng), n_boot=n_boot, seed=r)["verdict"]] += 1
    return counts


def pure_noise_rates(n_curves: int, seed: int, n_boot: int) -> list[float]:
    """Share of flat pure-noise curves on which the drift test alone rejects at levels 1%, 5% and 10%."""
    rng = np.random.default_rng(seed)
    p = np.array([drift_test(STEPS, rng.standard_normal(N_CKPT), n_boot=n_boot, seed=r)["p_value"]
                  for r in range(n_curves)])
    return [float(np.mean(p <= level)) for level in (0.01, 0.05, 0.1)]


def coverage(case: tuple, n_runs: int, seed: int, n_boot: int) -> dict:
    """Share of ``n_runs`` simulated runs whose 68% / 95% intervals hold the true tau_bias, tau_loss and drift."""
    design, twin, control, loss, _ = case
    twin_mean = mean_curve(twin, 0.02, 6)
    decision = twin_mean - mean_curve(control, 0.02, 6) if design == "2x2" else twin_mean
    truth = {"tau_bias": STEPS[np.argmin(twin_mean)], "tau_loss": STEPS[np.argmin(mean_loss(loss))],
             "drift": float(end_rise(decision)[0])}
    rng = np.random.default_rng(seed)
    hits = {f"{k} {level}": 0 for k in truth for level in ("ci", "ci95")}
    for r in range(n_runs):
        out = judge(**simulate(*case, rng), n_boot=n_boot, seed=r)
        for key in hits:
            name, level = key.split()
            lo, hi = out[name][level]
            hits[key] += lo <= truth[name] <= hi
    return {key: n / n_runs for key, n in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5x fewer runs per case")
    parser.add_argument("--null-runs", type=int, default=1000, help="simulated runs per null case")
    parser.add_argument("--drift-runs", type=int, default=400, help="simulated runs per drift or robustness case")
    parser.add_argument("--n-boot", type=int, default=1000, help="simulated curves per bootstrap inside the judge")
    args = parser.parse_args()
    if args.quick:
        args.null_runs, args.drift_runs = args.null_runs // 5, args.drift_runs // 5
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {env['cpu_threads']} threads")
    print(f"checkpoints: {STEPS.tolist()}; level 0.05; n_boot {args.n_boot}\n")
    start = time.perf_counter()
    rates = pure_noise_rates(args.null_runs * 4, seed=999, n_boot=args.n_boot)
    print(f"drift test alone, {args.null_runs * 4} flat pure-noise curves: rejects {rates[0]:.4f} / {rates[1]:.4f} / "
          f"{rates[2]:.4f} at level 0.01 / 0.05 / 0.10\n")
    print("| design | controls | twin curve | test loss | model noise | truth | runs | detected | 95% CI | no-bias "
          "| inconclusive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, case in enumerate(NULLS + DRIFTS + ROBUSTNESS):
        design, twin, control, loss, rho = case
        n = args.null_runs if case in NULLS else args.drift_runs
        c = run_case(case, n, seed=1000 + k, n_boot=args.n_boot)
        det = c["biased-generalization-detected"]
        lo, hi = clopper_pearson(det, n)
        truth = "drift" if case in DRIFTS else "null"
        ctrl = f"2 pairs ({control})" if design == "2x2" else "none"
        noise = "independent" if rho == 0 else f"AR(1) rho={rho}"
        print(f"| {design} | {ctrl} | {twin} | {loss} | {noise} | {truth} | {n} | {det / n:.3f} | "
              f"{lo:.3f}–{hi:.3f} | {c['no-bias-detected'] / n:.3f} | {c['inconclusive'] / n:.3f} |", flush=True)
    print("\nCoverage of the intervals (share of runs whose interval holds the true value; nominal 0.68 / 0.95):\n")
    print("| design | twin curve | test loss | runs | tau_bias 68% | tau_bias 95% | tau_loss 68% | tau_loss 95% "
          "| drift 68% | drift 95% |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, case in enumerate(COVERAGE):
        cov = coverage(case, args.drift_runs, seed=2000 + k, n_boot=args.n_boot)
        print(f"| {case[0]} | {case[1]} | {case[3]} | {args.drift_runs} | "
              + " | ".join(f"{cov[f'{name} {level}']:.2f}" for name in ("tau_bias", "tau_loss", "drift")
                           for level in ("ci", "ci95")) + " |", flush=True)
    print(f"\nwall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
