"""Onset times, window, verdict and advice on synthetic curves with known minima."""
import json

import numpy as np
import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.onset import (
    biased_window,
    checkpoint_minimum,
    prob_before,
    recommend,
    score_crossing,
    verdict,
)

STEPS = list(range(0, 210, 10))  # 21 checkpoints


def u_curves(min_step, n_units=40, depth=1.0, noise=0.05, seed=0, width=50.0):
    """Per-unit U-shaped curves ``depth * ((s - min_step) / width)^2 + unit offset + noise``: ``(n_units, 21)``."""
    rng = np.random.default_rng(seed)
    s = np.asarray(STEPS, dtype=float)
    base = depth * ((s - min_step) / width) ** 2
    return base + rng.normal(0, 0.3, (n_units, 1)) + rng.normal(0, noise, (n_units, len(s)))


@pytest.mark.parametrize("reduce", ["median", "mean"])
def test_checkpoint_minimum_finds_the_u_bottom(reduce):
    m = checkpoint_minimum(STEPS, torch.tensor(u_curves(80)), reduce=reduce)
    assert m["step"] == 80 and m["index"] == 8
    assert m["ci"][0] <= 80 <= m["ci"][1] and m["ci95"][0] <= m["ci"][0] and m["ci"][1] <= m["ci95"][1]
    assert m["ci95"][1] - m["ci95"][0] <= 40
    assert len(m["boot_steps"]) == 1000 and set(m["boot_steps"]) <= set(STEPS)
    assert m["n_units"] == 40 and m["rise"] > 5 * m["rise_se"]
    json.dumps(m)


def test_checkpoint_minimum_bootstrap_widens_with_noise_and_is_seeded():
    quiet = checkpoint_minimum(STEPS, u_curves(100, noise=0.01))
    loud = checkpoint_minimum(STEPS, u_curves(100, noise=1.0))
    assert quiet["ci95"][1] - quiet["ci95"][0] < loud["ci95"][1] - loud["ci95"][0]
    again = checkpoint_minimum(STEPS, u_curves(100, noise=1.0))
    assert again["boot_steps"] == loud["boot_steps"]


def test_checkpoint_minimum_single_unit_and_bad_input():
    one = checkpoint_minimum(STEPS, u_curves(50, n_units=1, noise=0.0)[0])
    assert one["n_units"] == 1 and one["step"] == 50 and one["ci"] == [50, 50] and one["ci95"] == [50, 50]
    with pytest.raises(BiasgenError):
        checkpoint_minimum(STEPS[:-1], u_curves(50))
    with pytest.raises(BiasgenError):
        checkpoint_minimum(STEPS[::-1], u_curves(50))
    bad = u_curves(50)
    bad[3, 4] = np.nan
    with pytest.raises(BiasgenError):
        checkpoint_minimum(STEPS, bad)
    with pytest.raises(BiasgenError):
        checkpoint_minimum(STEPS, u_curves(50), reduce="max")


def test_score_crossing():
    steps = [1, 2, 3, 4, 5]
    test = [0.5, 0.6, 0.7, 0.8, 0.8]
    assert score_crossing(steps, [0.5, 0.7, 0.65, 0.7, 0.6], test) == 3
    assert score_crossing(steps, [0.5, 0.5, 0.9, 0.7, 0.6], test) == 4  # dips below, back above, then below for good
    assert score_crossing(steps, [0.6, 0.7, 0.8, 0.9, 0.9], test) is None
    assert score_crossing(steps, [0.4, 0.5, 0.6, 0.7, 0.7], test) == 1


def test_window_and_prob_before():
    assert biased_window(40, 120) == {"start": 40, "end": 120, "length": 80, "exists": True}
    assert biased_window(120, 40)["exists"] is False and biased_window(120, 40)["length"] == 0
    assert prob_before([1, 1, 1], [2, 3]) == 1.0
    assert prob_before([5], [2, 3]) == 0.0
    assert prob_before([2], [2]) == 0.5
    assert prob_before([1, 3], [2]) == 0.5


def test_verdict_detects_bias_before_the_loss_minimum():
    bias = checkpoint_minimum(STEPS, u_curves(40, seed=1))
    loss = checkpoint_minimum(STEPS, u_curves(120, seed=2), reduce="mean")
    v = verdict(bias, loss)
    assert v["verdict"] == "biased-generalization-detected", v["reason"]
    assert v["p_bias_before_loss"] > 0.99 and v["window"] == biased_window(40, 120)
    advice = recommend(v, bias, loss)
    assert advice["step"] == 40 and advice["basis"] == "tau_bias"
    json.dumps(v | {"advice": advice})


def test_verdict_detects_bias_while_the_loss_is_still_falling_at_the_end():
    bias = checkpoint_minimum(STEPS, u_curves(40, seed=1))
    loss = checkpoint_minimum(STEPS, u_curves(250, seed=2), reduce="mean")  # minimum beyond the last checkpoint
    v = verdict(bias, loss)
    assert v["verdict"] == "biased-generalization-detected" and v["tau_loss_open"], v["reason"]
    assert "still falling at the last checkpoint" in v["reason"]
    s = np.asarray(STEPS, dtype=float)
    plateau = np.maximum(1 - s / 80, 0.5) + np.random.default_rng(0).normal(0, 0.3, (40, len(STEPS)))
    v = verdict(checkpoint_minimum(STEPS, plateau), loss)  # no real drift: still inconclusive
    assert v["verdict"] == "inconclusive"


def test_verdict_no_bias_when_twins_drift_after_the_loss_minimum():
    bias = checkpoint_minimum(STEPS, u_curves(150, seed=1))
    loss = checkpoint_minimum(STEPS, u_curves(60, seed=2), reduce="mean")
    v = verdict(bias, loss)
    assert v["verdict"] == "no-bias-detected", v["reason"]
    advice = recommend(v, bias, loss)
    assert advice["step"] == 60 and advice["basis"] == "tau_loss"


@pytest.mark.parametrize(
    "bias_min, loss_min, words",
    [
        (250, 250, "still grow more alike"),  # both minima at the last checkpoint
        (250, 120, "still grow more alike"),  # twin minimum at the last checkpoint
        (-50, 120, "first checkpoint"),  # twins never converge: distance only rises
        (100, 100, "not resolved"),  # both minima at the same place
    ],
)
def test_verdict_inconclusive_cases(bias_min, loss_min, words):
    bias = checkpoint_minimum(STEPS, u_curves(bias_min, seed=1))
    loss = checkpoint_minimum(STEPS, u_curves(loss_min, seed=2), reduce="mean")
    v = verdict(bias, loss)
    assert v["verdict"] == "inconclusive" and words in v["reason"]
    assert recommend(v, bias, loss)["step"] == loss["step"]


def test_verdict_inconclusive_when_twin_distance_only_plateaus_or_single_unit():
    loss = checkpoint_minimum(STEPS, u_curves(150, seed=2), reduce="mean")
    s = np.asarray(STEPS, dtype=float)
    plateau = np.maximum(1 - s / 80, 0.5)  # falls until step 40, then stays flat: no drift apart
    for seed in range(5):
        noisy = plateau + np.random.default_rng(seed).normal(0, 0.3, (40, len(STEPS)))
        v = verdict(checkpoint_minimum(STEPS, noisy), loss)
        assert v["verdict"] == "inconclusive", v["reason"]
    single = checkpoint_minimum(STEPS, u_curves(40, n_units=1)[0])
    assert "single unit" in verdict(single, loss)["reason"]
