"""The figures of a conditional audit with several guidance scales (docs/guidance.md).

    plot_guidance(run_dir, records, summary)
    # -> fig_guidance_curves.png: the contrast (twin minus control distance) and f_mem over training, one line per w
    # -> fig_guidance_taus.png:   tau_data, tau_bias and tau_mem against w, with their intervals

``records``: ``metrics.jsonl`` records holding ``"guidance"`` (scale -> sample-level metrics); ``summary``:
``summary.json`` holding ``"guidance"`` (:func:`biasgen.images.conditional.judge_per_scale`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..runs import write_figure

TAU_STYLE = (("tau_data", "tab:orange", "s"), ("tau_bias", "tab:red", "o"), ("tau_mem", "tab:purple", "D"))


def contrast(metrics: dict) -> float:
    """Mean twin-pair distance minus mean control-pair distance (the twin distance alone without controls)."""
    twin = float(np.mean(metrics["twin_distance_pairs"]))
    controls = metrics.get("same_split_distance_pairs")
    return twin - float(np.mean(controls)) if controls else twin


def tau_point(tau: dict | None) -> tuple[float, float, float] | None:
    """``(step, low, high)`` of a tau of summary.json (a located one or a bound), or None when it has none."""
    if not tau:
        return None
    step = tau.get("step") if tau.get("step") is not None else tau.get("value")
    if step is None:
        return None
    lo, hi = tau.get("ci") or (step, step)
    return float(step), float(lo), float(hi)


def plot_guidance_curves(records: Sequence[dict], scales: Sequence[str], path: str | Path) -> Path:
    """Contrast and f_mem (with its 95% band) over training, one line per guidance scale."""
    fig = Figure(figsize=(11, 3.8))
    ax_c, ax_m = fig.subplots(1, 2)
    steps = np.array([r["step"] for r in records], dtype=float)
    colours = colormaps["viridis"](np.linspace(0.0, 0.85, len(scales)))
    for w, colour in zip(scales, colours):
        per_w = [r["guidance"][w] for r in records]
        ax_c.plot(steps, [contrast(m) for m in per_w], marker="o", markersize=3, color=colour, label=f"w = {w}")
        ax_m.plot(steps, [m["f_mem"] for m in per_w], marker="o", markersize=3, color=colour, label=f"w = {w}")
        ci = np.array([m["f_mem_ci"] for m in per_w], dtype=float)
        ax_m.fill_between(steps, ci[:, 0], ci[:, 1], color=colour, alpha=0.15, linewidth=0)
    controls = bool(records[0]["guidance"][scales[0]].get("same_split_distance_pairs"))
    ax_c.set_ylabel("contrast: twin - control distance" if controls else "twin distance (no controls)")
    ax_m.set_ylabel("memorized fraction $f_{mem}$ (own class, own split)")
    ax_m.set_ylim(-0.02, 1.02)
    for ax in (ax_c, ax_m):
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Guidance scale w: drift towards the training data and copying over training", fontsize=11)
    fig.tight_layout()
    return write_figure(fig, path, dpi=120)


def plot_guidance_taus(per_scale: dict, path: str | Path) -> Path:
    """tau_data, tau_bias and tau_mem against the guidance scale, each with its interval; hollow: a bound."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    scales = list(per_scale)
    x = np.array([float(w) for w in scales])
    offsets = np.linspace(-0.04, 0.04, len(TAU_STYLE)) * max(1.0, float(np.ptp(x)) if len(x) > 1 else 1.0)
    for (name, colour, marker), dx in zip(TAU_STYLE, offsets):
        for xi, w in zip(x, scales):
            tau = per_scale[w].get(name)
            point = tau_point(tau)
            if point is None:
                continue
            bound = bool(tau.get("bound"))
            ax.errorbar(xi + dx, point[0], yerr=[[point[0] - point[1]], [point[2] - point[0]]], color=colour,
                        marker=marker, markerfacecolor="none" if bound else colour, capsize=3,
                        label=name if w == scales[0] else None)
    ax.set_yscale("log")
    ax.set_xlabel("guidance scale w (0 unconditional, 1 conditional)")
    ax.set_ylabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("When drift and copying start, per guidance scale", fontsize=10)
    fig.tight_layout()
    return write_figure(fig, path, dpi=120)


def plot_guidance(run_dir: str | Path, records: Sequence[dict], summary: dict) -> dict[str, Path]:
    """Both guidance figures of a conditional audit into ``run_dir``."""
    run_dir = Path(run_dir)
    per_scale = summary["guidance"]["per_scale"]
    return {"curves": plot_guidance_curves(records, list(per_scale), run_dir / "fig_guidance_curves.png"),
            "taus": plot_guidance_taus(per_scale, run_dir / "fig_guidance_taus.png")}
