"""The drift test behind the verdict: checkpoint noise, valley fits, and a calibrated test of a persistent rise.

Pure functions on curves ``(n_ckpt,)`` (or tables ``(n_units, n_ckpt)``); the method and its calibration are
in docs/method.md §10. :func:`biasgen.onset.judge` combines them into the verdict.
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

def _steps(steps: Sequence[int]) -> np.ndarray:
    """``(n_ckpt,)`` int64 array of strictly increasing steps."""
    s = np.asarray([int(v) for v in (steps.tolist() if hasattr(steps, "tolist") else steps)], dtype=np.int64)
    if s.ndim != 1 or len(s) == 0:
        raise BiasgenError(f"steps must be a non-empty list of checkpoint steps, got shape {s.shape}.")
    if np.any(np.diff(s) <= 0):
        raise BiasgenError(f"Checkpoint steps must be strictly increasing, got {s.tolist()}; sort the checkpoints.")
    return s


def _table(name: str, values, n_ckpt: int) -> np.ndarray:
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


def _pairs(name: str, pairs, n_rows: int) -> list[tuple[int, int]]:
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


def _draws(fit: np.ndarray, sd: float, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` simulated curves: ``fit`` ``(n,)`` plus normal noise whose sd carries the uncertainty of
    the estimate ``sd``: each draw uses ``sd / r`` with ``r`` the ratio estimate/truth of :func:`noise_sd` on a
    pure-noise curve of the same length (so a curve whose noise was underestimated still gets wide intervals)."""
    ratio = noise_sd(rng.standard_normal((n_boot, len(fit))))
    return fit + (sd / np.maximum(ratio, 1e-3))[:, None] * rng.standard_normal((n_boot, len(fit)))


def min_checkpoints(persist: int = PERSIST) -> int:
    """Fewest checkpoints the drift test works with: a floor and an end level of ``persist`` checkpoints each, one
    checkpoint between them, and enough differences to estimate the noise."""
    return max(2 * persist + 1, DIFF_ORDER + 3)


def _floor_sd(y: np.ndarray, sd: float) -> float:
    """``sd`` kept above a tiny fraction of the curve's scale, so that noise-free curves stay well defined."""
    return max(float(sd), 1e-9 * (float(np.abs(y).max()) + 1e-12))


# -- the drift test -------------------------------------------------------------------------------

def drift_test(steps: Sequence[int], curve, *, level: float = LEVEL, persist: int = PERSIST, n_boot: int = N_BOOT,
               seed: int = 0) -> dict:
    """Does ``curve`` ``(n_ckpt,)`` end persistently above its floor, beyond checkpoint noise?

    Statistic: ``T = end_rise(curve) / noise_sd(curve)`` (:func:`end_rise`:
    mean of the last ``persist`` checkpoints minus the lowest mean of
    ``persist`` earlier consecutive ones). The floor is chosen on the same
    numbers, so T is compared with its distribution under the least favourable
    curve that never rises: the non-increasing fit of the curve, levelled flat
    where it is within ``LEVEL_OFF`` noise sd of its end (for every non-
    increasing mean a flat stretch is the worst case), plus normal noise of the
    estimated sd; each simulated curve is studentized by its own estimated sd,
    as the data are. ``p_value`` = (1 + #{T* >= T}) / (1 + n_boot).

    Returns ``p_value``, ``statistic`` (T), ``drift`` = ``{value, raw, ci, ci95,
    floor_steps, end_steps}`` (the rise corrected for its selection bias, with
    68%/95% intervals from a parametric bootstrap around the valley fit of the
    curve), ``detectable_drift`` (a rise of the last ``persist`` checkpoints
    that this curve's noise lets the test detect 80% of the time),
    ``noise_sd``, ``persist``. Needs ``min_checkpoints(persist)`` checkpoints.
    """
    steps = _steps(steps)
    y = _table("curve", curve, len(steps))[0]
    if len(y) < min_checkpoints(persist):
        raise BiasgenError(f"The drift test needs at least {min_checkpoints(persist)} checkpoints, got {len(y)}; "
                           "save more checkpoints.")
    rng = np.random.default_rng(seed)
    sd = _floor_sd(y, noise_sd(y))
    rise, floor_start = end_rise(y, persist)
    null = _levelled_null(y, sd) + sd * rng.standard_normal((n_boot, len(y)))
    null_rise, null_sd = end_rise(null, persist)[0], np.maximum(noise_sd(null), 1e-300)
    t_null = null_rise / null_sd
    t_obs = float(rise) / sd
    p_value = float((1 + np.count_nonzero(t_null >= t_obs)) / (1 + n_boot))
    # raising the last `persist` checkpoints by delta adds delta to each null draw's rise: detected when
    # null_rise + delta >= t_crit * null_sd, i.e. in 80% of the draws once delta reaches this quantile
    t_crit = np.quantile(t_null, 1 - level)
    detectable = float(np.quantile(t_crit * null_sd - null_rise, 0.8))
    fit = valley_fit(y)
    error = end_rise(_draws(fit, sd, n_boot, rng), persist)[0] - end_rise(fit, persist)[0]  # overshoot of the rise
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
            "end_steps": [int(steps[-persist]), int(steps[-1])],
        },
        "detectable_drift": detectable,
        "noise_sd": sd,
        "persist": persist,
    }
