"""Metrics on constructed cases whose answers are known (docs/method.md §2–§4)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, norm

from biasgen.errors import BiasgenError
from biasgen.images.metrics import (
    data_copying_z,
    denoiser_similarity,
    frozen_noise_loss,
    loss_by_t,
    memorized_fraction,
    nearest_neighbors,
    score_similarity,
    standardize,
    twin_distance,
    twin_similarity,
)
from biasgen.schedule import NoiseSchedule


def images(n, seed, shape=(1, 8, 8)):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_standardize_is_unit_and_affine_invariant():
    x = images(5, 0)
    f = standardize(x)
    assert f.shape == (5, 64)
    assert torch.allclose(f.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(f.sum(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(standardize(3.0 * x - 7.0), f, atol=1e-5)
    assert torch.equal(standardize(torch.ones(2, 1, 4, 4)), torch.zeros(2, 16))  # constant image, no NaN


def test_twin_distance_identical_negated_and_independent():
    a, b = images(200, 1), images(200, 2)
    same = twin_distance([a, a.clone(), a.clone()])
    assert same["pairs"] == [[0, 1], [0, 2], [1, 2]]
    assert same["median"] == pytest.approx(0, abs=1e-5) and max(same["per_pair"]) < 1e-5
    assert torch.allclose(twin_similarity(a, -a), -torch.ones(200), atol=1e-5)
    assert twin_distance([a, -a])["median"] == pytest.approx(2, abs=1e-5)
    indep = twin_distance([a, b])
    assert indep["median"] == pytest.approx(1, abs=0.05)
    assert indep["sem_kind"].startswith("single pair")
    assert indep["sem"] == pytest.approx(np.std(indep["per_sample"], ddof=1) / math.sqrt(200), rel=1e-4)


def test_twin_distance_median_and_sem_over_pairs():
    base = images(50, 3)
    models = [base + s * images(50, 10 + k) for k, s in enumerate([0.1, 0.5, 1.0, 2.0])]
    d = twin_distance(models)
    per_pair = torch.tensor(d["per_pair"])
    assert len(per_pair) == 6
    assert d["median"] == pytest.approx(float(per_pair.quantile(0.5)), abs=1e-6)
    assert d["sem"] == pytest.approx(1.2533 * float(per_pair.std()) / math.sqrt(6), rel=1e-3)
    assert len(d["per_sample"]) == 50
    with pytest.raises(BiasgenError):
        twin_distance([base])


def test_nearest_neighbors_of_training_copies_and_chunking():
    train = images(300, 4)
    idx = torch.tensor([5, 17, 299, 0, 123])
    nn = nearest_neighbors(train[idx], train, batch=64)  # several reference chunks
    assert torch.equal(nn["index"], idx) and torch.equal(nn["sim_index"], idx)
    assert torch.equal(nn["l2"], torch.zeros(5))
    assert torch.allclose(nn["sim"], torch.ones(5), atol=1e-5)
    assert bool((nn["l2_second"] > 1).all())
    # fresh samples: compare with brute force
    s = images(20, 5)
    nn = nearest_neighbors(s, train, batch=37)
    d = torch.cdist(s.reshape(20, -1).double(), train.reshape(300, -1).double())
    two = d.topk(2, dim=1, largest=False)
    assert torch.equal(nn["index"], two.indices[:, 0])
    assert torch.allclose(nn["l2"].double(), two.values[:, 0], rtol=1e-5)
    assert torch.allclose(nn["l2_second"].double(), two.values[:, 1], rtol=1e-5)
    sims = standardize(s) @ standardize(train).T
    assert torch.allclose(nn["sim"], sims.max(1).values, atol=1e-6)
    with pytest.raises(BiasgenError):
        nearest_neighbors(s, images(5, 6, shape=(1, 4, 4)))


def test_memorized_fraction_copies_noise_and_bootstrap():
    train = images(200, 7)
    copies = nearest_neighbors(train[:64], train)
    fm = memorized_fraction(copies["l2"], copies["l2_second"])
    assert fm["value"] == 1.0 and fm["ci"] == [1.0, 1.0] and fm["n"] == 64
    fresh = nearest_neighbors(images(64, 8), train)
    assert memorized_fraction(fresh["l2"], fresh["l2_second"])["value"] < 0.05
    half = memorized_fraction(torch.tensor([0.1, 0.5] * 100), torch.ones(200), n_boot=500)
    assert half["value"] == 0.5
    assert half["ci"][0] < 0.5 < half["ci"][1] and half["ci"][1] - half["ci"][0] < 0.2
    assert memorized_fraction(torch.zeros(3), torch.zeros(3))["value"] == 1.0  # copy of a duplicated image


def test_data_copying_z_sign_and_agreement_with_scipy():
    train, test = images(200, 9), images(100, 10)
    heldout = nearest_neighbors(test, train)["l2"]
    copies = nearest_neighbors(train[:100], train)["l2"]
    assert data_copying_z(copies, heldout) < -8
    fresh = nearest_neighbors(images(100, 11), train)["l2"]
    assert abs(data_copying_z(fresh, heldout)) < 3
    # tie-aware: compare with scipy's asymptotic two-sided test without continuity correction
    a = np.array([1, 2, 2, 3, 3, 3, 5, 8], dtype=float)
    b = np.array([2, 3, 4, 4, 6, 7, 8, 9, 9], dtype=float)
    z = data_copying_z(torch.tensor(a), torch.tensor(b))
    p = mannwhitneyu(a, b, use_continuity=False, method="asymptotic").pvalue
    assert z < 0 and abs(z) == pytest.approx(norm.isf(p / 2), rel=1e-6)
    assert data_copying_z(torch.tensor(b), torch.tensor(a)) == pytest.approx(-z)


def test_frozen_noise_loss_is_frozen_and_zero_for_the_true_eps():
    sched = NoiseSchedule.linear()
    x0 = images(40, 12)

    def oracle(x_t, t):  # knows x0; called on the whole batch at once
        return sched.eps_from_x0(x_t.double(), x0.double(), t).float()

    out = frozen_noise_loss(oracle, x0, sched, seed=3, batch_size=64)
    assert out["per_example"].shape == (40,) and float(out["per_example"].max()) < 1e-8
    assert int(out["t"].min()) >= 1 and int(out["t"].max()) <= sched.T - 1

    def zero(x_t, t):
        return torch.zeros_like(x_t)

    first = frozen_noise_loss(zero, x0, sched, seed=3, batch_size=7)
    again = frozen_noise_loss(zero, x0, sched, seed=3, batch_size=40)
    assert torch.equal(first["per_example"], again["per_example"]) and torch.equal(first["t"], out["t"])
    assert first["mean"] == pytest.approx(1.0, abs=0.1)  # E|eps|^2 / D = 1
    other = frozen_noise_loss(zero, x0, sched, seed=4)
    assert not torch.equal(other["t"], first["t"])


def test_loss_by_t_bins():
    t = torch.tensor([1, 2, 51, 52, 99])  # bins [1, 50.5) and [50.5, 100)
    loss = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0])
    out = loss_by_t(loss, t, n_bins=2, T=100)
    assert out["count"] == [2, 3]
    assert out["mean"][0] == pytest.approx(2.0) and out["mean"][1] == pytest.approx(35 / 3)
    assert out["t_lo"][0] == 1 and out["t_hi"][-1] == 100
    assert loss_by_t(loss, t, n_bins=4, T=200)["mean"][2:] == [None, None]


def test_denoiser_similarity_identical_negated_and_fixed_inputs():
    sched = NoiseSchedule.linear()
    x0 = images(30, 13)
    seen = []

    def net(x_t, t):
        seen.append(x_t.clone())
        return torch.tanh(x_t) + 0.01 * t[:, None, None, None]

    def neg(x_t, t):
        return -net(x_t, t)

    same = denoiser_similarity(net, net, x0, 100, sched, seed=0, batch_size=8)
    assert same.shape == (30,) and torch.allclose(same, torch.ones(30), atol=1e-5)
    assert torch.allclose(denoiser_similarity(net, neg, x0, 100, sched, seed=0), -torch.ones(30), atol=1e-5)
    seen.clear()
    denoiser_similarity(net, net, x0, 100, sched, seed=0, batch_size=30)
    denoiser_similarity(net, net, x0, 100, sched, seed=0, batch_size=30)
    assert torch.equal(seen[0], seen[2])  # the same noised inputs at every call
    with pytest.raises(BiasgenError):
        denoiser_similarity(net, net, x0, 0, sched, seed=0)


def test_score_similarity_shows_train_below_test_for_split_specific_models():
    """Model k adds its own spike on inputs near its own training images: twins disagree there only."""
    sched = NoiseSchedule.linear()
    splits = [images(20, 20 + k) for k in range(3)]
    test = images(25, 30)
    spikes = [10 * torch.nn.functional.normalize(images(1, 40 + k).reshape(-1), dim=0) for k in range(3)]

    def model(k):
        def eps_hat(x_t, t):
            x0 = x_t / sched.abar(t, like=x_t).sqrt()[:, None, None, None]
            near = torch.cdist(x0.reshape(len(x0), -1), splits[k].reshape(20, -1)).min(1).values < 3
            return x_t + near[:, None, None, None] * spikes[k].reshape(1, 1, 8, 8)

        return eps_hat

    models = [model(k) for k in range(3)]
    out = score_similarity(models, None, splits, test, ts=[10, 20], schedule=sched, seed=0, batch_size=16)
    assert out["ts"] == [10, 20] and len(out["pairs"]) == 6
    for i in range(2):
        assert out["test_mean"][i] == pytest.approx(1.0, abs=1e-5)
        assert 0.4 < out["train_mean"][i] < 0.8  # cos(x + spike, x) with |x| ~ 8, |spike| = 10
        assert out["train_sem"][i] >= 0 and len(out["train_per_pair"][i]) == 6
    same = score_similarity([models[0]] * 2, [(0, 1)], [splits[0]] * 2, test, ts=[10], schedule=sched, seed=0)
    assert same["train_mean"][0] == pytest.approx(1.0, abs=1e-5)
