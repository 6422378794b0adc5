"""The verdict: did the twins' data-specific divergence start before the test loss bottomed out? (docs/method.md §10)

A pure function of the arrays a run saves, in five readable steps:

    check_inputs  -> the tables and pairs, checked (one clear error per problem)
    decision_curve -> the curve that decides: twin minus control ("contrast"), or the twin curve alone
    drift_tests   -> has that curve risen above its floor by the test-loss minimum? and by the end of training?
    decide        -> verdict and reason
    recommend     -> the step to stop at, and the test loss each candidate step costs

    result = judge(steps, twin_distance, twin_pairs, test_loss, control_distance, control_pairs, members=members)
    result["verdict"], result["reason"], result["recommended_step"], result["candidate_costs"]

The result is a :class:`VerdictBlock`, the verdict part of ``summary.json``.
"""
from __future__ import annotations

from typing import NamedTuple, NotRequired, Sequence, TypedDict

import numpy as np

from .drift import (DIFF_ORDER, LEVEL, N_BOOT, PERSIST, check_pairs, check_steps, check_table, drift_test,
                    min_checkpoints, noise_sd, rise_onset)
from .errors import BiasgenError
from .onset import checkpoint_minimum, prob_before, public_tau
from .verdict_text import CONFOUNDED, placebo_reason, reason_for, recommendation_text, too_few_reason

VERDICTS = ("biased-generalization-detected", "overfitting", "no-bias-detected", "inconclusive")
LOSS_CI = "ci95"  # the interval of tau_loss over which the drift must already be there (the max p is taken)


class VerdictBlock(TypedDict):
    """The verdict part of ``summary.json`` (:func:`judge`'s result; the onset blocks are :func:`public_tau`'s)."""
    verdict: str  # one of VERDICTS
    reason: str  # the numbers behind the verdict, in words
    evidence: str  # what decided: the twin-vs-control contrast, or the twin curve only
    level: float  # false-detection rate of the drift test
    p_value: float | None  # the decision: max p of the drift test over the tau_loss interval (None: not testable)
    p_value_at_tau_loss: float | None  # the drift test at the tau_loss point estimate
    p_value_end: float | None  # the drift test at the last checkpoint (a rise at any time)
    tested_until: int | None  # the step where the decisive (largest) p was taken
    tested_steps: list[int]  # every step of the tau_loss interval that was tested
    drift: dict | None  # the rise by tested_until: {value, raw, ci, ci95, floor_steps, end_steps}
    drift_end: dict | None  # the rise by the last checkpoint
    detectable_drift: float | None  # a rise by tested_until that the test finds 80% of the time
    decision_noise_sd: float | None  # checkpoint noise sd of the decision curve
    tau_bias: dict  # argmin of the twin curve (the paper's onset)
    tau_loss: dict  # argmin of the test loss
    tau_data: dict | None  # last checkpoint before the contrast's rise (None without controls)
    tau_loss_open: bool  # the test loss is smallest at the last checkpoint
    p_bias_before_loss: float  # P(tau_bias < tau_loss), reported only
    window: list[int] | None  # [tau_bias, tau_loss], None when tau_bias does not come first or means nothing
    shared_start: bool  # the models start from one set of weights (twin fine-tunes): tau_bias says nothing
    control: dict | None  # {n_pairs, balanced, noise_sd, argmin_step}; None without controls
    curves: dict  # steps, twin, test_loss (and control, contrast) mean curves
    candidate_costs: dict  # name -> {step, test_loss, excess_loss} for tau_bias, tau_data, tau_loss
    recommended_step: int
    recommended_ci: list[int] | None  # 68% interval of the recommended onset
    recommendation_basis: str  # tau_data, tau_bias or tau_loss
    recommendation: str
    n_models: int
    settings: dict
    negative_controls: NotRequired[dict]  # with controls and members: the placebo and controls-as-twins checks
    tau_mem: NotRequired[dict]  # added by biasgen.pipeline.judge_records where samples are checked for copies
    units: NotRequired[dict]  # added by biasgen.pipeline.judge_records: what a unit of each curve is


class Inputs(NamedTuple):
    """The judge's arrays, checked: tables ``(n_rows, C)`` as float64, pairs as int tuples."""
    steps: np.ndarray
    twins: np.ndarray
    twin_pairs: list[tuple[int, int]]
    loss: np.ndarray
    controls: np.ndarray | None
    control_pairs: list[tuple[int, int]] | None
    n_models: int


# -- the steps ------------------------------------------------------------------------------------

def check_inputs(steps, twin_distance, twin_pairs, test_loss, control_distance=None, control_pairs=None, *,
                 members=None, level: float = LEVEL, persist: int = PERSIST) -> Inputs:
    """The judge's arguments as checked arrays; a :class:`BiasgenError` names the first problem."""
    steps = check_steps(steps)
    n_ckpt = len(steps)
    twins = check_table("twin_distance", twin_distance, n_ckpt)
    twin_pairs = check_pairs("twin_pairs", twin_pairs, len(twins))
    loss = check_table("test_loss", test_loss, n_ckpt)
    if (control_distance is None) != (control_pairs is None):
        raise BiasgenError("Pass control_distance and control_pairs together (or neither).")
    if not 0 < level < 1 or persist < 1:
        raise BiasgenError(f"Need 0 < level < 1 and persist >= 1; got {level} and {persist}.")
    controls = None
    if control_distance is not None:
        controls = check_table("control_distance", control_distance, n_ckpt)
        control_pairs = check_pairs("control_pairs", control_pairs, len(controls))
        shared = {tuple(sorted(p)) for p in twin_pairs} & {tuple(sorted(p)) for p in control_pairs}
        if shared:
            raise BiasgenError(
                f"Pairs {sorted(shared)} are listed both as twins and as controls; a pair is one or the other.")
    n_models = 1 + max(max(p) for p in twin_pairs + (control_pairs or []))
    if members is not None:
        check_members(members, n_models, twin_pairs, control_pairs or [])
    return Inputs(steps, twins, twin_pairs, loss, controls, control_pairs, n_models)


def check_members(members, n_models: int, twin_pairs, control_pairs) -> None:
    """``members`` name every model, twins lie on different splits and controls on the same one."""
    if len(members) < n_models:
        raise BiasgenError(f"members lists {len(members)} models, but the pairs name {n_models}; pass one "
                           "(split, seed index) per model (biasgen.twins.make_members).")
    wrong = ([p for p in twin_pairs if members[p[0]][0] == members[p[1]][0]]
             + [p for p in control_pairs if members[p[0]][0] != members[p[1]][0]])
    if wrong:
        raise BiasgenError(f"Pairs {wrong} contradict members: twins must lie on different splits and controls on "
                           "the same split; list the pairs with biasgen.twins.model_pairs(members).")


def model_weights(pairs: list[tuple[int, int]], n_models: int) -> np.ndarray:
    """``(n_models,)`` weight of each model in the mean over ``pairs`` (each pair counts 1/len for each member)."""
    w = np.zeros(n_models)
    for i, j in pairs:
        w[i] += 1
        w[j] += 1
    return w / len(pairs)


def decision_curve(inputs: Inputs) -> tuple[np.ndarray, str, dict | None]:
    """``(curve (C,), evidence, control)``: the contrast (mean twin minus mean control) when there are controls,
    else the mean twin curve; ``control`` describes the controls (None without)."""
    twin_curve = inputs.twins.mean(axis=0)
    if inputs.controls is None:
        return twin_curve, f"twin curve only ({len(inputs.twins)} twin pairs of {inputs.n_models} models)", None
    control_curve = inputs.controls.mean(axis=0)
    gap = np.abs(model_weights(inputs.twin_pairs, inputs.n_models)
                 - model_weights(inputs.control_pairs, inputs.n_models)).max()
    enough = len(inputs.steps) > DIFF_ORDER  # else too few checkpoints to estimate the noise
    control = {"n_pairs": len(inputs.controls), "balanced": bool(gap < 1e-9),
               "noise_sd": float(noise_sd(control_curve)) if enough else None,
               "argmin_step": int(inputs.steps[np.argmin(control_curve)])}
    evidence = (f"twin-vs-control contrast ({len(inputs.twins)} twin pairs minus {len(inputs.controls)} same-split "
                f"control pairs, {inputs.n_models} models)")
    return twin_curve - control_curve, evidence, control


def drift_tests(steps: np.ndarray, curve: np.ndarray, tau_loss: dict, *, level: float, persist: int, n_boot: int,
                seed: int) -> dict:
    """The drift test of ``curve`` ``(C,)`` at every checkpoint of tau_loss's interval, and at the end.

    A checkpoint too early to test (fewer than ``min_checkpoints`` up to it) counts as p = 1. Returns
    ``p_value`` (the largest over the interval: the drift must be there however early the loss bottoms out),
    ``p_value_at_tau_loss``, ``tested_until``, ``tested_steps``, ``at`` (the test at ``tested_until``, or None)
    and ``end`` (the test at the last checkpoint).
    """
    index = {int(s): i for i, s in enumerate(steps)}
    lo, hi = index[tau_loss[LOSS_CI][0]], index[tau_loss[LOSS_CI][1]]
    point = tau_loss["index"]
    settings = dict(level=level, persist=persist, n_boot=n_boot)
    tests = {i: drift_test(steps, curve, until=i, seed=seed + i, **settings) if i + 1 >= min_checkpoints(persist)
             else None for i in sorted({*range(lo, hi + 1), point})}
    p = {i: (t["p_value"] if t else 1.0) for i, t in tests.items()}
    worst = max(range(lo, hi + 1), key=lambda i: (p[i], -i))
    end = tests.get(len(steps) - 1) or drift_test(steps, curve, seed=seed + len(steps) - 1, **settings)
    return {"p_value": p[worst], "p_value_at_tau_loss": p[point], "tested_until": int(steps[worst]),
            "tested_steps": [int(steps[i]) for i in range(lo, hi + 1)], "at": tests[worst], "end": end}


def test_entries(tests: dict) -> dict:
    """The :class:`VerdictBlock` entries of :func:`drift_tests`' result."""
    at, end = tests["at"], tests["end"]
    return {"p_value": tests["p_value"], "p_value_at_tau_loss": tests["p_value_at_tau_loss"],
            "p_value_end": end["p_value"], "tested_until": tests["tested_until"], "tested_steps": tests["tested_steps"],
            "drift": at and at["drift"], "drift_end": end["drift"], "detectable_drift": at and at["detectable_drift"],
            "decision_noise_sd": end["noise_sd"]}


def decide(tests: dict, tau_bias: dict, tau_loss: dict, tau_loss_open: bool, level: float,
           control: dict | None, shared_start: bool = False) -> tuple[str, str]:
    """``(verdict, reason)`` from :func:`drift_tests` and the onsets (rules: docs/method.md §10, "The verdict").

    ``biased-generalization-detected``: the curve has risen by every checkpoint of tau_loss's interval;
    ``overfitting``: it rises, but not by the test-loss minimum; ``no-bias-detected``: no rise at all over a run
    that covers the loss minimum; ``inconclusive``: the data cannot tell (the reason says what would).
    """
    end, p, p_point = tests["end"], tests["p_value"], tests["p_value_at_tau_loss"]
    rises = end["p_value"] <= level or p_point <= level
    if shared_start and control is None:
        return "inconclusive", reason_for("shared-start", tests, tau_loss, tau_loss_open, level, control)
    if rises and tau_bias["index"] == 0 and not shared_start:
        return "inconclusive", reason_for("never-converged", tests, tau_loss, tau_loss_open, level, control)
    if p <= level:
        return "biased-generalization-detected", reason_for("detected", tests, tau_loss, tau_loss_open, level, control)
    if p_point <= level:
        return "inconclusive", reason_for("loss-unresolved", tests, tau_loss, tau_loss_open, level, control)
    if end["p_value"] <= level and not tau_loss_open:
        case = "overfitting" if tests["at"] is not None else "loss-too-early"
        return ("overfitting" if tests["at"] is not None else "inconclusive"), reason_for(
            case, tests, tau_loss, tau_loss_open, level, control)
    if tau_loss_open:
        return "inconclusive", reason_for("train-longer", tests, tau_loss, tau_loss_open, level, control)
    return "no-bias-detected", reason_for("no-rise", tests, tau_loss, tau_loss_open, level, control)


def window_steps(tau_bias: int, tau_loss: int) -> list[int] | None:
    """The biased window ``[tau_bias, tau_loss]``, or None when tau_bias does not come first."""
    return [int(tau_bias), int(tau_loss)] if tau_bias < tau_loss else None


def candidate_costs(steps: np.ndarray, loss_curve: np.ndarray, candidates: dict) -> dict:
    """What stopping at each candidate step costs: ``{name: {step, test_loss, excess_loss}}``.

    ``loss_curve``: ``(C,)`` mean test loss; ``candidates``: name -> onset block with a ``step`` (None: skipped).
    ``excess_loss`` is the test loss there minus its minimum over the run."""
    index = {int(s): i for i, s in enumerate(steps)}
    best = float(loss_curve.min())
    return {name: {"step": tau["step"], "test_loss": float(loss_curve[index[tau["step"]]]),
                   "excess_loss": float(loss_curve[index[tau["step"]]]) - best}
            for name, tau in candidates.items() if tau is not None}


def recommend(block: dict, verdict: str, rising: bool) -> dict:
    """The step to stop at: ``{recommended_step, recommended_ci, recommendation_basis, recommendation}``.

    ``block``: :func:`judge`'s result so far; ``rising``: the decision curve has risen by the test-loss minimum
    (a detection, or one that only tau_loss's uncertainty leaves open). Then tau_data with controls, tau_bias
    without (the paper's onset; seeds and data are confounded; never after a shared start, where it means
    nothing); otherwise the test-loss minimum, tau_loss.
    """
    basis = "tau_loss"
    if rising and (block["tau_data"] or not block["shared_start"]):
        basis = "tau_data" if block["tau_data"] else "tau_bias"
    tau = block[basis]
    return {"recommended_step": tau["step"], "recommended_ci": tau.get("ci"), "recommendation_basis": basis,
            "recommendation": recommendation_text(basis, verdict, block)}


# -- the judge ------------------------------------------------------------------------------------

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
    n_boot: int = N_BOOT,  # simulated curves per bootstrap
    seed: int = 0,
    shared_start: bool = False,  # the models start from one set of weights (e.g. twin fine-tunes of one base)
) -> VerdictBlock:
    """Decide whether the twins' data-specific divergence starts before the test loss bottoms out (§10).

    (Long for its documented signature; the decision is a sequence of named steps, each a helper of this module.)

    ``steps``: ``(C,)`` increasing checkpoint steps. ``twin_distance``: ``(n_twin_pairs, C)`` each twin
    pair's mean divergence (larger = more different); ``twin_pairs``: the ``(i, j)`` model indices of each row.
    ``test_loss``: ``(n_units, C)`` frozen-noise test loss per example (or per model), or ``(C,)``.
    ``control_distance`` ``(n_control_pairs, C)`` and ``control_pairs``: the same for pairs of models trained
    on the same split from different init seeds. With controls and ``members`` the negative controls run too,
    and a detection the placebo contrast shares becomes ``inconclusive`` (:func:`placebo_gate`).
    With ``shared_start`` the twin distance starts at zero, so its minimum (tau_bias, the window) means nothing:
    the decision rests on the contrast alone, and a run without controls is ``inconclusive``.
    """
    inputs = check_inputs(steps, twin_distance, twin_pairs, test_loss, control_distance, control_pairs,
                          members=members, level=level, persist=persist)
    steps, n_ckpt = inputs.steps, len(inputs.steps)
    tau_bias = checkpoint_minimum(steps, inputs.twins, n_boot=n_boot, seed=seed, reduce="mean")
    tau_loss = checkpoint_minimum(steps, inputs.loss, n_boot=n_boot, seed=seed + 1, reduce="mean")
    curve, evidence, control = decision_curve(inputs)
    curves = {"steps": steps.tolist(), "twin": tau_bias["curve"], "test_loss": tau_loss["curve"]}
    if control is not None:
        curves |= {"control": inputs.controls.mean(axis=0).tolist(), "contrast": curve.tolist()}
    loss_open = tau_loss["index"] == n_ckpt - 1  # tau_loss lies at or after the last checkpoint
    tau_data = (rise_onset(steps, curve, n_boot=n_boot, seed=seed + 3)
                if control is not None and n_ckpt > DIFF_ORDER else None)
    block = {
        "evidence": evidence, "level": level,
        "tau_bias": public_tau(tau_bias), "tau_loss": public_tau(tau_loss), "tau_data": tau_data,
        "tau_loss_open": bool(loss_open),
        "p_bias_before_loss": prob_before(tau_bias["boot_steps"],
                                          [int(steps[-1])] if loss_open else tau_loss["boot_steps"]),
        "window": None if shared_start else window_steps(tau_bias["step"], tau_loss["step"]),
        "shared_start": shared_start, "control": control, "curves": curves,
        "candidate_costs": candidate_costs(steps, np.asarray(tau_loss["curve"]),
                                           {"tau_bias": None if shared_start else tau_bias, "tau_data": tau_data,
                                            "tau_loss": tau_loss}),
        "n_models": inputs.n_models,
        "settings": {"level": level, "persist": persist, "n_boot": n_boot, "seed": seed, "loss_interval": LOSS_CI},
    }
    if n_ckpt < min_checkpoints(persist):
        verdict = "inconclusive"
        reason = too_few_reason(n_ckpt, persist)
        block |= dict.fromkeys(("p_value", "p_value_at_tau_loss", "p_value_end", "tested_until", "drift", "drift_end",
                                "detectable_drift", "decision_noise_sd")) | {"tested_steps": []}
    else:
        tests = drift_tests(steps, curve, tau_loss, level=level, persist=persist, n_boot=n_boot, seed=seed + 2)
        block |= test_entries(tests)
        verdict, reason = decide(tests, tau_bias, tau_loss, loss_open, level, control, shared_start)
        reason = f"Evidence: {evidence}. {reason[0].upper()}{reason[1:]}" + ("" if control or shared_start else CONFOUNDED)
    rising = block["p_value_at_tau_loss"] is not None and block["p_value_at_tau_loss"] <= level
    block |= {"verdict": verdict, "reason": reason}
    block |= recommend(block, verdict, rising=rising and (tau_bias["index"] > 0 or shared_start))
    if members is not None and control is not None:
        settings = dict(level=level, persist=persist, n_boot=n_boot, seed=seed)
        block |= negative_controls(inputs, members, **settings)
        block |= placebo_gate(block, seeds_per_split=1 + max(k for _, k in members))
    return block


def negative_controls(inputs: Inputs, members, **settings) -> dict:
    """Two checks on a run with same-split control pairs (docs/method.md §10, "Negative controls").

    ``inputs``: the judge's checked arrays; ``members``: ``(split, seed_index)`` of each model; ``settings``:
    :func:`judge`'s keyword settings.

    ``placebo_contrast``: the twin pairs split in two halves by whether the two models have the same seed index
    (``(A1, B1), (A2, B2)`` vs ``(A1, B2), (A2, B1)``) and judged as twins against controls. Both halves are
    different-split pairs, so a calibrated contrast test must not detect bias here.
    ``controls_as_twins``: the same-split pairs judged as if they were twins (no controls); a detection here
    says that the twin curve alone is not specific to *different* data, which is why the contrast decides.
    Returns ``{"negative_controls": {"controls_as_twins": ..., "placebo_contrast": ...}}`` (the placebo only
    when both halves have pairs).
    """
    def brief(result: dict) -> dict:
        return {"verdict": result["verdict"], "p_value": result["p_value"], "drift": result["drift"]}

    steps, twins, pairs = inputs.steps, inputs.twins, inputs.twin_pairs
    out = {"controls_as_twins": brief(judge(steps, inputs.controls, inputs.control_pairs, inputs.loss, **settings))}
    same = [i for i, (a, b) in enumerate(pairs) if members[a][1] == members[b][1]]
    other = [i for i in range(len(pairs)) if i not in same]
    if same and other:
        placebo = judge(steps, twins[same], [pairs[i] for i in same], inputs.loss, twins[other],
                        [pairs[i] for i in other], **settings)
        out["placebo_contrast"] = brief(placebo) | {"balanced": placebo["control"]["balanced"]}
    return {"negative_controls": out}


def placebo_gate(judged: dict, seeds_per_split: int) -> dict:
    """A detection stands only if the placebo contrast does not fire (docs/method.md §10, "Negative controls").

    ``judged``: :func:`judge`'s result with its ``negative_controls``; ``seeds_per_split``: the run's (the advice
    names more). Returns the entries to replace (``{}`` when the verdict stands). The placebo compares twin pairs
    with twin pairs, so its drift can only come from pair-to-pair differences that outlast checkpoint noise, which
    the drift test does not model; when it fires, the real contrast cannot be told from such differences and the
    verdict becomes ``inconclusive``.
    """
    placebo = judged["negative_controls"].get("placebo_contrast")
    if judged["verdict"] != "biased-generalization-detected" or not placebo or placebo["verdict"] != judged["verdict"]:
        return {}
    gated = {**judged, "verdict": "inconclusive", "reason": placebo_reason(judged, placebo, seeds_per_split)}
    return {"verdict": "inconclusive", "reason": gated["reason"], **recommend(gated, "inconclusive", rising=False)}
