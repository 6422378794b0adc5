"""The verdict in words: the reason behind each outcome and the advice on when to stop (docs/method.md §10).

Pure string building from :mod:`biasgen.verdict`'s numbers; no statistics here.
"""
from __future__ import annotations

from .drift import min_checkpoints

CONFOUNDED = (" Without same-split controls, seeds and data are confounded: twins start from different init seeds, "
              "so part of any drift is the seeds parting ways; two init seeds per split (--seeds-per-split 2) add "
              "control pairs whose contrast with the twins isolates the data.")


def what_rises(control: dict | None) -> str:
    """The decision curve in words (with the caveat of an unbalanced design)."""
    if control is None:
        return "the twin distance"
    what = "the twin distance minus the same-split control distance"
    if not control["balanced"]:
        what += (" (unbalanced design: the models weigh differently in twins and controls, so their noise cancels"
                 " only in part)")
    return what


def describe_rise(test: dict, what: str) -> str:
    """One :func:`biasgen.drift.drift_test` result in words: the rise, its interval, where, the noise, the p-value."""
    d = test["drift"]
    return (f"{what} has risen {d['value']:.3g} above its floor by step {test['until_step']} (95% CI "
            f"{d['ci95'][0]:.3g}..{d['ci95'][1]:.3g}; steps {d['end_steps'][0]}..{d['end_steps'][1]} vs "
            f"{d['floor_steps'][0]}..{d['floor_steps'][1]}; checkpoint noise sd {test['noise_sd']:.2g}), "
            f"p = {test['p_value']:.3f}")


def describe_loss(tau_loss: dict, loss_open: bool) -> str:
    """Where the test loss bottoms out, with its 95% interval."""
    ci = tau_loss["ci95"]
    if loss_open:
        return f"the test loss is still falling at the last checkpoint, step {tau_loss['step']} (95% CI {ci})"
    return f"tau_loss = {tau_loss['step']} (95% CI {ci})"


def too_few_reason(n_ckpt: int, persist: int) -> str:
    return (f"Only {n_ckpt} checkpoints: the drift test needs at least {min_checkpoints(persist)} (a floor and an end "
            f"level of {persist} checkpoints each, and enough checkpoints to estimate their noise); save more "
            "checkpoints.")


def reason_for(case: str, tests: dict, tau_loss: dict, loss_open: bool, level: float, control: dict | None) -> str:
    """The reason of one outcome of :func:`biasgen.verdict.decide`; ``tests``: :func:`biasgen.verdict.drift_tests`."""
    what, at, end = what_rises(control), tests["at"], tests["end"]
    loss, more = describe_loss(tau_loss, loss_open), " more than same-split pairs do" if control else ""
    if case == "shared-start":
        return ("the twins start from one set of weights (one base), so the twin distance starts at zero and rises "
                "whatever the data; only same-split controls (--seeds-per-split 2) can show a data-specific drift "
                f"(for the record: {describe_rise(end, what)}).")
    if case == "never-converged":
        return (f"{describe_rise(end, what)}, but the twin distance is smallest at the first checkpoint (the twins "
                "never converged: same init, or the first checkpoint comes too late); add earlier checkpoints or use "
                "different init seeds.")
    if case == "detected":
        return (f"{describe_rise(at, what)} <= {level}, the largest p over the test-loss minimum's interval ({loss}): "
                f"the twins drift apart{more} before the test loss bottoms out.")
    if case == "loss-unresolved":
        early = (f"{describe_rise(at, what)} > {level} at step {tests['tested_until']}" if at is not None else
                 f"step {tests['tested_until']} is too early to test (the test needs {min_checkpoints(end['persist'])}"
                 " checkpoints up to the step it tests)")
        return (f"{what} has risen above its floor by the test-loss minimum (p = {tests['p_value_at_tau_loss']:.3f} "
                f"at step {tau_loss['step']}), but not clearly by every checkpoint of its interval ({loss}): "
                f"{early}. The rise and the loss minimum are too close to order; more test examples or denser "
                "checkpoints around the minimum would pin it down.")
    if case == "overfitting":
        return (f"{describe_rise(end, what)} <= {level} by the end of training, but not by the test-loss minimum "
                f"({loss}; {describe_rise(at, what)} > {level}): the twins drift apart{more} only after the test "
                f"loss bottoms out. That is overfitting, not biased generalization. A rise of "
                f"{at['detectable_drift']:.3g} by step {tests['tested_until']} would have been found 80% of the time.")
    if case == "loss-too-early":
        return (f"{describe_rise(end, what)} <= {level} by the end of training, but the test loss bottoms out too "
                f"early to test for a rise before it ({loss}; the test needs {min_checkpoints(end['persist'])} "
                f"checkpoints up to the step it tests); save more checkpoints before step {tau_loss['step']}.")
    if case == "train-longer":
        return (f"no rise so far ({describe_rise(end, what)} > {level}), but {loss}, so the biased window may open "
                "later; train longer.")
    test = at or end
    return (f"no rise up to and past the test-loss minimum ({loss}; {describe_rise(end, what)} > {level}). A rise by "
            f"step {test['until_step']} above {test['drift']['ci95'][1]:.3g} is unlikely; this run would detect one "
            f"of {test['detectable_drift']:.3g} with 80% probability, so a smaller one may go unseen.")


def placebo_reason(judged: dict, placebo: dict, seeds_per_split: int) -> str:
    """The reason of a detection that the placebo contrast shares (:func:`biasgen.verdict.placebo_gate`)."""
    d = placebo["drift"]
    return (f"{judged['reason']} But the negative control fails: the placebo contrast (twin pairs against other "
            f"twin pairs, which share no more data) also rises, by {d['value']:.3g} (p = {placebo['p_value']:.3f}; "
            f"steps {d['end_steps'][0]}..{d['end_steps'][1]} vs {d['floor_steps'][0]}..{d['floor_steps'][1]}): "
            "pairs differ beyond checkpoint noise, so the contrast cannot be credited to different data. More seeds "
            f"per split (--seeds-per-split {seeds_per_split + 1} or more; this run has {seeds_per_split}) average "
            "such pair differences out.")


def _cost(block: dict, name: str) -> str:
    c = block["candidate_costs"][name]
    return f"test loss {c['test_loss']:.4g}, {c['excess_loss']:+.2g} vs the minimum"


def recommendation_text(basis: str, verdict: str, block: dict) -> str:
    """The advice for ``basis`` (``tau_data``, ``tau_bias`` or ``tau_loss``), with what each choice costs."""
    loss = block["tau_loss"]
    if basis != "tau_loss":
        tau = block[basis]
        onset = ("the last checkpoint before the twins start drifting apart more than same-split pairs do (tau_data"
                 if basis == "tau_data" else
                 "where the twins agree most (tau_bias; without controls it mixes data and seeds")
        return (f"Stop at step {tau['step']}, {onset}, 68% CI {tau['ci']}; step {tau['ci'][0]} is the cautious end): "
                f"{_cost(block, basis)}. Training on to the test-loss minimum, step {loss['step']} "
                f"(test loss {block['candidate_costs']['tau_loss']['test_loss']:.4g}), buys a lower loss at the cost "
                "of privacy.")
    caveat = {"no-bias-detected": "no drift was found", "overfitting": "the drift starts only after it"}.get(
        verdict, "the bias test was inconclusive")
    text = f"Stop at the test-loss minimum, step {loss['step']}, since {caveat}"
    if block["tau_loss_open"]:
        text += "; the loss was still falling at the last checkpoint, so training longer may lower it further"
    cautious = "tau_data" if block["tau_data"] else None if block.get("shared_start") else "tau_bias"
    if cautious and block[cautious]["step"] < loss["step"]:
        text += (f" (if privacy matters, {cautious} = {block[cautious]['step']} is the cautious choice: "
                 f"{_cost(block, cautious)})")
    return text + "."
