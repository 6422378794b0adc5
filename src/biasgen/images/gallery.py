"""The gallery figure: rows of images side by side, e.g. twin samples from the same noise beside their nearest
training images (``fig_gallery.png`` of an audit, ``fig_monitor_gallery.png`` of the single-run monitor).

    rows = gallery_rows(run_dir, summary, train_sets, members)   # from the samples stored under samples/
    plot_gallery(rows, run_dir / "fig_gallery.png", value_range=(-1, 1))
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..checkpoint import load_tensors
from ..errors import BiasgenError
from ..runs import write_figure
from ..twins import model_pairs
from .metrics import nearest_neighbors


def plot_gallery(
    rows: Sequence[tuple[str, torch.Tensor]],
    path: str | Path,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """A labelled grid, one row per ``(label, images)``; ``images`` ``(N, C, H, W)`` with ``C`` in {1, 3}.

    ``value_range`` is the pixel range of the images: ``(-1, 1)`` or ``(0, 1)``;
    values outside it are clipped. Rows may hold different numbers of images.
    """
    if not rows:
        raise BiasgenError("plot_gallery needs at least one (label, images) row.")
    lo, hi = map(float, value_range)
    if not hi > lo:
        raise BiasgenError(f"plot_gallery value_range must be (low, high) with high > low, got {value_range}.")
    strips = []
    for label, images in rows:
        x = torch.as_tensor(images).detach().float().cpu()
        if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
            raise BiasgenError(
                f"Gallery row {label!r} must be a non-empty (N, C, H, W) tensor with C = 1 or 3, got {tuple(x.shape)}."
            )
        strips.append((label, ((x - lo) / (hi - lo)).clamp(0, 1).permute(0, 2, 3, 1).numpy()))  # (N, H, W, C)
    n_cols = max(len(s) for _, s in strips)
    h = max(s.shape[1] for _, s in strips)
    w = max(s.shape[2] for _, s in strips)
    cell = 0.6  # inches per image
    fig = Figure(figsize=(max(4.0, 1.0 + cell * n_cols), (cell + 0.3) * len(strips)))
    axes = fig.subplots(len(strips), 1, squeeze=False)[:, 0]
    for ax, (label, imgs) in zip(axes, strips):
        canvas = np.ones((h, n_cols * (w + 1) - 1, 3))  # one white pixel between images
        for j, img in enumerate(imgs):
            canvas[: img.shape[0], j * (w + 1) : j * (w + 1) + img.shape[1]] = img  # broadcasts gray to RGB
        ax.imshow(canvas, interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(label, loc="left", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return write_figure(fig, path, dpi=120)


def gallery_rows(run: Path, summary: dict, train_sets, members, n: int = 10):
    """Rows for the gallery: twin samples at tau_bias and at the last checkpoint, with their nearest training images."""
    (a, b) = model_pairs(members)[0][0]
    rows = []
    for label, step in (("tau_bias", summary["tau_bias"]["step"]), ("final", summary["checkpoints"][-1])):
        samples = load_tensors(run / "samples" / f"step_{step:07d}")[0]["samples"]
        sa, sb = samples[a][:n], samples[b][:n]
        own = nearest_neighbors(sa, train_sets[members[a][0]])["index"]
        oth = nearest_neighbors(sa, train_sets[members[b][0]])["index"]
        rows += [(f"{label} (step {step}): model A", sa), (f"{label}: model B, same noise", sb),
                 (f"{label}: nearest to A in A's split", train_sets[members[a][0]][own]),
                 (f"{label}: nearest to A in B's split", train_sets[members[b][0]][oth])]
    return rows
