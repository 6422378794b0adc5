"""Onset times and the judge of biased generalization (docs/method.md §9–§10).

Generic over the curve: twin cosine distance or test loss on images, KLs and
cross-entropies on hierarchical data. A curve is a table ``(n_units, n_ckpt)``
(units: pairs of twins, test examples, models) at the checkpoint ``steps``;
its mean over units is the curve that is judged.

Uncertainty comes from the curve's own checkpoint-to-checkpoint noise, never
from resampling units: units share each model's fluctuation at a checkpoint
(every pair containing the model, every sample it draws), so they are not
independent, and one pair of models has nothing to resample.

    result = judge(steps, twin_distance, twin_pairs, test_loss, control_distance, control_pairs, members=members)
    result["verdict"], result["reason"], result["recommended_step"], result["negative_controls"]

Every function returns plain JSON-serialisable values.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .drift import (DIFF_ORDER, LEVEL, N_BOOT, PERSIST, _draws, _floor_sd, _pairs, _steps, _table, drift_test,
                    min_checkpoints, noise_sd, valley_fit)
from .errors import BiasgenError

ORDER_P = 0.9  # P(tau_bias < tau_loss) needed to place the drift before the test-loss minimum
VERDICTS = ("biased-generalization-detected", "no-bias-detected", "inconclusive")


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
    steps = _steps(steps)
    c = _table("curves", curves, len(steps))
    curve = np.median(c, axis=0) if reduce == "median" else c.mean(axis=0)
    index = int(np.argmin(curve))
    if len(steps) <= DIFF_ORDER:
        fit, sd, boot_idx = curve, float("nan"), np.arange(len(steps))
    else:
        fit, sd = valley_fit(curve), _floor_sd(curve, noise_sd(curve))
        boot_idx = _draws(fit, sd, n_boot, np.random.default_rng(seed)).argmin(axis=1)
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
    steps = _steps(steps)
    c = _table("similarities", np.stack([np.asarray(train_sim, dtype=np.float64),
                                         np.asarray(test_sim, dtype=np.float64)]), len(steps))
    below = c[0] < c[1]
    if not below[-1]:
        return None
    above = np.flatnonzero(~below)
    first = int(above[-1]) + 1 if len(above) else 0
    return int(steps[first])


def biased_window(tau_bias: int, tau_loss: int) -> dict:
    """The biased-generalization window ``[tau_bias, tau_loss]``: ``{start, end, length, exists}``.

    ``length`` is in steps, 0 if the window does not exist.
    """
    tau_bias, tau_loss = int(tau_bias), int(tau_loss)
    return {"start": tau_bias, "end": tau_loss, "length": max(0, tau_loss - tau_bias), "exists": tau_bias < tau_loss}


def prob_before(boot_a: Sequence[int], boot_b: Sequence[int]) -> float:
    """``P(a < b) + P(a == b) / 2`` for independent draws from two bootstrap sets of steps."""
    a = np.asarray(boot_a)
    b = np.sort(np.asarray(boot_b))
    less = len(b) - np.searchsorted(b, a, side="right")  # b > a
    ties = np.searchsorted(b, a, side="right") - np.searchsorted(b, a, side="left")
    return float((less + 0.5 * ties).mean() / len(b))


# -- the judge ------------------------------------------------------------------------------------

def _model_weights(pairs: list[tuple[int, int]], n_models: int) -> np.ndarray:
    """``(n_models,)`` weight of each model in the mean over ``pairs`` (each pair counts 1/len for each member)."""
    w = np.zeros(n_models)
    for i, j in pairs:
        w[i] += 1
        w[j] += 1
    return w / len(pairs)


def judge(
    steps: Sequence[int],
    twin_distance,
    twin_pairs: Sequence[tuple[int, int]],
    test_loss,
    control_distance=None,
    control_pairs: Sequence[tuple[int, int]] | None = None,
    *,
    members: Sequence[tuple[int, int]] | None = None,  # (split, seed index) of each model: the negative controls
    level: float = LEVEL,  # false-detection rate of the drift test
    persist: int = PERSIST,  # checkpoints a drift must last
    order_p: float = ORDER_P,  # P(tau_bias < tau_loss) needed to place the drift before the test-loss minimum
    n_boot: int = N_BOOT,  # simulated curves per bootstrap
    seed: int = 0,
) -> dict:
    """Decide whether the twins drift apart before the test loss bottoms out (method: docs/method.md §10).

    (Long on purpose: it checks the inputs and assembles one JSON record in the order it is read; the
    statistics live in :mod:`biasgen.drift`, the rules in ``_verdict`` and ``recommend``.)

    ``steps``: ``(C,)`` increasing checkpoint steps. ``twin_distance``:
    ``(n_twin_pairs, C)`` each twin pair's mean divergence (cosine distance of
    shared-noise samples, sample-split KL, ...; larger = more different);
    ``twin_pairs``: the ``(i, j)`` model indices of each row. ``test_loss``:
    ``(n_units, C)`` frozen-noise test loss per example (or per model), or
    ``(C,)``. ``control_distance`` ``(n_control_pairs, C)`` and
    ``control_pairs``: the same for pairs of models trained on the same split
    from different init seeds.

    tau_bias is the argmin of the mean twin curve and tau_loss the argmin of the
    mean test loss, each with intervals from its own checkpoint noise. The
    decision curve is the mean twin curve, or with controls the contrast (mean
    twin minus mean control curve: the model-level noise shared by both
    cancels). A drift is detected when the decision curve ends above its floor
    for ``persist`` checkpoints with p-value <= ``level`` (:func:`drift_test`);
    it is biased generalization when, in addition, tau_bias precedes tau_loss
    with probability >= ``order_p`` or the test loss is still falling at the end.

    ``members``: ``(split, seed_index)`` of each model (:func:`biasgen.twins.make_members`). With controls
    and members, the judge also runs the negative controls (:func:`negative_controls`) and lets the placebo
    contrast gate the verdict (:func:`placebo_gate`): a detection that the placebo shares becomes
    ``inconclusive``.

    Returns a JSON-serialisable dict: ``verdict`` (one of ``VERDICTS``),
    ``reason``, ``evidence``, ``level``, ``p_value``, ``drift``, ``tau_bias``,
    ``tau_loss`` (each ``{step, index, ci, ci95, ci_level, noise_sd, ...}``),
    ``tau_loss_open``, ``p_bias_before_loss``, ``window``, ``control`` (None
    without controls), ``curves``, ``recommended_step``, ``recommendation``,
    ``recommendation_basis``, ``n_models``, ``settings``; with controls and ``members``, also
    ``negative_controls``.
    """
    steps = _steps(steps)
    n_ckpt = len(steps)
    twins = _table("twin_distance", twin_distance, n_ckpt)
    twin_pairs = _pairs("twin_pairs", twin_pairs, len(twins))
    loss = _table("test_loss", test_loss, n_ckpt)
    if (control_distance is None) != (control_pairs is None):
        raise BiasgenError("Pass control_distance and control_pairs together (or neither).")
    if not 0 < level < 1 or not 0.5 < order_p < 1 or persist < 1:
        raise BiasgenError(
            f"Need 0 < level < 1, 0.5 < order_p < 1 and persist >= 1; got {level}, {order_p}, {persist}.")
    all_pairs = list(twin_pairs)
    if control_distance is not None:
        controls = _table("control_distance", control_distance, n_ckpt)
        control_pairs = _pairs("control_pairs", control_pairs, len(controls))
        shared = {tuple(sorted(p)) for p in twin_pairs} & {tuple(sorted(p)) for p in control_pairs}
        if shared:
            raise BiasgenError(
                f"Pairs {sorted(shared)} are listed both as twins and as controls; a pair is one or the other.")
        all_pairs += control_pairs
    n_models = 1 + max(max(p) for p in all_pairs)
    if members is not None:
        _check_members(members, n_models, twin_pairs, control_pairs or [])

    tau_bias = checkpoint_minimum(steps, twins, n_boot=n_boot, seed=seed, reduce="mean")
    tau_loss = checkpoint_minimum(steps, loss, n_boot=n_boot, seed=seed + 1, reduce="mean")
    twin_curve = np.asarray(tau_bias["curve"])
    curves = {"steps": steps.tolist(), "twin": tau_bias["curve"], "test_loss": tau_loss["curve"]}
    control = None
    decision_curve, evidence = twin_curve, f"twin curve only ({len(twins)} twin pairs of {n_models} models)"
    if control_distance is not None:
        control_curve = controls.mean(axis=0)
        decision_curve = twin_curve - control_curve
        gap = np.abs(_model_weights(twin_pairs, n_models) - _model_weights(control_pairs, n_models)).max()
        control_sd = float(noise_sd(control_curve)) if n_ckpt > DIFF_ORDER else None  # too few checkpoints to tell
        control = {"n_pairs": len(controls), "balanced": bool(gap < 1e-9), "noise_sd": control_sd,
                   "argmin_step": int(steps[np.argmin(control_curve)])}
        curves |= {"control": control_curve.tolist(), "contrast": decision_curve.tolist()}
        evidence = (f"twin-vs-control contrast ({len(twins)} twin pairs minus {len(controls)} same-split control "
                    f"pairs, {n_models} models)")

    loss_open = tau_loss["index"] == n_ckpt - 1  # tau_loss lies at or after the last checkpoint
    p_order = prob_before(tau_bias["boot_steps"], [int(steps[-1])] if loss_open else tau_loss["boot_steps"])
    out = {
        "evidence": evidence,
        "level": level,
        "tau_bias": public_tau(tau_bias),
        "tau_loss": public_tau(tau_loss),
        "tau_loss_open": bool(loss_open),
        "p_bias_before_loss": p_order,
        "window": biased_window(tau_bias["step"], tau_loss["step"]),
        "control": control,
        "curves": curves,
        "n_models": n_models,
        "settings": {"level": level, "persist": persist, "order_p": order_p, "n_boot": n_boot, "seed": seed},
    }
    if n_ckpt < min_checkpoints(persist):
        verdict, reason = "inconclusive", (
            f"Only {n_ckpt} checkpoints: the drift test needs at least {min_checkpoints(persist)} (a floor and an end "
            f"level of {persist} checkpoints each, and enough checkpoints to estimate their noise); save more "
            "checkpoints.")
        out |= {"p_value": None, "drift": None, "detectable_drift": None, "decision_noise_sd": None}
    else:
        test = drift_test(steps, decision_curve, level=level, persist=persist, n_boot=n_boot, seed=seed + 2)
        out |= {"p_value": test["p_value"], "drift": test["drift"], "detectable_drift": test["detectable_drift"],
                "decision_noise_sd": test["noise_sd"]}
        verdict, reason = _verdict(out, test, level, order_p, control)
        reason = f"Evidence: {evidence}. {reason[0].upper()}{reason[1:]}"
    out |= {"verdict": verdict, "reason": reason} | recommend(out, verdict)
    if members is not None and control is not None:
        settings = dict(level=level, persist=persist, order_p=order_p, n_boot=n_boot, seed=seed)
        out |= negative_controls(steps, twins, twin_pairs, controls, control_pairs, loss, members, **settings)
        out |= placebo_gate(out, seeds_per_split=1 + max(seed for _, seed in members))
    return out


def _check_members(members, n_models: int, twin_pairs, control_pairs) -> None:
    """``members`` name every model, twins lie on different splits and controls on the same one."""
    if len(members) < n_models:
        raise BiasgenError(f"members lists {len(members)} models, but the pairs name {n_models}; pass one "
                           "(split, seed index) per model (biasgen.twins.make_members).")
    wrong = ([p for p in twin_pairs if members[p[0]][0] == members[p[1]][0]]
             + [p for p in control_pairs if members[p[0]][0] != members[p[1]][0]])
    if wrong:
        raise BiasgenError(f"Pairs {wrong} contradict members: twins must lie on different splits and controls on "
                           "the same split; list the pairs with biasgen.twins.model_pairs(members).")


def negative_controls(steps, twin_distance, twin_pairs, control_distance, control_pairs, test_loss, members,
                      **settings) -> dict:
    """Two checks on a run with same-split control pairs (docs/method.md §10, "Negative controls").

    The tables and pairs are :func:`judge`'s (``(n_pairs, C)`` each, ``test_loss`` ``(n_units, C)``);
    ``members``: ``(split, seed_index)`` of each model; ``settings``: :func:`judge`'s keyword settings.

    ``placebo_contrast``: the twin pairs split in two halves by whether the two models have the same seed index
    (``(A1, B1), (A2, B2)`` vs ``(A1, B2), (A2, B1)``) and judged as twins against controls. Both halves are
    different-split pairs, so a calibrated contrast test must not detect bias here.
    ``controls_as_twins``: the same-split pairs judged as if they were twins (no controls); models trained on
    the same data from different seeds also drift apart once they copy training images, so a detection here
    says that the twin curve alone is not specific to *different* data, which is why the contrast decides.
    Returns ``{"negative_controls": {"controls_as_twins": ..., "placebo_contrast": ...}}`` (the placebo only
    when both halves have pairs).
    """
    def brief(result: dict) -> dict:
        return {"verdict": result["verdict"], "p_value": result["p_value"], "drift": result["drift"]}

    out = {"controls_as_twins": brief(judge(steps, control_distance, control_pairs, test_loss, **settings))}
    same = [i for i, (a, b) in enumerate(twin_pairs) if members[a][1] == members[b][1]]
    other = [i for i in range(len(twin_pairs)) if i not in same]
    if same and other:
        table = np.asarray(twin_distance)
        placebo = judge(steps, table[same], [twin_pairs[i] for i in same], test_loss, table[other],
                        [twin_pairs[i] for i in other], **settings)
        out["placebo_contrast"] = brief(placebo) | {"balanced": placebo["control"]["balanced"]}
    return {"negative_controls": out}


def placebo_gate(judged: dict, seeds_per_split: int) -> dict:
    """A detection stands only if the placebo contrast does not fire (docs/method.md §10, "Negative controls").

    ``judged``: :func:`judge`'s result with its ``negative_controls``; ``seeds_per_split``: the run's (the advice
    names more). Returns the entries to replace (``{}`` when the verdict stands). The placebo compares twin pairs
    with twin pairs, so its drift can only come from pair-to-pair differences that outlast checkpoint noise (e.g. in an early transient), which the drift test
    does not model; when it fires, the real contrast cannot be told from such differences and the verdict
    becomes ``inconclusive``.
    """
    placebo = judged["negative_controls"].get("placebo_contrast")
    if judged["verdict"] != "biased-generalization-detected" or not placebo or placebo["verdict"] != judged["verdict"]:
        return {}
    reason = (f"{judged['reason']} But the negative control fails: the placebo contrast (twin pairs against other "
              f"twin pairs, which share no more data) also rises, by {placebo['drift']['value']:.3g} "
              f"(p = {placebo['p_value']:.3f}; steps {placebo['drift']['end_steps'][0]}..{placebo['drift']['end_steps'][1]} "
              f"vs {placebo['drift']['floor_steps'][0]}..{placebo['drift']['floor_steps'][1]}): pairs differ beyond "
              "checkpoint noise, so the contrast cannot be credited to different data. More seeds per split "
              f"(--seeds-per-split {seeds_per_split + 1} or more; this run has {seeds_per_split}) average such pair "
              "differences out.")
    return {"verdict": "inconclusive", "reason": reason, **recommend(judged, "inconclusive")}


def _verdict(out: dict, test: dict, level: float, order_p: float, control: dict | None) -> tuple[str, str]:
    """``(verdict, reason)`` from the drift test and the two onset times (rules in docs/method.md §10)."""
    d, bias, loss, p_order = test["drift"], out["tau_bias"], out["tau_loss"], out["p_bias_before_loss"]
    controlled = control is not None
    what = "the twin distance minus the same-split control distance" if controlled else "the twin distance"
    if controlled and not control["balanced"]:
        what += (" (unbalanced design: the models weigh differently in twins and controls, so their noise cancels"
                 " only in part)")
    rise = (f"{what} ends {d['value']:.3g} above its floor (95% CI {d['ci95'][0]:.3g}..{d['ci95'][1]:.3g}; "
            f"steps {d['end_steps'][0]}..{d['end_steps'][1]} vs {d['floor_steps'][0]}..{d['floor_steps'][1]}; "
            f"checkpoint noise sd {test['noise_sd']:.2g}), p = {test['p_value']:.3f}")
    more = ("" if controlled else
            " Two init seeds per split would add same-split control pairs, whose contrast with the twins cancels "
            "the model-level noise and makes the test much stronger.")
    until = ("the test loss is still falling at the last checkpoint" if out["tau_loss_open"] else
             f"tau_loss = {loss['step']} (68% CI {loss['ci']}); P(tau_bias < tau_loss) = {p_order:.2f}")
    if test["p_value"] <= level:
        if bias["index"] == 0:
            return "inconclusive", (
                f"{rise}, but the twin distance is smallest at the first checkpoint (the twins never converged: same "
                "init, or the first checkpoint comes too late); add earlier checkpoints or use different init seeds.")
        if out["tau_loss_open"] or p_order >= order_p:
            return "biased-generalization-detected", (
                f"{rise} <= {level}: the twins drift apart{' more than same-split pairs do' if controlled else ''} "
                f"after tau_bias = {bias['step']} (68% CI {bias['ci']}) while {until}.")
        if p_order <= 1 - order_p:
            return "no-bias-detected", (
                f"{rise} <= {level}, but the twins drift apart only after the test-loss minimum ({until}): that is "
                "overfitting, not biased generalization.")
        return "inconclusive", (
            f"{rise} <= {level}, but the order of tau_bias = {bias['step']} (68% CI {bias['ci']}) and {until} is not "
            "resolved; denser checkpoints between them would tell which comes first.")
    if out["tau_loss_open"]:
        return "inconclusive", (
            f"no persistent drift so far ({rise} > {level}), but the test loss is still falling at the last "
            f"checkpoint, so the biased window may open later; train longer.{more}")
    return "no-bias-detected", (
        f"no persistent drift ({rise} > {level}) up to and past the test-loss minimum ({until}). A drift above "
        f"{d['ci95'][1]:.3g} is unlikely; this run would detect a drift of {test['detectable_drift']:.3g} with 80% "
        f"probability, so a smaller one may go unseen.{more}")


def recommend(out: dict, verdict: str) -> dict:
    """The checkpoint to stop at for ``verdict``: ``{recommended_step, recommendation, recommendation_basis}``.

    ``out``: :func:`judge`'s result (``tau_bias``, ``tau_loss``, ``tau_loss_open``)."""
    bias, loss = out["tau_bias"], out["tau_loss"]
    if verdict == "biased-generalization-detected":
        return {
            "recommended_step": bias["step"],
            "recommendation_basis": "tau_bias",
            "recommendation": f"Stop at step {bias['step']}, the checkpoint before the models start favouring their "
            f"own training data (68% CI {bias['ci']}; step {bias['ci'][0]} is the cautious end). Training on to the "
            "test-loss minimum buys a lower loss at the cost of privacy.",
        }
    caveat = "no bias was detected" if verdict == "no-bias-detected" else "the bias test was inconclusive"
    text = f"Stop at the test-loss minimum, step {loss['step']}, since {caveat}"
    if out["tau_loss_open"]:
        text += "; the loss was still falling at the last checkpoint, so training longer may lower it further"
    if bias["step"] < loss["step"]:
        text += f" (if privacy matters, step {bias['step']}, where the twins agree most, is the cautious choice)"
    return {"recommended_step": loss["step"], "recommendation_basis": "tau_loss", "recommendation": text + "."}
