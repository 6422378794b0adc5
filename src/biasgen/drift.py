"""The drift test behind the verdict: checkpoint noise, valley fits, and a calibrated test of a persistent rise.

Pure functions on curves ``(n_ckpt,)`` (or tables ``(n_units, n_ckpt)``); the method and its calibration are
in docs/method.md §10. :func:`biasgen.verdict.judge` combines them into the verdict.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .errors import BiasgenError

LEVEL = 0.05  # false-detection rate of the drift test
PERSIST = 3  # checkpoints a drift must last: the end level and the floor are means over this many
LEVEL_OFF = 5.0  # the null's tail is levelled from where it is within this many noise sd of its end value
N_BOOT = 2000  # simulated curves per bootstrap
MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation of a normal
DIFF_ORDER = 4  # order of the differences that estimate the checkpoint noise
DIFF_WEIGHTS = (  # binomial weights (1, -4, 6, -4, 1) scaled to unit norm: the differences have the noise's variance
    np.array([(-1) ** i * math.comb(DIFF_ORDER, i) for i in range(DIFF_ORDER + 1)])
    / math.sqrt(math.comb(2 * DIFF_ORDER, DIFF_ORDER))
)

# -- input checks ---------------------------------------------------------------------------------

def check_steps(steps: Sequence[int]) -> np.ndarray:
    """``(n_ckpt,)`` int64 array of strictly increasing steps."""
    s = np.asarray([int(v) for v in (steps.tolist() if hasattr(steps, "tolist") else steps)], dtype=np.int64)
    if s.ndim != 1 or len(s) == 0:
        raise BiasgenError(f"steps must be a non-empty list of checkpoint steps, got shape {s.shape}.")
    if np.any(np.diff(s) <= 0):
        raise BiasgenError(f"Checkpoint steps must be strictly increasing, got {s.tolist()}; sort the checkpoints.")
    return s


def check_table(name: str, values, n_ckpt: int) -> np.ndarray:
    """``values`` ``(n_units, n_ckpt)`` (or ``(n_ckpt,)``, one unit) as a float64 array, checked."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] != n_ckpt or v.shape[0] == 0:
        raise BiasgenError(
            f"{name} must have shape (n_units, n_checkpoints={n_ckpt}), got {tuple(v.shape)}; "
            "pass one row per unit and one column per checkpoint step."
        )
    if not np.isfinite(v).all():
        raise BiasgenError(f"{name} holds NaN or infinite values; drop the bad checkpoints or rows first.")
    return v


def check_pairs(name: str, pairs, n_rows: int) -> list[tuple[int, int]]:
    """``pairs``: one ``(i, j)`` model-index pair per row, ``i != j``."""
    out = [tuple(int(m) for m in p) for p in pairs]
    if len(out) != n_rows or any(len(p) != 2 or p[0] == p[1] or min(p) < 0 for p in out):
        raise BiasgenError(
            f"{name} must list one (i, j) pair of distinct model indices per row ({n_rows} rows), got {out}."
        )
    return out


# -- curve fits and noise -------------------------------------------------------------------------

def _antitonic(y: np.ndarray) -> np.ndarray:
    """Least-squares non-increasing fit of ``y`` ``(n,)`` (pool adjacent violators)."""
    means, sizes = [], []
    for v in y:
        means.append(float(v))
        sizes.append(1)
        while len(means) > 1 and means[-2] < means[-1]:
            m, n = means.pop(), sizes.pop()
            means[-1] = (means[-1] * sizes[-1] + m * n) / (sizes[-1] + n)
            sizes[-1] += n
    return np.repeat(means, sizes)


def valley_fit(y) -> np.ndarray:
    """Least-squares fit of ``y`` ``(n,)`` that first does not increase, then does not decrease."""
    y = np.asarray(y, dtype=np.float64)
    best, best_rss = y, np.inf
    for split in range(len(y) + 1):
        fit = np.concatenate([_antitonic(y[:split]), -_antitonic(-y[split:])])
        rss = float(((y - fit) ** 2).sum())
        if rss < best_rss:
            best, best_rss = fit, rss
    return best


def noise_sd(y) -> np.ndarray:
    """Checkpoint-to-checkpoint noise sd of curves ``(..., n_ckpt)`` -> ``(...)``; needs n_ckpt > ``DIFF_ORDER``.

    Robust difference estimator: the normalised ``DIFF_ORDER``-th differences
    of consecutive checkpoints cancel any smooth trend (a polynomial of lower
    degree exactly, a smooth fall nearly) and have the noise variance under
    independent noise; their median absolute value, scaled to a normal sd,
    ignores the few checkpoints where the curve bends sharply.
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[-1] - DIFF_ORDER
    resid = sum(w * y[..., i : i + n] for i, w in enumerate(DIFF_WEIGHTS))
    return MAD_TO_SD * np.median(np.abs(resid), axis=-1)


def _window_means(y: np.ndarray, width: int) -> np.ndarray:
    """Means of ``width`` consecutive checkpoints: ``(..., n_ckpt)`` -> ``(..., n_ckpt - width + 1)``."""
    c = np.cumsum(np.concatenate([np.zeros(y.shape[:-1] + (1,)), y], axis=-1), axis=-1)
    return (c[..., width:] - c[..., :-width]) / width


def end_rise(y, persist: int = PERSIST) -> tuple[np.ndarray, np.ndarray]:
    """How far curves ``(..., n_ckpt)`` end above their floor: ``(rise, floor_start)``, each ``(...)``.

    The end level is the mean of the last ``persist`` checkpoints; the floor is
    the lowest mean of ``persist`` consecutive earlier checkpoints (disjoint from
    the end), starting at index ``floor_start``. Needs ``n_ckpt >= 2 * persist``.
    """
    y = np.asarray(y, dtype=np.float64)
    means = _window_means(y, persist)
    earlier = means[..., : y.shape[-1] - 2 * persist + 1]
    return means[..., -1] - earlier.min(axis=-1), earlier.argmin(axis=-1)


def _levelled_null(y: np.ndarray, sd: float) -> np.ndarray:
    """The least favourable non-drifting mean for ``y`` ``(n,)``: its non-increasing fit, flat from where it is
    within ``LEVEL_OFF`` noise sd of its end value (a flat tail gives the largest chance of a spurious rise)."""
    fit = _antitonic(y)
    start = int(np.argmax(fit - fit[-1] <= LEVEL_OFF * sd))
    fit[start:] = fit[start]
    return fit


def noise_draws(fit: np.ndarray, sd: float, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` simulated curves: ``fit`` ``(n,)`` plus normal noise whose sd carries the uncertainty of
    the estimate ``sd``: each draw uses ``sd / r`` with ``r`` the ratio estimate/truth of :func:`noise_sd` on a
    pure-noise curve of the same length (so a curve whose noise was underestimated still gets wide intervals)."""
    ratio = noise_sd(rng.standard_normal((n_boot, len(fit))))
    return fit + (sd / np.maximum(ratio, 1e-3))[:, None] * rng.standard_normal((n_boot, len(fit)))


def min_checkpoints(persist: int = PERSIST) -> int:
    """Fewest checkpoints the drift test works with: a floor and an end level of ``persist`` checkpoints each, one
    checkpoint between them, and enough differences to estimate the noise."""
    return max(2 * persist + 1, DIFF_ORDER + 3)


def floor_sd(y: np.ndarray, sd: float) -> float:
    """``sd`` kept above a tiny fraction of the curve's scale, so that noise-free curves stay well defined."""
    return max(float(sd), 1e-9 * (float(np.abs(y).max()) + 1e-12))


# -- the drift test -------------------------------------------------------------------------------

def _padded(y: np.ndarray, n: int) -> np.ndarray:
    """``y`` ``(..., m)`` continued flat at its last value to ``(..., n)``."""
    return np.concatenate([y, np.repeat(y[..., -1:], n - y.shape[-1], axis=-1)], axis=-1)


def drift_test(steps: Sequence[int], curve, *, until: int | None = None, level: float = LEVEL, persist: int = PERSIST,
               n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Has ``curve`` ``(n_ckpt,)`` risen persistently above its floor by checkpoint index ``until``, beyond noise?

    ``until``: the last checkpoint of the end level (default: the last checkpoint). The checkpoints after it
    play no part in the statistic; they only sharpen the noise estimate, which uses the whole curve.

    Statistic: ``T = end_rise(curve[:until + 1]) / noise_sd(curve)`` (:func:`end_rise`:
    mean of the ``persist`` checkpoints ending at ``until`` minus the lowest mean of
    ``persist`` earlier consecutive ones). The floor is chosen on the same
    numbers, so T is compared with its distribution under the least favourable
    curve that never rises: the non-increasing fit of the curve up to ``until``, levelled flat
    where it is within ``LEVEL_OFF`` noise sd of its end (for every non-
    increasing mean a flat stretch is the worst case), continued flat to the last checkpoint, plus normal noise
    of the estimated sd; each simulated curve is studentized by its own estimated sd,
    as the data are. ``p_value`` = (1 + #{T* >= T}) / (1 + n_boot).

    Returns ``p_value``, ``statistic`` (T), ``drift`` = ``{value, raw, ci, ci95,
    floor_steps, end_steps}`` (the rise corrected for its selection bias, with
    68%/95% intervals from a parametric bootstrap around the valley fit of the
    curve), ``detectable_drift`` (a rise of the ``persist`` end checkpoints
    that this curve's noise lets the test detect 80% of the time),
    ``noise_sd``, ``persist``, ``until_step``. Needs ``min_checkpoints(persist)`` checkpoints up to ``until``.
    """
    steps = check_steps(steps)
    y = check_table("curve", curve, len(steps))[0]
    until = len(y) - 1 if until is None else int(until)
    if not until < len(y) or until + 1 < min_checkpoints(persist):
        raise BiasgenError(f"The drift test needs at least {min_checkpoints(persist)} checkpoints up to the one it "
                           f"tests, got {min(until, len(y) - 1) + 1}; save more checkpoints.")
    rng = np.random.default_rng(seed)
    sd = floor_sd(y, noise_sd(y))
    head = y[: until + 1]
    rise, floor_start = end_rise(head, persist)
    null = _padded(_levelled_null(head, sd), len(y)) + sd * rng.standard_normal((n_boot, len(y)))
    null_rise, null_sd = end_rise(null[:, : until + 1], persist)[0], np.maximum(noise_sd(null), 1e-300)
    t_null = null_rise / null_sd
    t_obs = float(rise) / sd
    p_value = float((1 + np.count_nonzero(t_null >= t_obs)) / (1 + n_boot))
    # raising the last `persist` checkpoints by delta adds delta to each null draw's rise: detected when
    # null_rise + delta >= t_crit * null_sd, i.e. in 80% of the draws once delta reaches this quantile
    t_crit = np.quantile(t_null, 1 - level)
    detectable = float(np.quantile(t_crit * null_sd - null_rise, 0.8))
    fit = valley_fit(head)
    draws = noise_draws(_padded(fit, len(y)), sd, n_boot, rng)[:, : until + 1]
    error = end_rise(draws, persist)[0] - end_rise(fit, persist)[0]  # overshoot of the rise
    q = np.quantile(error, [0.025, 0.16, 0.84, 0.975])
    floor_start = int(floor_start)
    return {
        "p_value": p_value,
        "statistic": t_obs,
        "drift": {
            "value": float(rise - error.mean()),
            "raw": float(rise),
            "ci": [float(rise - q[2]), float(rise - q[1])],
            "ci95": [float(rise - q[3]), float(rise - q[0])],
            "floor_steps": [int(steps[floor_start]), int(steps[floor_start + persist - 1])],
            "end_steps": [int(steps[until - persist + 1]), int(steps[until])],
        },
        "detectable_drift": detectable,
        "noise_sd": sd,
        "persist": persist,
        "until_step": int(steps[until]),
    }


# -- the onset of a rise --------------------------------------------------------------------------

def hinge_fit(y) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares "flat, then rising linearly" fits of curves ``y`` ``(..., n)``: ``(knot, fit)``.

    For every knot ``k`` the model is ``a`` up to checkpoint ``k`` and ``a + b (c - k)`` after it, ``b >= 0``
    (checkpoint index ``c``, so log-spaced checkpoints give a rise linear in log step); ``knot`` ``(...)`` is
    the best ``k`` (ties go to the later knot, so a curve that never rises has its knot at the last checkpoint), ``fit``
    ``(..., n)`` its fitted values.
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.shape[-1]
    c = np.arange(n, dtype=np.float64)
    best_rss, knot, fit = np.full(y.shape[:-1], np.inf), np.zeros(y.shape[:-1], dtype=np.int64), np.zeros_like(y)
    for k in range(n):
        x = np.maximum(c - k, 0.0)  # (n,): the hinge regressor
        xc = x - x.mean()
        slope = np.zeros(y.shape[:-1]) if k == n - 1 else np.maximum((y * xc).sum(-1) / (xc**2).sum(), 0.0)
        level = y.mean(-1) - slope * x.mean()
        f = level[..., None] + slope[..., None] * x
        rss = ((y - f) ** 2).sum(-1)
        better = rss <= best_rss * (1 + 1e-9) + 1e-15  # ties go to the later knot: no rise yet
        best_rss, knot = np.where(better, rss, best_rss), np.where(better, k, knot)
        fit = np.where(better[..., None], f, fit)
    return knot, fit


def rise_onset(steps: Sequence[int], curve, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The last checkpoint before ``curve`` ``(n_ckpt,)`` starts its persistent rise, with intervals.

    The onset is the knot of :func:`hinge_fit` (flat, then a linear rise). Its intervals are a parametric
    bootstrap from the curve's own checkpoint noise, as for a minimum (:func:`noise_draws` around the fit).
    Returns ``step``, ``index``, ``ci`` (central 68%), ``ci95`` (``[lo_step, hi_step]``), ``ci_level`` = 0.68,
    ``slope`` (rise per checkpoint after the knot), ``noise_sd``. Needs more than ``DIFF_ORDER`` checkpoints.
    """
    steps = check_steps(steps)
    y = check_table("curve", curve, len(steps))[0]
    if len(y) <= DIFF_ORDER:
        raise BiasgenError(f"Locating a rise needs more than {DIFF_ORDER} checkpoints, got {len(y)}.")
    knot, fit = hinge_fit(y)
    sd = floor_sd(y, noise_sd(y))
    boot = hinge_fit(noise_draws(fit, sd, n_boot, np.random.default_rng(seed)))[0]
    lo68, hi68, lo95, hi95 = (np.quantile(boot, q, method=m) for q, m in
                              ((0.16, "lower"), (0.84, "higher"), (0.025, "lower"), (0.975, "higher")))
    slope = float(fit[-1] - fit[-2]) if int(knot) < len(y) - 1 else 0.0
    return {"step": int(steps[knot]), "index": int(knot), "ci": [int(steps[lo68]), int(steps[hi68])],
            "ci95": [int(steps[lo95]), int(steps[hi95])], "ci_level": 0.68, "slope": slope, "noise_sd": sd}
