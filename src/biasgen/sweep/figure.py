"""The phase diagram of a sweep: training step against training-set size, both logarithmic.

    plot_phase_diagram("runs/sweep/fig_phase_diagram.png", result)   # result: sweep.json as a dict

Each tau (bias, loss, memorization) is drawn per size with its interval; a tau
not reached inside a run is an arrow pointing away from the step it is bounded
by; the fitted power laws are lines (dashed where extrapolated to ``--target-n``).
The regions are shaded between the tau_bias and tau_mem curves (the fits where
they exist, else the measured values joined): generalization below tau_bias,
biased generalization between, memorization above tau_mem; the area above
each size's training budget is hatched (not measured: a boundary drawn there
comes from bounds or extrapolation). Drawn with
matplotlib's object API and written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..runs import write_figure

STYLE = {  # colour, marker, legend, horizontal offset (so that bounds at the same step do not hide each other)
    "tau_bias": ("tab:blue", "o", r"$\tau_{bias}$ (twins closest)", 1 / 1.05),
    "tau_data": ("tab:green", "^", r"$\tau_{data}$ (twin-minus-control rise)", 1 / 1.1),
    "tau_loss": ("tab:orange", "s", r"$\tau_{loss}$ (test-loss minimum)", 1.0),
    "tau_mem": ("tab:red", "D", r"$\tau_{mem}$ (memorization onset)", 1.05)}
REGIONS = (("generalization", "#d9f0d3"), ("biased generalization", "#fee8c8"), ("memorization", "#fcc5c0"))


def _curve(result: dict, name: str, x: np.ndarray) -> np.ndarray | None:
    """The tau ``name`` at sizes ``x`` ``(k,)``: its fitted power law, else the measured steps/bounds joined in log-log;
    None when the experiment does not measure it."""
    fit, rows = result["fits"][name], result["rows"]
    if fit["fit"]:
        return fit["prefactor"] * x ** fit["exponent"]
    if not all(r.get(name) for r in rows):
        return None
    return np.exp(np.interp(np.log(x), np.log([r["n"] for r in rows]), np.log([r[name]["value"] for r in rows])))


def plot_phase_diagram(path: str | Path, result: dict) -> Path:
    """Write the phase diagram of ``result`` (a ``sweep.json`` dict) to ``path`` as PNG.

    (One figure drawn layer by layer: regions, then each tau with its interval and bounds, then the fits.)
    """
    rows, target = result["rows"], result.get("target")
    sizes = np.array([r["n"] for r in rows], dtype=float)
    right = max(sizes.max(), target["target_n"] if target else 0) * 1.4
    x = np.geomspace(sizes.min() / 1.4, right, 200)
    fig = Figure(figsize=(9.5, 5.5))
    ax = fig.add_subplot()

    # the regions, between the tau_bias and tau_mem curves
    steps = [s for r in rows for s in r["checkpoints"]]
    predicted = [v for t in (target or {}).get("taus", {}).values() if not t.get("refused") for v in t["interval"]]
    bottom, top = min(steps) / 2, max(steps + predicted) * 3
    bias = np.clip(_curve(result, "tau_bias", x), bottom, top)
    mem = _curve(result, "tau_mem", x)
    mem = np.full_like(x, top) if mem is None else np.clip(np.maximum(mem, bias), bottom, top)  # not measured: none
    for (label, colour), lo, hi in zip(REGIONS, (np.full_like(x, bottom), bias, mem), (bias, mem, np.full_like(x, top))):
        ax.fill_between(x, lo, hi, color=colour, alpha=0.6, lw=0, label=label)

    # the training budget of each size (where lower bounds sit); above it nothing was measured
    budget = np.exp(np.interp(np.log(x), np.log(sizes), np.log([r["steps"] for r in rows])))
    ax.fill_between(x, np.minimum(budget, top), top, facecolor="none", edgecolor="0.6", hatch="//", lw=0,
                    label="beyond the training budget")
    ax.scatter(sizes, [r["steps"] for r in rows], marker="_", s=250, color="0.4", label="training budget", zorder=3)
    for name, (colour, marker, label, shift) in STYLE.items():
        if not all(r.get(name) for r in rows):  # a tau the experiment (or design) does not measure
            continue
        located = [r for r in rows if r[name]["located"]]
        if located:
            n = np.array([r["n"] for r in located], dtype=float) * shift
            y = np.array([r[name]["step"] for r in located], dtype=float)
            err = np.array([[y_ - r[name]["ci"][0], r[name]["ci"][1] - y_] for y_, r in zip(y, located)]).T
            ax.errorbar(n, y, yerr=np.clip(err, 0, None), fmt=marker, color=colour, capsize=3, label=label, zorder=4)
        for r in rows:
            t = r[name]
            if not t["located"]:
                direction = 1.8 if t["bound"] == "lower" else 1 / 1.8
                ax.annotate("", xy=(r["n"] * shift, t["value"] * direction), xytext=(r["n"] * shift, t["value"]),
                            zorder=4, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.5))
                ax.plot([r["n"] * shift], [t["value"]], marker=marker, mfc="none", color=colour, zorder=4,
                        label=None if located else label)
                located = located or [r]  # label a tau once even when all its points are bounds
        fit = result["fits"][name]
        if fit["fit"]:
            inside = x <= sizes.max() * 1.05
            law = fit["prefactor"] * x ** fit["exponent"]
            ax.plot(x[inside], law[inside], "-", color=colour, lw=1.2, alpha=0.8)
            ax.plot(x[~inside], law[~inside], "--", color=colour, lw=1.2, alpha=0.8)
        if target and not target["taus"].get(name, {"refused": True})["refused"]:
            p = target["taus"][name]
            ax.errorbar([target["target_n"]], [p["step"]], yerr=[[p["step"] - p["interval"][0]],
                                                                 [p["interval"][1] - p["step"]]],
                        fmt=marker, mfc="white", color=colour, capsize=4, zorder=5)
    if target:
        ax.axvline(target["target_n"], color="0.3", ls=":", lw=1)
        ax.text(target["target_n"], top / 1.5, f" N = {target['target_n']}", fontsize=8, va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(bottom, top)
    ax.set_xlabel("training-set size n (examples per model)")
    ax.set_ylabel("training step")
    ax.set_title(f"Phase diagram ({result['experiment']}): arrows = not reached within the run")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return write_figure(fig, path)
