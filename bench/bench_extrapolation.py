"""Does the sweep's extrapolation hold? Fit on the smaller sizes, predict a larger one, measure it directly.

    python bench/bench_extrapolation.py --out runs/sweep-x                       # digits, sizes 16..256, paper's sampler
    python bench/bench_extrapolation.py --out runs/sweep-x --sizes 16,32,64,128 --holdout 128 --json x.json

Runs (or resumes: finished sizes are reused) ``biasgen sweep --preset default`` on ``--sizes`` with the
paper's sampler (all T steps, 48 samples per model, as the default audit), then refits every tau on the sizes
below ``--holdout`` (default: the largest) with the sweep's own fit (``biasgen.sweep.fit_taus``) and predicts
the held-out size with its 95% prediction interval (``biasgen.sweep.fit.predict``). For each tau: whether the
directly measured value falls inside the interval (a bound measured at the held-out size is checked for
consistency: a lower bound must lie below the interval's upper end), and whether ``--target-n`` would have
given a number at all there (the sweep's refusal rule, ``--max-exponent-ci-width``). A markdown table goes to
stdout, the whole comparison to ``--json``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from biasgen.runs import environment, write_json
from biasgen.sweep import TAUS, describe_tau, fit_taus, sweep
from biasgen.sweep.fit import predict, refusal


def check(measured: dict | None, predicted: dict) -> str:
    """Whether the measured tau (a located step or a bound) agrees with the 95% prediction interval."""
    if measured is None:
        return "not measured"
    lo, hi = predicted["interval"]
    if measured["bound"] == "lower":  # the tau lies after the last checkpoint
        return "consistent (bound)" if measured["value"] < hi else "outside (bound above the interval)"
    if measured["bound"] == "upper":  # at or before the first checkpoint
        return "consistent (bound)" if measured["value"] > lo else "outside (bound below the interval)"
    return "inside" if lo <= measured["step"] <= hi else "outside"


def compare(rows: list[dict], holdout: int, max_width: float) -> list[dict]:
    """Per tau: the fit on the sizes below ``holdout``, its prediction there, and the measured value."""
    fit_rows = [r for r in rows if r["n"] < holdout and r["complete"]]
    measured = next(r for r in rows if r["n"] == holdout)
    fits = fit_taus(fit_rows, "audit")
    out = []
    for name in TAUS:
        fit = fits[name]
        entry = {"tau": name, "fit_sizes": [r["n"] for r in fit_rows], "measured": measured.get(name),
                 "fit": fit.get("fit", False)}
        if fit.get("fit"):
            prediction = predict(fit, holdout)
            entry |= {"exponent": fit["exponent"], "exponent_ci": fit["exponent_ci"], "prediction": prediction,
                      "agreement": check(measured.get(name), prediction), "advice_refused": refusal(fit, max_width)}
        else:
            entry |= {"agreement": "no fit", "reason": fit["reason"]}
        out.append(entry)
    return out


def table(entries: list[dict], holdout: int) -> str:
    lines = [f"| tau | exponent [95%] from {entries[0]['fit_sizes']} | predicted at n = {holdout} [95% PI] | "
             "measured | agreement | --target-n would give a number |", "|---|---|---|---|---|---|"]
    for e in entries:
        if not e["fit"]:
            lines.append(f"| {e['tau']} | no fit: {e['reason']} | | {describe_tau(e['measured'])} | no fit | no |")
            continue
        lo, hi = (f"{v:.2f}" if v is not None else "unbounded" for v in e["exponent_ci"])
        p = e["prediction"]
        lines.append(f"| {e['tau']} | {e['exponent']:.2f} [{lo}, {hi}] | {p['step']:.0f} [{p['interval'][0]:.0f}, "
                     f"{p['interval'][1]:.0f}] | {describe_tau(e['measured'])} | {e['agreement']} | "
                     f"{'no: ' + e['advice_refused'] if e['advice_refused'] else 'yes'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the sweep folder (created, or resumed)")
    parser.add_argument("--sizes", default="16,32,64,128,256", help="sizes of the sweep (default 16,32,64,128,256)")
    parser.add_argument("--holdout", type=int, help="the size predicted from the smaller ones (default: the largest)")
    parser.add_argument("--max-exponent-ci-width", type=float, default=1.0, help="the sweep's refusal limit")
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    holdout = args.holdout or sizes[-1]
    started = time.time()
    result = sweep(args.out, preset="default", sizes=sizes, sample_steps=None, n_samples=48,
                   resume=Path(args.out, "run.json").exists())
    entries = compare(result["rows"], holdout, args.max_exponent_ci_width)
    print(table(entries, holdout))
    if args.json:
        write_json(args.json, {"holdout": holdout, "sizes": sizes, "entries": entries, "environment": environment(),
                               "wall_s": round(time.time() - started, 1)})


if __name__ == "__main__":
    main()
