"""Calibration of biasgen.verdict.judge: false detections on simulated nulls, power on simulated drifts.

    python bench/bench_verdict.py              # 1000 runs per null case, 400 per drift case
    python bench/bench_verdict.py --quick      # 200 / 80 runs, for a smoke check

Simulated runs carry the noise structure of real ones (docs/method.md §10): each
model's function fluctuates from checkpoint to checkpoint, and that
fluctuation is shared by every pair containing the model (pair distance =
mean curve + a_i(c) + a_j(c) + small per-pair noise); the test loss is
per-example with frozen noise, plus a shared checkpoint-level fluctuation. The
judge gets the members, so the placebo gate runs as in a real audit.
Prints markdown tables for BENCHMARKS.md (verdict rates with Clopper-Pearson 95%
intervals, then the coverage of the judge's intervals), with the machine it ran on.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import beta

from biasgen.drift import drift_test
from biasgen.runs import environment
from biasgen.twins import model_pairs
from biasgen.verdict import judge

N_CKPT = 14
STEPS = np.unique(np.geomspace(20, 4000, N_CKPT).round().astype(int))  # log-spaced checkpoints
LOSS_MIN = 10  # checkpoint index of the test-loss minimum ('inside')
DESIGNS = {  # models as (split, seed)
    "K=2": [(0, 0), (1, 0)],
    "K=4": [(s, 0) for s in range(4)],
    "2x2": [(0, 0), (0, 1), (1, 0), (1, 1)],
}
ONSET = {"early": 4, "mid": 7, "late": LOSS_MIN, "flat-bottom": LOSS_MIN}  # last checkpoint before each rise
# (design, twin curve, control curve, test loss, lag-1 autocorrelation of the model noise). Curves: 'flat'
# converges by checkpoint 6 and stays flat, 'falling' keeps falling slowly, 'early' / 'mid' / 'late' converge, then
# rise after checkpoint ONSET[...] (late: right after the test-loss minimum), 'flat-bottom' converges by checkpoint 2
# and rises after the loss minimum; controls: 'flat' converge as the twins do without their rise, 'early' rise as the
# twins do (seed divergence, not data); test loss: 'inside' has its minimum at LOSS_MIN, 'open' still falls at the end
NULLS = [(d, shape, "flat", loss, 0.0) for d in DESIGNS for shape, loss in
         [("flat", "inside"), ("flat", "open"), ("falling", "inside"), ("falling", "open"), ("late", "inside"),
          ("flat-bottom", "inside")]]
# seeds part ways, twins and controls alike
NULLS += [("2x2", "early", "early", loss, 0.0) for loss in ("inside", "open")]
NULLS += [(d, shape, "flat", loss, 0.5) for d in DESIGNS for shape, loss in [("flat", "open"), ("late", "inside")]]
CONFOUNDED = [(d, "early", "early", "inside", 0.0) for d in ("K=2", "K=4")]  # the same seed divergence, no controls
DRIFTS = [(d, shape, "flat", loss, 0.0) for d in DESIGNS for shape, loss in
          [("early", "inside"), ("early", "open"), ("mid", "inside")]]
COVERAGE = [case for case in DRIFTS if case[3] == "inside"]  # every true value is well defined


def mean_curve(shape: str, drift: float, rise: bool = True) -> np.ndarray:
    """``(N_CKPT,)`` mean pair distance; a rise grows by ``drift`` over 6 checkpoints (3 for the late ones).
    ``rise=False``: the same convergence without its rise (the same-split controls of a data-specific rise)."""
    x = np.arange(N_CKPT, dtype=float)
    base = 0.25 + 0.35 * np.exp(-x / (0.5 if shape == "flat-bottom" else 1.5))
    if shape == "falling":
        return base - 0.001 * x
    if shape in ONSET and rise:
        return base + drift * np.clip((x - ONSET[shape]) / (3 if shape in ("late", "flat-bottom") else 6), 0, None)
    return base


def mean_loss(loss: str) -> np.ndarray:
    """``(N_CKPT,)`` mean test loss: minimum at checkpoint LOSS_MIN (``'inside'``), or still falling at the end."""
    x = np.arange(N_CKPT, dtype=float)
    if loss == "inside":
        return 0.06 + 0.3 * np.exp(-x / 2) + 0.0015 * np.clip(x - LOSS_MIN, 0, None) ** 2
    return 0.08 + 0.3 * np.exp(-x / 2) - 0.001 * x


def simulate(design: str, twin: str, control: str, loss: str, rho: float, rng: np.random.Generator, *,
             model_sd: float = 0.005,  # per-model, per-checkpoint fluctuation, shared by all its pairs
             pair_sd: float = 0.002,  # per-pair, per-checkpoint noise (finite number of samples)
             drift: float = 0.02,  # size of a rise
             n_test: int = 64,  # test examples
             ) -> dict:
    """One simulated run: keyword arguments of :func:`biasgen.verdict.judge`."""
    members = DESIGNS[design]
    twins, controls = model_pairs(members)
    fluct = rng.normal(0, model_sd, (len(members), N_CKPT))
    for c in range(1, N_CKPT):  # AR(1) with lag-1 correlation rho and the same marginal sd
        fluct[:, c] = rho * fluct[:, c - 1] + np.sqrt(1 - rho**2) * fluct[:, c]

    def table(pairs, mean):
        return np.stack([mean + fluct[i] + fluct[j] + rng.normal(0, pair_sd, N_CKPT) for i, j in pairs])

    test_loss = (mean_loss(loss) + rng.normal(0, 0.02, (n_test, 1))  # frozen noise: each example's own level
                 + rng.normal(0, 0.0005, N_CKPT)  # the models' shared fluctuation
                 + rng.normal(0, 0.002, (n_test, N_CKPT)))
    run = {"steps": STEPS, "twin_distance": table(twins, mean_curve(twin, drift)), "twin_pairs": twins,
           "test_loss": test_loss, "members": members}
    if controls:
        control_mean = mean_curve(twin, drift, rise=False) if control == "flat" else mean_curve(control, drift)
        run |= {"control_distance": table(controls, control_mean - 0.03), "control_pairs": controls}
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
    counts = dict.fromkeys(("biased-generalization-detected", "overfitting", "no-bias-detected", "inconclusive"), 0)
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
    """Share of ``n_runs`` runs whose 68% / 95% intervals hold the true tau_bias, tau_loss, tau_data (with
    controls) and end-of-run drift; the true tau_data is the last checkpoint before the rise."""
    design, twin, control, loss, _ = case
    twin_mean = mean_curve(twin, 0.02)
    decision = twin_mean - mean_curve(twin, 0.02, rise=False) if design == "2x2" else twin_mean
    truth = {"tau_bias": STEPS[np.argmin(twin_mean)], "tau_loss": STEPS[np.argmin(mean_loss(loss))]}
    truth["drift_end"] = float(decision[-3:].mean() - min(decision[i:i + 3].mean() for i in range(N_CKPT - 5)))
    if design == "2x2":
        truth["tau_data"] = STEPS[ONSET[twin]]
    rng = np.random.default_rng(seed)
    hits = {f"{k} {level}": 0 for k in truth for level in ("ci", "ci95")}
    for r in range(n_runs):
        out = judge(**simulate(*case, rng), n_boot=n_boot, seed=r)
        for key in hits:
            name, level = key.split()
            lo, hi = out[name][level]
            hits[key] += lo <= truth[name] <= hi
    return {key: n / n_runs for key, n in hits.items()}


def print_rates(cases: list[tuple], truth: str, n: int, first_seed: int, n_boot: int) -> None:
    for k, case in enumerate(cases):
        design, twin, control, loss, rho = case
        c = run_case(case, n, seed=first_seed + k, n_boot=n_boot)
        det = c["biased-generalization-detected"]
        lo, hi = clopper_pearson(det, n)
        ctrl = f"2 pairs ({control})" if design == "2x2" else "none"
        noise = "independent" if rho == 0 else f"AR(1) rho={rho}"
        rates = " | ".join(f"{c[v] / n:.3f}" for v in ("overfitting", "no-bias-detected", "inconclusive"))
        print(f"| {design} | {ctrl} | {twin} | {loss} | {noise} | {truth} | {n} | {det / n:.3f} | "
              f"{lo:.3f}–{hi:.3f} | {rates} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5x fewer runs per case")
    parser.add_argument("--null-runs", type=int, default=1000, help="simulated runs per null case")
    parser.add_argument("--drift-runs", type=int, default=400, help="simulated runs per drift case")
    parser.add_argument("--n-boot", type=int, default=1000, help="simulated curves per bootstrap inside the judge")
    args = parser.parse_args()
    if args.quick:
        args.null_runs, args.drift_runs = args.null_runs // 5, args.drift_runs // 5
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {env['cpu_threads']} threads")
    print(f"checkpoints: {STEPS.tolist()}; test-loss minimum at step {STEPS[LOSS_MIN]}; level 0.05; "
          f"n_boot {args.n_boot}\n")
    start = time.perf_counter()
    rates = pure_noise_rates(args.null_runs * 4, seed=999, n_boot=args.n_boot)
    print(f"drift test alone, {args.null_runs * 4} flat pure-noise curves: rejects {rates[0]:.4f} / {rates[1]:.4f} / "
          f"{rates[2]:.4f} at level 0.01 / 0.05 / 0.10\n")
    print("| design | controls | twin curve | test loss | model noise | truth | runs | detected | 95% CI | overfitting "
          "| no-bias | inconclusive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print_rates(NULLS, "null", args.null_runs, 1000, args.n_boot)
    print_rates(CONFOUNDED, "seeds (no controls)", args.drift_runs, 1500, args.n_boot)
    print_rates(DRIFTS, "drift", args.drift_runs, 1600, args.n_boot)
    print("\nCoverage of the intervals (share of runs whose interval holds the true value; nominal 0.68 / 0.95):\n")
    names = ("tau_bias", "tau_loss", "tau_data", "drift_end")
    print("| design | twin curve | runs | " + " | ".join(f"{n} 68% | {n} 95%" for n in names) + " |")
    print("|---|---|---|" + "---|" * 2 * len(names))
    for k, case in enumerate(COVERAGE):
        cov = coverage(case, args.drift_runs, seed=2000 + k, n_boot=args.n_boot)
        print(f"| {case[0]} | {case[1]} | {args.drift_runs} | "
              + " | ".join(f"{cov[f'{n} {level}']:.2f}" if f"{n} {level}" in cov else "–"
                           for n in names for level in ("ci", "ci95")) + " |", flush=True)
    print(f"\nwall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
