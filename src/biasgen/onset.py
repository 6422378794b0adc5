"""Onset times, the biased-generalization window, a verdict and a stopping advice (docs/method.md §0, §2–§4, §7).

Generic over the curve: twin cosine distance or test loss on images, KLs and
cross-entropies on hierarchical data. A curve is a table ``(n_units, n_ckpt)``
of per-unit values (units: pairs of twins, samples, or test examples) at the
checkpoint ``steps``; its reduced curve (median or mean over units) locates the
minimum, and a bootstrap over units gives the minimum's uncertainty.

    bias = checkpoint_minimum(steps, twin_dist_per_pair)   # tau_bias
    loss = checkpoint_minimum(steps, test_loss_per_example, reduce="mean")   # tau_loss
    v = verdict(bias, loss)
    advice = recommend(v, bias, loss)

Every function returns plain JSON-serialisable values.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import BiasgenError

DETECT_P = 0.9  # P(tau_bias < tau_loss) at or above which bias is called
REJECT_P = 0.1  # at or below which no bias is called
RISE_Z = 2.0  # the twin distance must rise after its minimum by this many bootstrap standard errors
BOOT_CHUNK_VALUES = 4_000_000  # bootstrap replicates are processed in chunks of about this many values


def _table(steps: Sequence[int], curves) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``steps`` ``(n_ckpt,)`` and ``curves`` ``(n_units, n_ckpt)`` (or ``(n_ckpt,)``); float64 arrays."""
    steps = np.asarray([int(s) for s in steps], dtype=np.int64)
    c = curves.detach().cpu().numpy() if isinstance(curves, torch.Tensor) else np.asarray(curves)
    c = np.asarray(c, dtype=np.float64)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != len(steps) or len(steps) == 0 or c.shape[0] == 0:
        raise BiasgenError(
            f"Expected curves of shape (n_units, n_checkpoints={len(steps)}), got {c.shape}; "
            "pass one column per checkpoint step."
        )
    if np.any(np.diff(steps) <= 0):
        raise BiasgenError(f"Checkpoint steps must be strictly increasing, got {steps.tolist()}.")
    if not np.isfinite(c).all():
        raise BiasgenError("The curve holds NaN or infinite values; drop the bad checkpoints or units first.")
    return steps, c


def _reduce(c: np.ndarray, reduce: str) -> np.ndarray:
    """Reduce over units (axis -2): ``(..., n_units, n_ckpt)`` -> ``(..., n_ckpt)``."""
    return np.median(c, axis=-2) if reduce == "median" else c.mean(axis=-2)


def checkpoint_minimum(
    steps: Sequence[int],
    curves,
    n_boot: int = 1000,
    seed: int = 0,
    reduce: str = "median",
) -> dict:
    """Checkpoint at which the unit-reduced curve is smallest, with a bootstrap over units.

    ``steps``: ``(n_ckpt,)`` increasing training steps; ``curves``:
    ``(n_units, n_ckpt)`` tensor or array (or ``(n_ckpt,)``, one unit).
    ``reduce``: ``'median'`` or ``'mean'`` over units.

    Returns ``step`` and ``index`` of the argmin; ``ci`` = central 68% interval
    ``[lo_step, hi_step]`` and ``ci95`` = central 95% interval of the bootstrap
    argmin steps (``ci_level`` = 0.68 names the first); ``boot_steps`` (one
    argmin step per replicate); ``curve`` (the reduced curve) and ``curve_se``
    (its bootstrap standard error); ``rise`` = last value minus the minimum and
    ``rise_se`` its paired bootstrap standard error; ``steps``; ``n_units``;
    ``n_ckpt``. With a single unit there is nothing to resample:
    ``ci = ci95 = [step, step]`` and all errors are 0.
    """
    if reduce not in ("median", "mean"):
        raise BiasgenError(f"reduce must be 'median' or 'mean', got {reduce!r}.")
    steps, c = _table(steps, curves)
    n_units, n_ckpt = c.shape
    curve = _reduce(c, reduce)
    index = int(np.argmin(curve))
    if n_units == 1:
        boot = np.full((1, n_ckpt), curve)
    else:
        rng = np.random.default_rng(seed)
        chunk = max(1, BOOT_CHUNK_VALUES // (n_units * n_ckpt))
        parts = []
        for start in range(0, n_boot, chunk):
            units = rng.integers(0, n_units, (min(chunk, n_boot - start), n_units))
            parts.append(_reduce(c[units], reduce))
        boot = np.concatenate(parts)  # (n_boot, n_ckpt)
    boot_idx = boot.argmin(1)
    boot_steps = steps[boot_idx]
    lo68, hi68 = np.quantile(boot_idx, 0.16, method="lower"), np.quantile(boot_idx, 0.84, method="higher")
    lo95, hi95 = np.quantile(boot_idx, 0.025, method="lower"), np.quantile(boot_idx, 0.975, method="higher")
    return {
        "step": int(steps[index]),
        "index": index,
        "ci": [int(steps[lo68]), int(steps[hi68])],
        "ci95": [int(steps[lo95]), int(steps[hi95])],
        "ci_level": 0.68,
        "boot_steps": boot_steps.tolist(),
        "curve": curve.tolist(),
        "curve_se": boot.std(0).tolist(),
        "rise": float(curve[-1] - curve[index]),
        "rise_se": float((boot[:, -1] - boot[:, index]).std()),
        "steps": steps.tolist(),
        "n_units": int(n_units),
        "n_ckpt": int(n_ckpt),
        "reduce": reduce,
    }


def score_crossing(steps: Sequence[int], train_sim, test_sim) -> int | None:
    """First checkpoint step from which the train-input similarity stays below the test-input one (docs/method.md §4).

    ``train_sim``, ``test_sim``: ``(n_ckpt,)`` score-level twin similarities on
    training and on test inputs. Returns None when train is not below test at
    the last checkpoint (no crossing yet).
    """
    steps, c = _table(steps, np.stack([np.asarray(train_sim, dtype=np.float64), np.asarray(test_sim, dtype=np.float64)]))
    below = c[0] < c[1]
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    first = int(above[-1]) + 1 if len(above) else 0
    return int(steps[first])


def biased_window(tau_bias: int, tau_loss: int) -> dict:
    """The biased-generalization window ``[tau_bias, tau_loss]``: ``{start, end, length, exists}`` (length in steps, 0 if none)."""
    tau_bias, tau_loss = int(tau_bias), int(tau_loss)
    return {"start": tau_bias, "end": tau_loss, "length": max(0, tau_loss - tau_bias), "exists": tau_bias < tau_loss}


def prob_before(boot_a: Sequence[int], boot_b: Sequence[int]) -> float:
    """``P(a < b) + P(a == b) / 2`` for independent draws from two bootstrap sets of steps."""
    a = np.asarray(boot_a)
    b = np.sort(np.asarray(boot_b))
    less = len(b) - np.searchsorted(b, a, side="right")  # b > a
    ties = np.searchsorted(b, a, side="right") - np.searchsorted(b, a, side="left")
    return float((less + 0.5 * ties).mean() / len(b))


def _call(name: str, reason: str) -> dict:
    return {"verdict": name, "reason": reason}


def verdict(bias: dict, loss: dict, p_detect: float = DETECT_P, p_reject: float = REJECT_P, rise_z: float = RISE_Z) -> dict:
    """Decide whether the twins drift apart before the test loss bottoms out.

    ``bias``, ``loss``: :func:`checkpoint_minimum` results of the twin-distance
    curve (tau_bias) and of the test-loss curve (tau_loss), on the same steps.
    ``p`` = P(tau_bias < tau_loss) over the two bootstrap sets (ties count 1/2).

    - ``'inconclusive'`` when the twin-distance minimum sits at the last
      checkpoint (run too short), when a curve has a single unit (no
      uncertainty), or when p is between ``p_reject`` and ``p_detect``;
    - ``'biased-generalization-detected'`` when ``p >= p_detect``, tau_bias is
      not the first checkpoint, and the twin distance rises after its minimum
      by more than ``rise_z`` bootstrap standard errors (otherwise inconclusive).
      A test loss still falling at the last checkpoint does not prevent this:
      tau_loss is then only known to be at or after the last checkpoint
      (``tau_loss_open``), which places tau_bias before it all the more;
    - ``'no-bias-detected'`` when ``p <= p_reject`` and both 95% intervals stay
      clear of the last checkpoint.

    Returns ``{verdict, reason, p_bias_before_loss, tau_bias, tau_loss, tau_loss_open, window}``.
    """
    if bias["steps"] != loss["steps"]:
        raise BiasgenError("The twin-distance and test-loss curves must use the same checkpoints.")
    p = prob_before(bias["boot_steps"], loss["boot_steps"])
    out = {
        "p_bias_before_loss": p,
        "tau_bias": bias["step"],
        "tau_loss": loss["step"],
        "window": biased_window(bias["step"], loss["step"]),
    }
    last = len(bias["steps"]) - 1
    rise_ok = bias["rise"] > rise_z * bias["rise_se"]
    loss_open = loss["index"] == last
    out["tau_loss_open"] = loss_open
    if bias["index"] == last:
        return out | _call("inconclusive", "the twins still grow more alike at the last checkpoint; train longer to locate tau_bias.")
    if bias["n_units"] == 1 or loss["n_units"] == 1:
        return out | _call("inconclusive", "a curve has a single unit, so the uncertainty of its minimum cannot be estimated.")
    if p >= p_detect:
        if bias["index"] == 0:
            return out | _call(
                "inconclusive",
                "the twin distance is smallest at the first checkpoint (twins never converged: same init, or the first "
                "checkpoint is too late); add earlier checkpoints or use different init seeds.",
            )
        if not rise_ok:
            return out | _call(
                "inconclusive",
                f"tau_bias={bias['step']} precedes tau_loss={loss['step']} (P={p:.2f}), but the twin distance rises only "
                f"{bias['rise']:.3g} ± {bias['rise_se']:.3g} after its minimum, not clearly above noise.",
            )
        until = (f"is still falling at the last checkpoint, step {loss['step']} (tau_loss lies at or after it)"
                 if loss_open else f"keeps falling until step {loss['step']} (68% CI {loss['ci']})")
        return out | _call(
            "biased-generalization-detected",
            f"the twins start drifting apart at step {bias['step']} (68% CI {bias['ci']}) while the test loss "
            f"{until}; P(tau_bias < tau_loss) = {p:.2f}.",
        )
    if loss_open:
        return out | _call("inconclusive", "the test loss is still falling at the last checkpoint; train longer to locate tau_loss.")
    if p <= p_reject:
        if bias["ci95"][1] == bias["steps"][-1] or loss["ci95"][1] == loss["steps"][-1]:
            return out | _call(
                "inconclusive",
                f"tau_bias={bias['step']} does not precede tau_loss={loss['step']} (P={p:.2f}), but a 95% interval reaches "
                "the last checkpoint; train longer.",
            )
        return out | _call(
            "no-bias-detected",
            f"the twins keep converging until step {bias['step']} (68% CI {bias['ci']}), not before the test-loss "
            f"minimum at step {loss['step']} (68% CI {loss['ci']}); P(tau_bias < tau_loss) = {p:.2f}.",
        )
    return out | _call(
        "inconclusive",
        f"tau_bias={bias['step']} (68% CI {bias['ci']}) and tau_loss={loss['step']} (68% CI {loss['ci']}) are not "
        f"resolved: P(tau_bias < tau_loss) = {p:.2f}; use more samples, more twin pairs or denser checkpoints.",
    )


def recommend(decision: dict, bias: dict, loss: dict) -> dict:
    """The checkpoint to stop at: ``{step, basis, rationale}``.

    ``decision``: a :func:`verdict` result; ``bias``, ``loss``: the
    :func:`checkpoint_minimum` results it was made from. When bias is detected
    this is tau_bias, the last checkpoint before the twins drift apart (the
    privacy-safe choice); otherwise tau_loss, the usual early-stopping point.
    """
    if decision["verdict"] == "biased-generalization-detected":
        return {
            "step": bias["step"],
            "basis": "tau_bias",
            "rationale": f"Stop at step {bias['step']}, before the models start favouring their own training data; "
            f"training on to the test-loss minimum at step {loss['step']} buys a lower loss at the cost of privacy.",
        }
    caveat = "no bias was detected" if decision["verdict"] == "no-bias-detected" else "the bias test was inconclusive"
    return {
        "step": loss["step"],
        "basis": "tau_loss",
        "rationale": f"Stop at the test-loss minimum, step {loss['step']}, since {caveat}"
        + (f" (if privacy matters, step {bias['step']} is the cautious choice)." if bias["step"] < loss["step"] else "."),
    }


def public_tau(tau: dict) -> dict:
    """A :func:`checkpoint_minimum` result without its bootstrap draws and curves (for summary.json)."""
    return {k: v for k, v in tau.items() if k not in ("boot_steps", "curve", "curve_se", "steps")}
