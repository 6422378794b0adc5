"""Onset times and their intervals on synthetic curves with known minima (the judge: tests/test_judge.py)."""
import json

import numpy as np
import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.onset import checkpoint_minimum, prob_before, public_tau, score_crossing
from biasgen.verdict import window_steps

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
    assert len(m["boot_steps"]) == 2000 and set(m["boot_steps"]) <= set(STEPS)
    assert m["n_units"] == 40 and m["noise_sd"] > 0
    json.dumps(m)
    assert "boot_steps" not in public_tau(m) and public_tau(m)["ci"] == m["ci"]


def test_checkpoint_minimum_interval_widens_with_checkpoint_noise_and_is_seeded():
    """The interval reflects how much the reduced curve jumps between checkpoints, not how many units it has."""
    quiet = checkpoint_minimum(STEPS, u_curves(100, noise=0.05))
    loud = checkpoint_minimum(STEPS, u_curves(100, noise=1.0))
    assert quiet["ci95"][1] - quiet["ci95"][0] < loud["ci95"][1] - loud["ci95"][0]
    again = checkpoint_minimum(STEPS, u_curves(100, noise=1.0))
    assert again["boot_steps"] == loud["boot_steps"]
    shared = u_curves(100, noise=0.0) + np.random.default_rng(5).normal(0, 0.2, len(STEPS))  # one jitter for all units
    wide = checkpoint_minimum(STEPS, shared)
    assert wide["ci95"][1] - wide["ci95"][0] >= 20  # 40 units that jitter together: one noisy curve


def test_checkpoint_minimum_single_unit_and_bad_input():
    exact = checkpoint_minimum(STEPS, u_curves(50, n_units=1, noise=0.0)[0])
    assert exact["n_units"] == 1 and exact["step"] == 50 and exact["ci"] == [50, 50]  # no noise, no doubt
    noisy = checkpoint_minimum(STEPS, u_curves(50, n_units=1, noise=0.3)[0])
    assert noisy["ci95"][1] - noisy["ci95"][0] >= 20  # a single noisy curve still gets an interval
    few = checkpoint_minimum(STEPS[:4], [3.0, 1.0, 2.0, 4.0])
    assert few["step"] == 10 and few["ci95"] == [0, 30]  # too few checkpoints to estimate noise: all possible
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
    assert window_steps(40, 120) == [40, 120]
    assert window_steps(120, 40) is None and window_steps(40, 40) is None
    assert prob_before([1, 1, 1], [2, 3]) == 1.0
    assert prob_before([5], [2, 3]) == 0.0
    assert prob_before([2], [2]) == 0.5
    assert prob_before([1, 3], [2]) == 0.5
