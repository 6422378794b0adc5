"""Each docs/method.md §7 diagnostic on constructed cases where the answer is known."""
import math

import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.hierarchy import Grammar, bp_denoise_fn, empirical_denoise_fn, sample_sequences
from biasgen.hierarchy.metrics import (
    bp_predictions,
    kl_per_input,
    loss_terms,
    NEAR_COPY_RATIO,
    near_copies,
    nearest_hamming,
    nearest_two_hamming,
    nn_divergence,
    nn_histograms,
    noised_inputs,
    oracle_kl,
    oracle_kl_along_t,
    sample_split_kl,
    uniform_sequences,
    uturn_overlap,
    uturn_random,
    uturn_ratio,
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
    kls = oracle_kl(bp_predictions(g, S, x_t, t), bp0(x_t, t))
    assert len(kls) == g.depth + 1
    assert kls[0] == pytest.approx(0, abs=1e-9)
    assert all(k > 1e-3 for k in kls[1:])  # the filtered models differ from the full one
    x_l, t_l = noised_inputs(data["test"], 4, S, t=None, seed=2)
    dec = loss_terms(bp0(x_l, t_l), bp0(x_l, t_l), data["test"])
    assert dec["l"] == pytest.approx(dec["l_star"] + dec["l_tilde"], abs=1e-9)
    assert abs(dec["l_tilde"]) < 0.1 * dec["l"]  # E[l~] = 0 on fresh data


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


def _at_distances(d1: int, d2: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence ``x (1, length)`` and two training sequences ``(2, length)`` at Hamming distances d1 and d2 from it."""
    a = torch.zeros(length, dtype=torch.long)
    b = a.clone()
    b[: d2 - d1] = 1  # b differs from a on d2 - d1 positions
    x = a.clone()
    x[length - d1:] = 2  # x differs from both on d1 further positions
    return x[None], torch.stack([a, b])


@pytest.mark.parametrize("d1, d2, copied", [
    (0, 1, True), (0, 12, True),  # exact copies
    (1, 3, False), (1, 4, True),  # one symbol off: a near-copy only when the next training sequence is >= 4 away
    (2, 6, False), (2, 7, True),  # d1 / d2 = 1/3 exactly is not below 1/3
    (3, 9, False), (3, 10, True),
    (4, 8, False),  # closer to one training sequence, but not by the factor 3
])
def test_near_copies_follow_the_one_third_rule_on_hamming_distances(d1, d2, copied):
    x, train = _at_distances(d1, d2)
    assert nearest_two_hamming(x, train).tolist() == [[d1, d2]]
    assert near_copies(x, train).tolist() == [copied]


def test_near_copies_count_a_repeated_training_sequence_once():
    x, train = _at_distances(1, 5)
    repeated = torch.cat([train[:1], train])  # the nearest training sequence twice: d2 is still 5, not 1
    assert nearest_two_hamming(x, repeated).tolist() == [[1, 5]] and near_copies(x, repeated).tolist() == [True]
    assert NEAR_COPY_RATIO == 1 / 3
    with pytest.raises(BiasgenError, match="second-nearest"):
        near_copies(x, train[:1].repeat(3, 1))
    ref = torch.randint(0, 3, (30, 6), generator=torch.Generator().manual_seed(3))
    x = torch.cat([ref[:5], torch.randint(0, 3, (200, 6), generator=torch.Generator().manual_seed(2))])
    exact = nearest_hamming(x, ref) == 0
    assert exact[:5].all() and near_copies(x, ref)[exact].all()  # every exact copy is a near-copy


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


# -- analyses from precomputed predictions (BP once per run, the model per checkpoint) ----------
def test_oracle_kl_from_precomputed_bp_matches_and_is_zero_at_its_own_k(g, data):
    x_t, t = noised_inputs(data["test"][:80], 4, S, t=75, seed=0)
    bp = bp_predictions(g, S, x_t, t)
    assert bp.shape == (g.depth + 1, 80, 8, 4) and bp.dtype == torch.float64
    for k in (0, g.depth):
        kls = oracle_kl(bp, bp_denoise_fn(g, S, k)(x_t, t))
        assert kls[k] == pytest.approx(0, abs=1e-9) and min(kls[:k] + kls[k + 1:]) > 1e-3
    with pytest.raises(BiasgenError, match="same inputs"):
        oracle_kl(bp, bp[0, :10])
    assert torch.equal(bp_predictions(g, S, x_t, t, levels=2), bp[:2])  # BP_0 and BP_1 alone
    with pytest.raises(BiasgenError, match="levels"):
        bp_predictions(g, S, x_t, t, levels=g.depth + 2)


def test_oracle_kl_along_t_covers_every_k_and_agrees_with_the_kl_at_each_step(g, data):
    steps = [5, 75, 450]
    inputs = [noised_inputs(data["test"][:60], 4, S, t=s, seed=0) for s in steps]
    bps = [bp_predictions(g, S, *xt) for xt in inputs]  # once per run
    coarse = bp_denoise_fn(g, S, g.depth)  # a "model" that has learned only the coarsest level
    curves = oracle_kl_along_t(bps, [coarse(*xt) for xt in inputs])
    assert len(curves) == g.depth + 1 and all(len(c) == len(steps) for c in curves)
    assert curves[g.depth] == pytest.approx([0, 0, 0], abs=1e-9)
    bp0 = bp_denoise_fn(g, S, 0)
    direct = [float(kl_per_input(bp0(*xt), coarse(*xt)).mean()) for xt in inputs]  # KL(BP_0 || model), step by step
    assert curves[0] == pytest.approx(direct, rel=1e-9)
    assert curves[0][1] > curves[0][0] and curves[0][1] > curves[0][2]  # the peak sits at intermediate t
    with pytest.raises(BiasgenError, match="one of each per step"):
        oracle_kl_along_t(bps, [coarse(*inputs[0])])


def test_loss_terms_at_fixed_t_separate_a_memorizer_on_train_from_test(g, data):
    # Fig. 4b at t/T = 0.3: the empirical denoiser of the training set is overconfident on its own
    # sequences (l~ < 0), while on fresh sequences E[l~] = 0 for any denoiser, even this one
    t_fix = round(0.3 * S.T)
    bp0, emp = bp_denoise_fn(g, S, 0), empirical_denoise_fn(data["train"], 4, S)
    terms = {}
    for name in ("train", "test"):
        x0 = data[name][:200]
        x_t, t = noised_inputs(x0, 4, S, t=t_fix, seed=1)
        oracle = bp0(x_t, t)
        terms[name] = loss_terms(emp(x_t, t), oracle, x0)
        assert terms[name]["l"] == pytest.approx(terms[name]["l_star"] + terms[name]["l_tilde"], abs=1e-9)
    assert terms["train"]["l_tilde"] < 0 and abs(terms["test"]["l_tilde"]) < 0.25 * abs(terms["train"]["l_tilde"])
    x_t, t = noised_inputs(data["test"], 4, S, t=t_fix, seed=2)
    exact = loss_terms(bp0(x_t, t), bp0(x_t, t), data["test"])
    assert abs(exact["l_tilde"]) < 0.1 * exact["l"]
    with pytest.raises(BiasgenError, match="equal shape"):
        loss_terms(bp0(x_t, t), bp0(x_t, t)[:5], data["test"])


def test_nn_histograms_by_hand_and_for_copies(data):
    train = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])
    generated = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 1]])  # distances 0, 0, 2, 1
    test = torch.tensor([[2, 2, 2, 2], [0, 0, 0, 1]])  # distances 4, 1
    h = nn_histograms(generated, test, train)
    assert h["distance"] == [0, 1, 2, 3, 4]
    assert h["generated"] == pytest.approx([0.5, 0.25, 0.25, 0, 0]) and h["test"] == pytest.approx([0, 0.5, 0, 0, 0.5])
    copies = nn_histograms(data["train"][:50], data["test"], data["train"])
    assert copies["generated"][0] == 1.0 and sum(copies["test"]) == pytest.approx(1.0)
    assert copies["test"][0] < 0.5  # fresh sequences are mostly not in the training set


# -- U-turns: per-sequence ratios, random sequences ----------------------------------------------
def test_uturn_ratio_mean_and_sem_over_sequences():
    bp = torch.tensor([[0.5, 1.0, 0.8, 0.0], [0.25, 0.5, 0.5, 1.0]])
    same = uturn_ratio(bp, bp)
    assert same["mean"] == [1.0, 1.0] and same["sem"] == [0.0, 0.0] and same["n"] == [3, 4]  # bp = 0 left out
    model = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.25, 0.25, 0.5, 0.5]])
    r = uturn_ratio(model, bp)
    ratios = torch.tensor([1.0, 0.5, 0.5])  # first step, sequences with bp > 0
    assert r["mean"][0] == pytest.approx(float(ratios.mean())) and r["sem"][0] == pytest.approx(float(ratios.std()) / math.sqrt(3))
    assert r["mean"][1] == pytest.approx(0.75)
    assert uturn_ratio(model[:, :1], bp[:, :1])["sem"] == [None, None]  # one sequence: no standard error
    with pytest.raises(BiasgenError, match="steps, sequences"):
        uturn_ratio(model, bp[:, :2])


def test_uturn_random_bp_levels_and_memorizer(g, data):
    dens = {f"bp_{k}": bp_denoise_fn(g, S, k) for k in range(g.depth + 1)}
    dens["empirical"] = empirical_denoise_fn(data["train"], 4, S)
    steps = [5, 15]
    out = uturn_random(dens, 40, 8, 4, steps, S, reps=1, seed=0)
    assert set(out) == set(dens) and all(len(v["mean"]) == len(v["sem"]) == 2 for v in out.values())
    x0 = uniform_sequences(40, 8, 4, seed=0)
    assert torch.equal(x0, uniform_sequences(40, 8, 4, seed=0)) and int(x0.max()) < 4
    # random sequences break the grammar: the exact BP_0 must rewrite some symbols even at small t,
    # BP_depth (leaves independent given the root) much less, and the memorizer most of all
    shallow = {name: v["mean"][0] for name, v in out.items()}
    assert shallow["empirical"] < shallow["bp_0"] < shallow[f"bp_{g.depth}"]
    # each denoiser's result depends only on the arguments, not on the other denoisers run beside it
    alone = uturn_random({"bp_0": dens["bp_0"]}, 40, 8, 4, steps, S, reps=1, seed=0)
    assert alone["bp_0"] == out["bp_0"]
    with pytest.raises(BiasgenError, match="at least 2"):
        uturn_random({"bp_0": dens["bp_0"]}, 1, 8, 4, steps, S, reps=1, seed=0)
