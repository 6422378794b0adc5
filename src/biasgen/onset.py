"""Onset times: where a curve is smallest, with intervals from its own checkpoint noise (docs/method.md §9–§10).

Generic over the curve: twin cosine distance or test loss on images, KLs and
cross-entropies on hierarchical data. A curve is a table ``(n_units, n_ckpt)``
(units: pairs of twins, test examples, models) at the checkpoint ``steps``;
its mean over units is the curve that is judged.

Uncertainty comes from the curve's own checkpoint-to-checkpoint noise, never
from resampling units: units share each model's fluctuation at a checkpoint
(every pair containing the model, every sample it draws), so they are not
independent, and one pair of models has nothing to resample.

    tau = checkpoint_minimum(steps, curves)
    tau["step"], tau["ci"], tau["ci95"]

The verdict built on these onsets is :func:`biasgen.verdict.judge`.

Every function returns plain JSON-serialisable values.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .drift import DIFF_ORDER, N_BOOT, check_steps, check_table, floor_sd, noise_draws, noise_sd, valley_fit
from .errors import BiasgenError


# -- onset times ----------------------------------------------------------------------------------

def checkpoint_minimum(steps: Sequence[int], curves, n_boot: int = N_BOOT, seed: int = 0, reduce: str = "mean") -> dict:
    """Checkpoint at which the unit-reduced curve is smallest, with its uncertainty from checkpoint noise.

    ``steps``: ``(n_ckpt,)`` increasing training steps; ``curves``:
    ``(n_units, n_ckpt)`` tensor or array (or ``(n_ckpt,)``, one unit);
    ``reduce``: ``'mean'`` or ``'median'`` over units.

    The interval is a parametric bootstrap: the valley fit of the curve (non-
    increasing, then non-decreasing) plus independent normal noise of the
    curve's own checkpoint noise sd (:func:`noise_sd`, widened for the
    uncertainty of that estimate), ``n_boot`` times; the argmin of each
    simulated curve is one draw. Units are never resampled: they share each
    checkpoint's fluctuation. With ``DIFF_ORDER`` or fewer checkpoints the
    noise cannot be estimated and every checkpoint counts as possible.

    Returns ``step`` and ``index`` of the argmin; ``ci`` (central 68%) and
    ``ci95`` as ``[lo_step, hi_step]``; ``ci_level`` = 0.68; ``boot_steps``
    (one argmin step per draw); ``curve``, ``fit``, ``noise_sd``, ``steps``,
    ``n_units``, ``n_ckpt``, ``reduce``.
    """
    if reduce not in ("median", "mean"):
        raise BiasgenError(f"reduce must be 'median' or 'mean', got {reduce!r}.")
    steps = check_steps(steps)
    c = check_table("curves", curves, len(steps))
    curve = np.median(c, axis=0) if reduce == "median" else c.mean(axis=0)
    index = int(np.argmin(curve))
    if len(steps) <= DIFF_ORDER:
        fit, sd, boot_idx = curve, float("nan"), np.arange(len(steps))
    else:
        fit, sd = valley_fit(curve), floor_sd(curve, noise_sd(curve))
        boot_idx = noise_draws(fit, sd, n_boot, np.random.default_rng(seed)).argmin(axis=1)
    lo68, hi68 = np.quantile(boot_idx, 0.16, method="lower"), np.quantile(boot_idx, 0.84, method="higher")
    lo95, hi95 = np.quantile(boot_idx, 0.025, method="lower"), np.quantile(boot_idx, 0.975, method="higher")
    return {
        "step": int(steps[index]),
        "index": index,
        "ci": [int(steps[lo68]), int(steps[hi68])],
        "ci95": [int(steps[lo95]), int(steps[hi95])],
        "ci_level": 0.68,
        "boot_steps": steps[boot_idx].tolist(),
        "curve": curve.tolist(),
        "fit": np.asarray(fit).tolist(),
        "noise_sd": sd,
        "steps": steps.tolist(),
        "n_units": int(c.shape[0]),
        "n_ckpt": int(len(steps)),
        "reduce": reduce,
    }


def public_tau(tau: dict) -> dict:
    """A :func:`checkpoint_minimum` result without its bootstrap draws and curves (for summary.json)."""
    nan_to_none = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # JSON has no NaN
    return {k: nan_to_none(v) for k, v in tau.items() if k not in ("boot_steps", "curve", "fit", "steps")}


def score_crossing(steps: Sequence[int], train_sim, test_sim) -> int | None:
    """First checkpoint step from which the train-input similarity stays below the test-input one (docs/method.md §4).

    ``train_sim``, ``test_sim``: ``(n_ckpt,)`` score-level twin similarities on
    training and on test inputs. Returns None when train is not below test at
    the last checkpoint (no crossing yet).
    """
    steps = check_steps(steps)
    c = check_table("similarities", np.stack([np.asarray(train_sim, dtype=np.float64),
                                         np.asarray(test_sim, dtype=np.float64)]), len(steps))
    below = c[0] < c[1]
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    first = int(above[-1]) + 1 if len(above) else 0
    return int(steps[first])


def prob_before(boot_a: Sequence[int], boot_b: Sequence[int]) -> float:
    """``P(a < b) + P(a == b) / 2`` for independent draws from two bootstrap sets of steps."""
    a = np.asarray(boot_a)
    b = np.sort(np.asarray(boot_b))
    less = len(b) - np.searchsorted(b, a, side="right")  # b > a
    ties = np.searchsorted(b, a, side="right") - np.searchsorted(b, a, side="left")
    return float((less + 0.5 * ties).mean() / len(b))
