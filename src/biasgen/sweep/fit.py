"""Power laws ``tau ~ c * n**a`` across training-set sizes, with taus that were not reached treated as censored.

A tau located inside a run is a value; a tau whose curve was still falling at
the last checkpoint (or a memorization onset not yet seen) is only known to lie
*after* the last step: a lower bound, right-censored; a minimum at the very
first checkpoint is an upper bound, left-censored. Dropping the bounds would
bias the exponent low (the sizes whose tau was not reached are exactly the ones
with the largest tau), so the fit is a censored log-normal regression (Tobit):

    log tau_i = alpha + a * log n_i + sigma * z_i,   z_i ~ N(0, 1)

fitted by maximum likelihood, where a located value contributes its density, a
lower bound ``b`` the probability ``P(log tau > log b)`` and an upper bound ``u``
``P(log tau < log u)``. ``sigma`` has a floor (the resolution of the checkpoint
grid), so that three points on a line do not make the likelihood infinite.

    fit = fit_power_law([16, 32, 64, 128], [90, 180, 400, 1500], ["value", "value", "value", "lower"])
    fit["exponent"], fit["exponent_ci"]          # a and its 95% profile-likelihood interval (None = unbounded)
    predict(fit, 10_000)                         # {"step", "interval"}: prediction at n = 10k, 95% interval

The exponent interval is a profile-likelihood interval whose threshold is
calibrated on ordinary least squares (``n log(1 + t^2 / (n - 2))`` with
Student's t on ``n - 2`` degrees of freedom), so with no censoring it is
exactly the classical t interval of the slope; the prediction interval likewise
reduces to the classical ``t * s * sqrt(1 + 1/n + (x - mean)^2 / Sxx)``.
docs/sweep.md gives the definitions in words.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from ..errors import BiasgenError

CENSORING = ("value", "lower", "upper")  # located; right-censored (tau > bound); left-censored (tau < bound)
EXPONENT_RANGE = (-5.0, 5.0)  # the profile of the exponent is searched inside this range; beyond it: unbounded


def _data(sizes: Sequence[float], taus: Sequence[float], censoring: Sequence[str]):
    """Validated ``x = log n``, ``y = log tau`` (float64, ``(n_points,)``) and the censoring codes 0/1/2."""
    x, y = np.log(np.asarray(sizes, dtype=np.float64)), np.asarray(taus, dtype=np.float64)
    if not (len(x) == len(y) == len(censoring)) or len(x) == 0:
        raise BiasgenError(f"Need one tau and one censoring code per size; got {len(x)}, {len(y)}, {len(censoring)}.")
    if np.any(y <= 0) or not np.all(np.isfinite(y)) or not np.all(np.isfinite(x)):
        raise BiasgenError(f"Sizes and taus must be positive and finite; got sizes {list(sizes)}, taus {list(taus)}.")
    unknown = set(censoring) - set(CENSORING)
    if unknown:
        raise BiasgenError(f"Unknown censoring code(s) {sorted(unknown)}; use one of {', '.join(CENSORING)}.")
    return x, np.log(y), np.array([CENSORING.index(c) for c in censoring])


def _nll(alpha: float, a: float, sigma: float, x: np.ndarray, y: np.ndarray, code: np.ndarray) -> float:
    """Negative log-likelihood of the censored regression (``x``, ``y``, ``code``: ``(n_points,)``)."""
    z = (y - alpha - a * x) / sigma
    value = 0.5 * z[code == 0] ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    lower = -special.log_ndtr(-z[code == 1])  # P(tau > bound)
    upper = -special.log_ndtr(z[code == 2])  # P(tau < bound)
    return float(value.sum() + lower.sum() + upper.sum())


def _maximize(x, y, code, sigma_floor: float, a: float | None = None) -> tuple[float, float, float, float]:
    """``(alpha, a, sigma, nll)`` at the maximum likelihood (the exponent held at ``a`` when given).

    ``sigma = sigma_floor + exp(s)`` keeps the scatter above its floor; Powell's method needs no
    gradient and no BLAS (threaded BLAS is slow for 3 parameters on a busy machine).
    """
    xm = x.mean()
    slope0 = a if a is not None else (np.polyfit(x, y, 1)[0] if np.ptp(x) > 0 else 0.0)
    start = [float(np.mean(y - slope0 * (x - xm))), math.log(max(float(np.std(y)), sigma_floor))]
    if a is None:
        start.insert(1, float(slope0))

    def unpack(p):
        return (p[0], p[1], sigma_floor + math.exp(p[2])) if a is None else (p[0], a, sigma_floor + math.exp(p[1]))

    best = optimize.minimize(lambda p: _nll(*unpack(p), x - xm, y, code), start, method="Powell",
                             options=dict(xtol=1e-9, ftol=1e-13, maxfev=20_000))
    c, slope, sigma = unpack(best.x)
    return float(c - slope * xm), float(slope), float(sigma), float(best.fun)


def censored_mle(sizes, taus, censoring, sigma_floor: float = 0.05) -> dict:
    """Maximum-likelihood ``{exponent, prefactor, sigma}`` of ``tau = c * n**a`` (no intervals; fast)."""
    x, y, code = _data(sizes, taus, censoring)
    alpha, a, sigma, _ = _maximize(x, y, code, sigma_floor)
    return {"exponent": a, "prefactor": math.exp(alpha), "sigma": sigma}


def _threshold(n_points: int, level: float) -> float:
    """Rise of ``2 * nll`` that bounds the profile interval (exact OLS calibration, see the module docstring)."""
    t = stats.t.ppf(0.5 + level / 2, n_points - 2)
    return n_points * math.log(1 + t * t / (n_points - 2))


def fit_power_law(sizes: Sequence[float], taus: Sequence[float], censoring: Sequence[str], *,
                  sigma_floor: float = 0.05, level: float = 0.95) -> dict:
    """Fit ``tau = c * n**a`` to ``(n_points,)`` sizes, taus (a value or a bound each) and censoring codes.

    ``censoring[i]``: ``'value'`` (located), ``'lower'`` (tau_i > taus[i]) or ``'upper'``
    (tau_i < taus[i]). Needs at least 2 located values and 3 sizes (else returns
    ``{"fit": False, "reason": ...}``). Returns ``fit`` (True), ``exponent`` and
    ``exponent_ci`` (``level`` profile-likelihood interval; an end is ``None`` when
    the data do not bound it within ``EXPONENT_RANGE``), ``prefactor`` (c),
    ``sigma`` (scatter of log tau), the data, counts and internals for :func:`predict`.
    """
    x, y, code = _data(sizes, taus, censoring)
    counts = {"n_points": len(x), "n_located": int((code == 0).sum()), "n_lower_bounds": int((code == 1).sum()),
              "n_upper_bounds": int((code == 2).sum())}
    out = {"sizes": [float(s) for s in sizes], "taus": [float(t) for t in taus], "censoring": list(censoring),
           **counts, "ci_level": level, "sigma_floor": sigma_floor}
    if counts["n_located"] < 2 or len(set(x[code == 0])) < 2 or len(x) < 3:
        return out | {"fit": False, "reason": f"{counts['n_located']} located values over {len(x)} sizes: a power law "
                                              "needs at least 2 located values and 3 sizes."}
    alpha, a, sigma, nll = _maximize(x, y, code, sigma_floor)
    threshold = _threshold(len(x), level)

    def excess(value: float) -> float:  # > 0 outside the interval
        return 2 * (_maximize(x, y, code, sigma_floor, a=value)[3] - nll) - threshold

    ends = []
    for edge in EXPONENT_RANGE:
        ends.append(None if excess(edge) <= 0 else float(optimize.brentq(excess, *sorted((a, edge)), xtol=1e-6)))
    # the covariance of (alpha, a) at the fitted sigma, for prediction intervals
    hess = _hessian(lambda p: _nll(p[0], p[1], sigma, x - x.mean(), y, code),
                    np.array([alpha + a * x.mean(), a]))
    return out | {"fit": True, "exponent": a, "exponent_ci": ends, "prefactor": math.exp(alpha), "sigma": sigma,
                  "x_mean": float(x.mean()), "covariance": np.linalg.pinv(hess).tolist(),
                  "method": "censored log-normal regression (Tobit) by maximum likelihood; profile-likelihood interval"}


def _hessian(f, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    """Central finite-difference Hessian of ``f`` at ``p`` ``(k,)``: ``(k, k)``."""
    k = len(p)
    H = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
            H[i, j] = (f(p + ei + ej) - f(p + ei - ej) - f(p - ei + ej) + f(p - ei - ej)) / (4 * h * h)
    return H


def exponent_ci_width(fit: dict) -> float:
    """Width of the exponent interval (``inf`` when an end is unbounded or there is no fit)."""
    if not fit.get("fit") or None in fit["exponent_ci"]:
        return math.inf
    return fit["exponent_ci"][1] - fit["exponent_ci"][0]


def predict(fit: dict, n: float, level: float = 0.95) -> dict:
    """Predicted tau at size ``n``: ``{"step", "interval"}`` (median c*n**a and the ``level`` prediction interval).

    The interval covers a new measurement at ``n``: the uncertainty of the fitted
    line plus the scatter ``sigma``, inflated by ``n/(n-2)`` and with Student's
    t on ``n - 2`` degrees of freedom (exactly the classical interval without censoring).
    """
    k = fit["n_points"]
    dx = math.log(n) - fit["x_mean"]
    g = np.array([1.0, dx])
    mean = math.log(fit["prefactor"]) + fit["exponent"] * math.log(n)
    var = (g @ np.asarray(fit["covariance"]) @ g + fit["sigma"] ** 2) * k / (k - 2)
    half = stats.t.ppf(0.5 + level / 2, k - 2) * math.sqrt(max(var, 0.0))
    return {"step": math.exp(mean), "interval": [math.exp(mean - half), math.exp(mean + half)], "level": level}


def refusal(fit: dict, max_ci_width: float) -> str | None:
    """Why the tau of ``fit`` cannot be extrapolated (None when it can): which interval is too wide, and what would
    narrow it, from the fit's own counts of located values and bounds."""
    width = exponent_ci_width(fit)
    if fit.get("fit") and width <= max_ci_width:
        return None
    remedies = []
    if fit.get("n_lower_bounds"):
        remedies.append(f"train longer ({fit['n_lower_bounds']} size(s) ended before this tau)")
    if fit.get("n_upper_bounds"):
        remedies.append(f"save earlier checkpoints ({fit['n_upper_bounds']} size(s) had it at the first one)")
    remedies += ["measure more sizes" if fit.get("n_points", 0) < 6 else "repeat sizes with other seeds",
                 "add a larger size (the prediction reaches less far)"]
    if not fit.get("fit"):
        return f"no fit ({fit['reason']}); " + "; ".join(remedies[:-1] or remedies) + "."
    lo, hi = fit["exponent_ci"]
    interval = ("unbounded (" + ("no lower end" if lo is None else f"{lo:.2f}") + ".." +
                ("no upper end" if hi is None else f"{hi:.2f}") + ")") if math.isinf(width) else \
        f"{lo:.2f}..{hi:.2f}, {width:.2f} wide"
    return (f"the 95% interval of its exponent is {interval}, wider than the limit {max_ci_width} "
            f"(--max-exponent-ci-width), from {fit['n_points']} sizes with {fit['n_located']} located; to narrow it: "
            + "; ".join(remedies) + ".")


def extrapolate(fits: dict[str, dict], sizes_measured: Sequence[int], target_n: int, *, max_ci_width: float = 1.0,
                min_sizes: int = 3, level: float = 0.95) -> dict:
    """The advice for a training set of ``target_n`` examples, from the fits of each tau.

    ``fits``: ``{name: fit_power_law(...)}`` for ``tau_bias``, ``tau_data`` (with controls), ``tau_loss``,
    ``tau_mem``; ``sizes_measured``: the sizes with a complete run. A tau gets a number only when its fit
    exists and its exponent interval is bounded and at most ``max_ci_width`` wide (else :func:`refusal` says
    why); with fewer than ``min_sizes`` sizes nothing gets a number. The recommended stop is the lower end of
    the prediction interval of tau_data (the data-specific onset) when it gets a number, else of tau_bias.
    """
    largest = max(sizes_measured) if sizes_measured else 0
    reach = target_n / largest if largest else math.inf
    out = {"target_n": int(target_n), "largest_size": int(largest), "reach": reach, "level": level,
           "max_exponent_ci_width": max_ci_width, "min_sizes": min_sizes, "taus": {}}
    out["statement"] = (f"N = {target_n} is {reach:.3g}x the largest size measured ({largest}); the fits are "
                        f"extrapolated {math.log10(reach):.2g} decades beyond the data, assuming the same network, "
                        "batch size, learning rate and data distribution." if largest else "no size was measured.")
    if len(sizes_measured) < min_sizes:
        reason = f"only {len(sizes_measured)} size(s) measured; extrapolation needs at least {min_sizes}."
        return out | {"refused": reason, "recommended_step": None, "recommendation": f"No advice: {reason}"}
    for name, fit in fits.items():
        why = refusal(fit, max_ci_width)
        out["taus"][name] = {"refused": why} if why else predict(fit, target_n, level) | {"refused": None}
    candidates = [name for name in ("tau_data", "tau_bias") if name in out["taus"]]
    basis = next((name for name in candidates if not out["taus"][name]["refused"]), None)
    if basis is None:
        reason = " ".join(f"{name} cannot be extrapolated: {out['taus'][name]['refused']}" for name in candidates) \
            or "neither tau_data nor tau_bias was fitted."
        return out | {"refused": reason, "recommended_step": None, "recommendation": f"No advice: {reason}"}
    onset = out["taus"][basis]
    step = int(onset["interval"][0])
    return out | {"refused": None, "recommended_step": step, "recommendation_basis": f"lower end of the {level:.0%} "
                  f"prediction interval of {basis}",
                  "recommendation": f"Stop at or before step {step}: the lower end of the {level:.0%} prediction "
                                    f"interval of {basis} at N = {target_n} (median prediction "
                                    f"{onset['step']:.0f}). {out['statement']}"}
