"""PNG figures of an audit run, drawn from plain metric records (one dict per checkpoint).

Every figure tolerates partial runs: a record may lack any metric (or hold
``None``) and the curve simply skips it. Figures are drawn with matplotlib's
object API (no pyplot, no display, no backend switch) and written atomically
(:func:`biasgen.runs.write_figure`).

    plot_all(run_dir, records, summary, gallery_rows(run_dir, summary, train_sets, members))  # biasgen.images.gallery
    # -> fig_loss_twin.png, fig_score_similarity.png, fig_memorization.png, fig_loss_bands.png, fig_gallery.png

A record looks like ``{"step": 120, "test_loss": 0.31, "test_loss_sem": 0.01,
"twin_distance": 0.12, "twin_distance_sem": 0.01, "f_mem": 0.02, "f_mem_ci": [0.0, 0.05],
"nn_own_sim": 0.8, ..., "score_sim": {"50": {"train": 0.9, "train_sem": 0.01,
"test": 0.92, "test_sem": 0.01}}}``; the summary holds ``tau_bias`` and
``tau_loss`` (``{"step": int, "ci": [lo, hi]}`` or ``None``), ``window``
(``[lo, hi]`` or ``None``) and ``verdict``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..runs import write_figure
from .gallery import plot_gallery

NN_STYLE = [  # (record key part, colour, line style, legend) of the nearest-neighbour curves
    ("own", "tab:red", "-", "own split"),
    ("other", "tab:orange", "--", "other split"),
    ("test", "tab:green", ":", "test set"),
]
MONITOR_NN_STYLE = [  # the same for the single-run monitor's records
    ("train", "tab:red", "-", "to training images (size-matched)"),
    ("heldout", "tab:green", ":", "to held-out images (size-matched)"),
]
TAU_STYLE = {"tau_bias": ("tab:red", "$\\tau_{bias}$"), "tau_data": ("tab:green", "$\\tau_{data}$"),
             "tau_loss": ("tab:blue", "$\\tau_{loss}$"), "tau_mem": ("tab:purple", "$\\tau_{mem}$")}


# -- helpers ---------------------------------------------------------------
def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically."""
    return write_figure(fig, path, dpi=120)


def _number(value) -> float | None:
    """``value`` as a finite float, or ``None`` when missing or not finite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(records: Sequence[dict], get) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``(n,)`` and values ``get(record)`` (``(n,)`` or ``(n, k)`` for tuples) over the records
    where the step and the value are present, sorted by step. ``get`` returns ``None`` for missing."""
    points = []
    for r in records:
        step, value = _number(r.get("step")), get(r)
        if step is not None and value is not None:
            points.append((step, value))
    points.sort(key=lambda p: p[0])
    if not points:
        return np.empty(0), np.empty(0)
    return np.asarray([p[0] for p in points]), np.asarray([p[1] for p in points], dtype=float)


def _key(name: str):
    """Getter of a scalar metric of a record (``None`` when missing or not finite)."""
    return lambda r: _number(r.get(name))


def _pair_mean(name: str):
    """``record -> mean of its per-pair list`` (None when the record has no such list)."""
    def get(record: dict):
        values = record.get(name)
        return sum(values) / len(values) if values else None
    return get


def _plot_band(ax: Axes, records, get_mean, get_sem, label: str, **style) -> bool:
    """Curve of ``get_mean`` with a shaded ``± get_sem`` band where known; ``True`` if anything was drawn."""

    def get(r):
        m = get_mean(r)
        return None if m is None else (m, _nan_if_none(get_sem(r)))

    steps, v = _series(records, get)
    if not len(steps):
        return False
    (line,) = ax.plot(steps, v[:, 0], marker="o", markersize=3, label=label, **style)
    if np.isfinite(v[:, 1]).any():  # NaN half-widths leave gaps in the band
        ax.fill_between(steps, v[:, 0] - v[:, 1], v[:, 0] + v[:, 1], color=line.get_color(), alpha=0.2, linewidth=0)
    return True


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _pair(value) -> tuple[float, float] | None:
    """``[lo, hi]`` as two finite floats, or ``None`` when missing or malformed."""
    if not value or len(value) != 2:
        return None
    lo, hi = _number(value[0]), _number(value[1])
    return None if lo is None or hi is None else (lo, hi)


def _step_axis(ax: Axes, records: Sequence[dict]) -> None:
    """Log-scaled training-step axis (symmetric-log when a step 0 is present)."""
    steps = [s for s in (_number(r.get("step")) for r in records) if s is not None]
    if steps and min(steps) <= 0:
        ax.set_xscale("symlog", linthresh=1.0)
    elif steps:
        ax.set_xscale("log")
    ax.set_xlabel("training step")


def _mark_taus(ax: Axes, summary: dict | None, label: bool = True) -> None:
    """Vertical lines at tau_bias, tau_data, tau_loss and tau_mem (when located) with their intervals, and the biased
    window shaded."""
    summary = summary or {}
    window = _pair(summary.get("window"))
    if window:
        ax.axvspan(*window, color="tab:orange", alpha=0.12, label="biased window" if label else None)
    for name, (color, text) in TAU_STYLE.items():
        tau = summary.get(name) or {}
        step = _number(tau.get("step"))
        if step is None:
            continue
        ci = _pair(tau.get("ci"))
        if ci:
            ax.axvspan(*ci, color=color, alpha=0.08)
        ax.axvline(step, color=color, linestyle=":", linewidth=1.5, label=f"{text} = {step:g}" if label else None)


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded yet", ha="center", va="center", transform=ax.transAxes, color="gray")


# -- figures -----------------------------------------------------------------
def plot_loss_and_twin_distance(records: Sequence[dict], summary: dict | None, path: str | Path) -> Path:
    """The paper's Fig. 1a: test (and train) loss on the left axis, twin cosine distance on the right."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    _step_axis(ax, records)  # set the scale before drawing so autoscaling uses it
    drew_loss = _plot_band(ax, records, _key("test_loss"), _key("test_loss_sem"), "test loss", color="tab:blue")
    drew_loss |= _plot_band(ax, records, _key("train_loss"), _key("train_loss_sem"), "train loss",
                            color="tab:blue", linestyle="--", alpha=0.7)
    ax.set_ylabel("denoising loss (frozen noise)", color="tab:blue")
    _mark_taus(ax, summary)

    ax2 = ax.twinx()  # the curves the verdict is judged on: means over twin pairs and over same-split pairs
    drew_twin = _plot_band(ax2, records, _pair_mean("twin_distance_pairs"), lambda r: None,
                           "twins, different splits (mean over pairs)", color="tab:red")
    _plot_band(ax2, records, _pair_mean("same_split_distance_pairs"), lambda r: None,
               "same-split control (mean over pairs)", color="tab:gray", linestyle="--")
    curves = (summary or {}).get("curves") or {}
    if curves.get("contrast"):  # the curve the verdict decides on when there are controls
        ax2.plot(curves["steps"], curves["contrast"], color="tab:green", linestyle="-.", marker=".",
                 label="contrast: twins − controls")
    ax2.set_ylabel("cosine distance of shared-noise samples $D_{cos}$", color="tab:red")
    if not (drew_loss or drew_twin):
        _empty(ax, "loss or twin distance")

    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    if handles[0] or handles2[0]:
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=8, ncol=3,
                  loc="upper center", bbox_to_anchor=(0.5, -0.14))
    verdict = (summary or {}).get("verdict") or "run in progress"
    ax.set_title(f"Test loss and twin distance — verdict: {verdict}", fontsize=10)
    return _save(fig, path)


def _score_keys(records: Sequence[dict]) -> list[str]:
    """The noise levels t present in any record's ``score_sim``, in increasing order."""
    keys = {k for r in records for k in (r.get("score_sim") or {})}
    return sorted(keys, key=float)


def _score(t: str, key: str):
    """Getter of ``record["score_sim"][t][key]`` (``None`` when missing)."""
    return lambda r: _number(((r.get("score_sim") or {}).get(t) or {}).get(key))


def plot_score_similarity(records: Sequence[dict], summary: dict | None, path: str | Path) -> Path:
    """The paper's Fig. 2: twin score similarity on training vs test inputs over training, one panel per t."""
    ts = _score_keys(records)
    cols = min(max(len(ts), 1), 4)  # at most 4 panels a row
    rows = max(math.ceil(len(ts) / cols), 1)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows))
    if not ts:
        ax = fig.add_subplot()
        _empty(ax, "score-level similarity")
        return _save(fig, path)
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).flatten()
    for ax in axes[len(ts):]:
        ax.set_axis_off()
    for i, (ax, t) in enumerate(zip(axes, ts)):
        _step_axis(ax, records)
        for split, color in (("train", "tab:red"), ("test", "tab:green")):
            _plot_band(ax, records, _score(t, split), _score(t, f"{split}_sem"), f"{split} inputs", color=color)
        _mark_taus(ax, summary, label=i == 0)
        ax.set_title(f"t = {t}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[::cols]:
        ax.set_ylabel("twin score cosine similarity")
    axes[0].legend(fontsize=8)
    fig.suptitle("Score-level twin similarity: training vs test inputs", fontsize=11)
    return _save(fig, path)


def _plot_nn(ax: Axes, records: Sequence[dict], suffix: str, ylabel: str, style: list[tuple]) -> None:
    """Nearest-neighbour proximity over training on ``ax``: one curve per ``(which, colour, line style, legend)`` of
    ``style``, read from the records' ``nn_{which}_{suffix}`` (``suffix``: ``sim`` or ``l2``)."""
    drew = False
    for which, color, line, name in style:
        s, v = _series(records, _key(f"nn_{which}_{suffix}"))
        if len(s):
            ax.plot(s, v, marker="o", markersize=3, color=color, linestyle=line, label=name)
            drew = True
    if drew:
        ax.legend(fontsize=8)
    else:
        _empty(ax, ylabel)
    ax.set_ylabel(ylabel)


def _plot_f_mem(ax: Axes, records: Sequence[dict]) -> None:
    """f_mem over training with its bootstrap CI band on ``ax``."""
    steps, f_mem = _series(records, _key("f_mem"))
    if len(steps):
        ax.plot(steps, f_mem, marker="o", markersize=3, color="tab:purple", label="$f_{mem}$")
        s, ci = _series(records, lambda r: _pair(r.get("f_mem_ci")))
        if len(s):
            ax.fill_between(s, ci[:, 0], ci[:, 1], color="tab:purple", alpha=0.2, linewidth=0, label="bootstrap CI")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "f_mem")
    ax.set_ylabel("memorized fraction ($d_1/d_2 < 1/3$)")
    ax.set_ylim(-0.02, 1.02)


def plot_memorization(records: Sequence[dict], path: str | Path) -> Path:
    """f_mem with its bootstrap CI, and nearest-neighbour similarity / L2 to own split, other split and test."""
    fig = Figure(figsize=(13, 3.8))
    ax_mem, ax_sim, ax_l2 = fig.subplots(1, 3)
    for ax in (ax_mem, ax_sim, ax_l2):
        _step_axis(ax, records)
        ax.grid(alpha=0.3)

    _plot_f_mem(ax_mem, records)

    _plot_nn(ax_sim, records, "sim", "NN cosine similarity", NN_STYLE)
    _plot_nn(ax_l2, records, "l2", "NN L2 distance", NN_STYLE)
    fig.suptitle("Memorization and nearest-neighbour proximity of samples", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_loss_bands(records: Sequence[dict], summary: dict, path: str | Path) -> Path:
    """Train–test gap of the frozen-noise loss per noise band over training; the band where it opens first is bold."""
    bands = summary["loss_by_band"]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    _step_axis(ax, records)
    for b, ((lo, hi), gap) in enumerate(zip(bands["bands"], bands["gap"])):
        first = b == bands["first_band"]
        ax.plot(steps, gap, color=plt_color(b, len(bands["bands"])), linewidth=2.5 if first else 1,
                label=f"t {lo}..{hi}" + (f" (gap opens first, step {bands['gap_opens'][b]})" if first else ""))
    ax.axhline(0, color="gray", linewidth=0.8)
    _mark_taus(ax, summary, label=False)
    ax.set_ylabel("test loss − train loss (frozen noise)")
    ax.set_title("Train–test gap per noise band", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plt_color(i: int, n: int):
    """A colour of the viridis map for item ``i`` of ``n`` (low noise dark, high noise bright)."""
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(1, n - 1))


def plot_all(
    run_dir: str | Path,
    records: Sequence[dict],
    summary: dict | None,
    gallery_rows: Sequence[tuple[str, torch.Tensor]] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> dict[str, Path]:
    """Write every figure of a run into ``run_dir``; returns ``{name: path}`` of the files written.

    The gallery is skipped when ``gallery_rows`` is empty (e.g. no samples yet).
    """
    run_dir = Path(run_dir)
    written = {
        "loss_twin": plot_loss_and_twin_distance(records, summary, run_dir / "fig_loss_twin.png"),
        "score_similarity": plot_score_similarity(records, summary, run_dir / "fig_score_similarity.png"),
        "memorization": plot_memorization(records, run_dir / "fig_memorization.png"),
    }
    if (summary or {}).get("loss_by_band"):
        written["loss_bands"] = plot_loss_bands(records, summary, run_dir / "fig_loss_bands.png")
    if gallery_rows:
        written["gallery"] = plot_gallery(gallery_rows, run_dir / "fig_gallery.png", value_range)
    return written


# -- single-run monitor ---------------------------------------------------------
def _monitor_events(records: Sequence[dict]) -> list[tuple[float, str, str]]:
    """``(step, colour, label)`` of the validation-loss minimum and of the first flagged closeness and copies."""
    events = []
    steps, val = _series(records, _key("val_loss"))
    if len(steps):
        events.append((float(steps[int(np.argmin(val))]), "tab:blue", "val-loss minimum"))
    for flag, color, text in (("closer_to_train", "tab:red", "first significant closeness"),
                              ("copies", "tab:purple", "first copies")):
        steps, hit = _series(records, lambda r: float(bool((r.get("flags") or {}).get(flag))))
        if hit.any():
            events.append((float(steps[int(np.argmax(hit))]), color, text))
    return events


def _gap(k: int):
    """Getter of a monitor record's validation - training loss in noise band ``k`` (``None`` when missing)."""

    def get(r):
        gaps = (r.get("gap_by_t") or {}).get("gap") or []
        return _number(gaps[k]) if k < len(gaps) else None

    return get


def plot_monitor(records: Sequence[dict], path: str | Path, z_threshold: float = 2.0) -> Path:
    """The single-run monitor over training: losses, the train-validation gap per noise band, nearest-neighbour
    proximity to training vs held-out images, the data-copying z and f_mem, with the flagged steps marked.
    (One figure of four panels, drawn panel by panel.)
    """
    fig = Figure(figsize=(13, 7))
    axes = fig.subplots(2, 3).ravel()
    for ax in axes:
        _step_axis(ax, records)
        ax.grid(alpha=0.3)
    ax_loss, ax_gap, ax_z, ax_l2, ax_sim, ax_mem = axes

    if _plot_band(ax_loss, records, _key("val_loss"), _key("val_loss_sem"), "validation", color="tab:blue"):
        _plot_band(ax_loss, records, _key("train_loss"), _key("train_loss_sem"), "training images",
                   color="tab:blue", linestyle="--", alpha=0.7)
    else:
        _empty(ax_loss, "loss")
    ax_loss.set_ylabel("denoising loss (frozen noise)")

    first = next((r["gap_by_t"] for r in records if r.get("gap_by_t")), None)
    if first:
        for k, (lo, hi) in enumerate(zip(first["t_lo"], first["t_hi"])):
            s, v = _series(records, _gap(k))
            color = colormaps["viridis"](k / max(len(first["t_lo"]) - 1, 1))
            ax_gap.plot(s, v, marker="o", markersize=2, color=color, label=f"t {lo:.0f}-{hi:.0f}")
        ax_gap.axhline(0, color="gray", linewidth=0.8)
        ax_gap.legend(fontsize=6, ncol=2)
    else:
        _empty(ax_gap, "loss by noise level")
    ax_gap.set_ylabel("validation - training loss, per t band")

    s, z = _series(records, _key("copy_z"))
    if len(s):
        ax_z.plot(s, z, marker="o", markersize=3, color="tab:red", label="data-copying z")
        ax_z.axhline(-z_threshold, color="tab:red", linestyle=":", linewidth=1, label=f"z = -{z_threshold:g}")
        ax_z.axhline(0, color="gray", linewidth=0.8)
        ax_z.legend(fontsize=8)
    else:
        _empty(ax_z, "data-copying z")
    ax_z.set_ylabel("data-copying z (< 0: closer to training)")

    _plot_nn(ax_l2, records, "l2", "NN L2 distance of samples", MONITOR_NN_STYLE)
    _plot_nn(ax_sim, records, "sim", "NN cosine similarity", MONITOR_NN_STYLE)

    _plot_f_mem(ax_mem, records)

    for i, ax in enumerate(axes):
        for step, color, text in _monitor_events(records):
            ax.axvline(step, color=color, linestyle=":", linewidth=1.3, label=text if i == 0 else None)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(fontsize=7)
    fig.suptitle("Single-run monitor: loss, train-validation gap, proximity to training data", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
