"""Each SPEC §7 diagnostic on constructed cases where the answer is known."""
import math

import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.hierarchy import Grammar, bp_denoise_fn, empirical_denoise_fn, sample_sequences
from biasgen.hierarchy.metrics import (
    kl_along_t,
    kl_per_input,
    loss_decomposition,
    nearest_hamming,
    nn_divergence,
    noised_inputs,
    oracle_kls,
    sample_split_kl,
    uturn_overlap,
)
from biasgen.hierarchy.model import SequenceDenoiser, as_denoiser
from biasgen.schedule import NoiseSchedule

S = NoiseSchedule.onehot()


@pytest.fixture(scope="module")
def g():
    return Grammar.random(q=4, depth=3, q_eff=3, sigma=1.0, seed=0)


@pytest.fixture(scope="module")
def data(g):
    x = g.sample(600, seed=3)
    return {"train": x[:200], "test": x[200:]}


def test_noised_inputs_are_frozen_and_shaped(data):
    x_t, t = noised_inputs(data["test"][:50], 4, S, t=75, seed=1)
    x_t2, t2 = noised_inputs(data["test"][:50], 4, S, t=75, seed=1)
    assert x_t.shape == (50, 8, 4) and bool((t == 75).all())
    assert torch.equal(x_t, x_t2) and torch.equal(t, t2)
    _, t_rand = noised_inputs(data["test"][:50], 4, S, t=None, seed=1)
    assert int(t_rand.min()) >= 1 and int(t_rand.max()) < S.T and len(set(t_rand.tolist())) > 10


def test_kl_per_input_matches_hand_computation():
    p = torch.tensor([[[0.5, 0.5], [1.0, 0.0]]])
    r = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75) + math.log(2)
    assert kl_per_input(p, r).item() == pytest.approx(expected, abs=1e-12)
    assert kl_per_input(p, p).item() == pytest.approx(0, abs=1e-12)


def test_identical_twins_have_zero_sample_split_kl(data):
    torch.manual_seed(0)
    net = as_denoiser(SequenceDenoiser(q=4, length=8, T=S.T, layers=1, width=16, heads=2, ffn=16))
    other = as_denoiser(SequenceDenoiser(q=4, length=8, T=S.T, layers=1, width=16, heads=2, ffn=16))
    x_t, t = noised_inputs(data["test"][:64], 4, S, t=75, seed=0)
    assert sample_split_kl(net, net, x_t, t) == pytest.approx(0, abs=1e-9)
    assert sample_split_kl(net, other, x_t, t) > 1e-4
    assert sample_split_kl(net, other, x_t, t) == pytest.approx(sample_split_kl(other, net, x_t, t), rel=1e-12)


def test_exact_denoiser_as_model_has_zero_oracle_kl_and_zero_excess_loss_on_test(g, data):
    bp0 = bp_denoise_fn(g, S, 0)
    x_t, t = noised_inputs(data["test"], 4, S, t=75, seed=0)
    kls = oracle_kls(g, bp0, x_t, t, S)
    assert len(kls) == g.depth + 1
    assert kls[0] == pytest.approx(0, abs=1e-9)
    assert all(k > 1e-3 for k in kls[1:])  # the filtered models differ from the full one
    x_l, t_l = noised_inputs(data["test"], 4, S, t=None, seed=2)
    dec = loss_decomposition(bp0, bp0, data["test"], x_l, t_l)
    assert dec["l"] == pytest.approx(dec["l_star"] + dec["l_tilde"], abs=1e-9)
    assert abs(dec["l_tilde"]) < 0.1 * dec["l"]  # E[l~] = 0 on fresh data


def test_kl_along_t_is_zero_for_bp_against_itself_and_peaks_inside(g, data):
    bp0, bpl = bp_denoise_fn(g, S, 0), bp_denoise_fn(g, S, g.depth)
    steps = [5, 75, 450]
    assert kl_along_t(bp0, bp0, data["test"][:100], 4, S, steps, seed=0) == pytest.approx([0, 0, 0], abs=1e-9)
    curve = kl_along_t(bp0, bpl, data["test"][:100], 4, S, steps, seed=0)
    assert curve[1] > curve[0] and curve[1] > curve[2]  # nearly clean and nearly pure noise are easy for both


def test_uturn_ratio_exact_model_equal_on_train_and_test(g, data):
    bp0 = bp_denoise_fn(g, S, 0)
    for x0 in (data["train"][:40], data["test"][:40]):
        ref = uturn_overlap(bp0, x0, 4, [10, 40], S, reps=2, seed=5)
        assert ref.shape == (2, 40)
        ratio = uturn_overlap(bp0, x0, 4, [10, 40], S, reps=2, seed=5).mean(1) / ref.mean(1)
        assert ratio.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
        assert 0.25 < float(ref[1].mean()) < float(ref[0].mean()) <= 1.0  # deeper U-turns lose more symbols


def test_empirical_denoiser_uturns_home_and_copies(g, data):
    train, test = data["train"], data["test"]
    bp0, emp = bp_denoise_fn(g, S, 0), empirical_denoise_fn(train, 4, S)
    ratio = lambda x: float(uturn_overlap(emp, x, 4, [60], S, 2, 0).mean() / uturn_overlap(bp0, x, 4, [60], S, 2, 0).mean())
    assert ratio(train[:40]) > 1.0 > ratio(test[:40])
    copies = sample_sequences(emp, 8, 4, seeds=range(64), schedule=S, method="ddim", steps=50)
    assert int(nearest_hamming(copies, train).max()) == 0  # every generated sequence is a training sequence
    assert nn_divergence(copies, test, train) > 0.5  # far from the test sequences' distance profile


def test_nearest_hamming_and_nn_divergence():
    ref = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    x = torch.tensor([[0, 0, 0, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert nearest_hamming(x, ref).tolist() == [1, 2, 0]
    train = torch.randint(0, 3, (50, 6), generator=torch.Generator().manual_seed(0))
    test = torch.randint(0, 3, (80, 6), generator=torch.Generator().manual_seed(1))
    assert nn_divergence(test, test, train) == pytest.approx(0, abs=1e-12)


def test_bad_inputs_raise_clear_errors(data):
    with pytest.raises(BiasgenError, match="symbols"):
        noised_inputs(data["test"] + 10, 4, S, t=10, seed=0)
    with pytest.raises(BiasgenError, match="LongTensor"):
        noised_inputs(data["test"].float(), 4, S, t=10, seed=0)
    with pytest.raises(BiasgenError, match="outside"):
        noised_inputs(data["test"], 4, S, t=S.T + 1, seed=0)
    with pytest.raises(BiasgenError, match="equal length"):
        nearest_hamming(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(BiasgenError, match="shape"):
        SequenceDenoiser(q=4, length=8, T=S.T, layers=1, width=16, heads=2, ffn=16)(torch.zeros(2, 7, 4), torch.ones(2).long())
