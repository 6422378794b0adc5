"""The hierarchical lab against brute force: grammar, filtered sampling, exact BP, samplers."""
import math

import pytest
import torch
from scipy.stats import chisquare

from biasgen.errors import BiasgenError
from biasgen.hierarchy import (
    Grammar,
    empirical_denoiser,
    exact_denoiser,
    exact_eps,
    exact_log_posterior,
    exact_score,
    load_pool,
    sample_bp,
    sample_empirical,
    save_pool,
)
from biasgen.hierarchy import bp
from biasgen.schedule import NoiseSchedule

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def dense_leaf_log_probs(g: Grammar, k: int) -> torch.Tensor:
    """log P_k over all q**n leaf sequences, as one einsum over the whole tree (no message passing)."""
    letters = iter(LETTERS)
    root = next(letters)
    top = g.level_transitions(k)
    ops, specs, level = [torch.full((g.q,), 1.0 / g.q, dtype=torch.float64)], [root], []
    for j in range(2**k):
        s = next(letters)
        ops.append(top[j])
        specs.append(root + s)
        level.append(s)
    for _ in range(k, g.depth):
        nxt = []
        for p in level:
            left, right = next(letters), next(letters)
            ops.append(g.M)
            specs.append(p + left + right)
            nxt += [left, right]
        level = nxt
    return torch.einsum(",".join(specs) + "->" + "".join(level), *ops).log()


def brute_posterior(g: Grammar, x_t: torch.Tensor, abar: float, k: int) -> torch.Tensor:
    """Exact leaf marginals (B, n, q) by enumerating every leaf sequence."""
    lp, n, q = dense_leaf_log_probs(g, k), g.n_leaves, g.q
    coef = math.sqrt(abar) / (1 - abar)
    out = []
    for xb in x_t.double():
        L = lp.clone()
        for i in range(n):
            L = L + (coef * xb[i]).reshape([q if j == i else 1 for j in range(n)])
        L = L - torch.logsumexp(L.flatten(), 0)
        out.append(torch.stack([torch.logsumexp(L.movedim(i, 0).reshape(q, -1), 1) for i in range(n)]))
    return torch.stack(out).exp()


def noised(g: Grammar, B: int, abar: float, k: int = 0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.nn.functional.one_hot(g.sample(B, k=k, seed=seed), g.q).double()
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)


def all_sequences(g: Grammar) -> torch.Tensor:
    return torch.cartesian_prod(*[torch.arange(g.q)] * g.n_leaves)


SMALL = [(3, 3, 2), (3, 3, 3), (4, 2, 3), (5, 2, 5), (2, 3, 1)]  # (q, depth, q_eff): q_eff < q and = q
ABARS = [1e-4, 0.3, 0.9, 0.999, 1 - 1e-7]  # nearly pure noise ... nearly noiseless


@pytest.mark.parametrize("q,depth,q_eff", SMALL)
def test_posterior_matches_brute_force_every_k_and_noise(q, depth, q_eff):
    g = Grammar.random(q=q, depth=depth, q_eff=q_eff, seed=q + depth)
    for k in range(depth + 1):
        for abar in ABARS:
            x_t = noised(g, 3, abar, k=k, seed=k)
            ref = brute_posterior(g, x_t, abar, k)
            got64 = exact_denoiser(g, x_t, abar, k)
            got32 = exact_denoiser(g, x_t.float(), abar, k)
            assert got64.dtype == torch.float64 and got32.dtype == torch.float32
            assert (got64 - ref).abs().max() < 1e-9, (k, abar)
            # float32 input: compare with brute force on the same (rounded) input
            ref32 = brute_posterior(g, x_t.float(), abar, k)
            assert (got32.double() - ref32).abs().max() < 1e-5, (k, abar)


def test_posterior_exact_for_ambiguous_grammar_and_conflicting_evidence():
    gen = torch.Generator().manual_seed(0)
    M = torch.rand(3, 3, 3, generator=gen, dtype=torch.float64) ** 3
    dense = Grammar(M / M.sum((1, 2), keepdim=True), 3)
    sparse = Grammar.random(q=3, depth=3, q_eff=2, seed=3)
    for g in (dense, sparse):
        for abar in (0.5, 0.999, 1 - 1e-6):
            x_t = 3 * torch.randn(4, 8, 3, generator=gen, dtype=torch.float64)  # not from the grammar
            for k in range(4):
                ref = brute_posterior(g, x_t, abar, k)
                assert (exact_denoiser(g, x_t, abar, k) - ref).abs().max() < 1e-9
                assert (exact_denoiser(g, x_t.float(), abar, k).double() - brute_posterior(g, x_t.float(), abar, k)).abs().max() < 1e-5


def test_fast_path_hands_conflicts_to_the_exact_path():
    g = Grammar.random(q=3, depth=3, q_eff=2, seed=3)
    x_t = 3 * torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    psi = bp.leaf_log_evidence(x_t, 0.999).permute(2, 1, 0).contiguous()
    tab = bp._tables(g, 0)
    _, worst = bp._posterior_chunk(tab, psi, 1, exact=False)
    assert bool((worst < tab.log_floor).all())  # the certificate flags the underflowed rows...
    post = exact_denoiser(g, x_t, 0.999)
    assert torch.isfinite(post).all() and (post - brute_posterior(g, x_t, 0.999, 0)).abs().max() < 1e-9  # ...which are redone
    # on data from the grammar the fast path alone is certified and exact
    x_t = noised(g, 64, 0.9)
    fast, worst = bp._posterior_chunk(tab, bp.leaf_log_evidence(x_t, 0.9).permute(2, 1, 0).contiguous(), 1, exact=False)
    assert bool((worst >= tab.log_floor).all())
    assert (fast.exp().permute(2, 1, 0) - brute_posterior(g, x_t, 0.9, 0)).abs().max() < 1e-9


def test_log_posterior_is_normalised_and_per_sample_abar():
    g = Grammar.random(q=6, depth=4, q_eff=4, seed=0)
    x_t = noised(g, 5, 0.5).float()
    abar = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999])
    lp = exact_log_posterior(g, x_t, abar)
    assert lp.shape == (5, 16, 6) and lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5, 16), atol=1e-6)
    one = torch.cat([exact_denoiser(g, x_t[i : i + 1], float(abar[i])) for i in range(5)])
    assert torch.allclose(lp.exp(), one, atol=1e-6)


@pytest.mark.parametrize("q,depth,q_eff", [(3, 2, 2), (3, 3, 3), (4, 2, 4)])
def test_log_prob_sums_to_one_and_matches_dense(q, depth, q_eff):
    g = Grammar.random(q=q, depth=depth, q_eff=q_eff, seed=1)
    xs = all_sequences(g)
    for k in range(depth + 1):
        lp = g.log_prob(xs, k)
        assert abs(lp.exp().sum().item() - 1) < 1e-12
        ref = dense_leaf_log_probs(g, k).flatten()
        assert torch.equal(lp > -math.inf, ref > -math.inf)
        ok = ref > -math.inf
        assert (lp[ok] - ref[ok]).abs().max() < 1e-10
        assert torch.equal(g.is_grammatical(xs, k), ok)


def test_sample_frequencies_match_exact_distribution_every_k():
    g = Grammar.random(q=3, depth=2, q_eff=2, seed=2)
    xs = all_sequences(g)
    n = 40_000
    for k in range(3):
        p = g.log_prob(xs, k).exp()
        x = g.sample(n, k=k, seed=10 + k)
        idx = (x * g.q ** torch.arange(g.n_leaves - 1, -1, -1)).sum(1)
        counts = torch.bincount(idx, minlength=len(xs)).double()
        assert counts[p == 0].sum() == 0  # never an impossible sequence
        keep = p * n >= 5
        assert counts[~keep].sum() <= 30
        f_exp = p[keep] * n
        f_obs = counts[keep]
        assert chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue > 1e-3, k


def test_paper_grammar_construction():
    g = Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0)
    assert g.M.dtype == torch.float64 and g.M.shape == (6, 6, 6) and (g.q, g.depth, g.n_leaves) == (6, 4, 16)
    assert torch.allclose(g.M.sum((1, 2)), torch.ones(6, dtype=torch.float64))
    assert ((g.M > 0).flatten(1).sum(1) == 4).all()  # each parent owns q_eff pairs
    assert not g.ambiguous
    assert torch.equal(g.M, Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0).M)
    assert not torch.equal(g.M, Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=1).M)
    full = Grammar.random(q=4, depth=2, q_eff=4, seed=0)  # q_eff = q: every pair used exactly once
    assert ((full.M > 0).sum(0) == 1).all()


def test_sampling_is_seeded_vectorised_and_prefix_stable():
    g = Grammar.random(q=6, depth=4, q_eff=4, seed=0)
    for k in (0, 2, 4):
        x = g.sample(1000, k=k, seed=3)
        assert x.dtype == torch.int64 and x.shape == (1000, 16) and 0 <= int(x.min()) and int(x.max()) < 6
        assert torch.equal(x, g.sample(1000, k=k, seed=3))
        assert torch.equal(x[:10], g.sample(10, k=k, seed=3))
        assert not torch.equal(x, g.sample(1000, k=k, seed=4))
    assert g.is_grammatical(g.sample(5000, k=0, seed=1)).all()
    assert not g.is_grammatical(g.sample(5000, k=4, seed=1)).all()  # filtering breaks the top rules


def test_validity_and_grammaticality_detect_a_broken_rule():
    g = Grammar.random(q=6, depth=4, q_eff=4, seed=0)
    x = g.sample(200, seed=5)
    assert (g.level_validity(x) == 1).all()
    forbidden = torch.nonzero(g.M.sum(0) == 0)[0]  # a child pair no parent emits
    bad = x.clone()
    bad[:, 0:2] = forbidden
    v = g.level_validity(bad)
    assert (v[:, -1] == 7 / 8).all()  # one of the 8 leaf-level triples fails
    assert not g.is_grammatical(bad).any()
    assert g.log_prob(bad).eq(-math.inf).all()


def test_leaf_entropy_matches_enumeration():
    g = Grammar.random(q=3, depth=3, q_eff=2, seed=3)
    lp = dense_leaf_log_probs(g, 0).flatten()
    p = lp.exp()
    assert abs(g.leaf_entropy() + (p[p > 0] * lp[p > 0]).sum().item()) < 1e-10


def test_tweedie_eps_and_score():
    g = Grammar.random(q=6, depth=4, q_eff=4, seed=0)
    s = NoiseSchedule.onehot()
    t = torch.tensor([10, 100, 300, 499])
    x_t = s.add_noise(torch.nn.functional.one_hot(g.sample(4, seed=1), 6).double(), torch.randn(4, 16, 6, dtype=torch.float64), t)
    x0 = exact_denoiser(g, x_t, s.abar(t))
    assert torch.allclose(s.x0_from_eps(x_t, exact_eps(g, x_t, t, s), t), x0, atol=1e-9)
    a = s.abar(t).reshape(-1, 1, 1)
    assert torch.allclose(exact_score(g, x_t, t, s) * (1 - a), a.sqrt() * x0 - x_t, atol=1e-9)


def test_bp_sampler_is_grammatical_and_shares_noise():
    g = Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0)
    x = sample_bp(g, seeds=range(100))
    assert x.shape == (100, 16) and x.dtype == torch.int64
    assert g.is_grammatical(x).double().mean() >= 0.99
    assert torch.equal(sample_bp(g, seeds=[42])[0], x[42])  # per-sample noise: batch-independent


def test_empirical_denoiser_matches_gaussian_posterior_and_only_copies():
    g = Grammar.random(q=4, depth=3, q_eff=3, seed=0)
    train = g.sample(20, seed=1)
    abar = 0.4
    x_t = noised(g, 6, abar, seed=2)
    X = torch.nn.functional.one_hot(train, 4).double()  # (N, n, q)
    loglik = -((x_t[:, None] - math.sqrt(abar) * X[None]) ** 2).sum((2, 3)) / (2 * (1 - abar))  # (B, N)
    ref = torch.einsum("bn,niq->biq", loglik.softmax(-1), X)
    assert (empirical_denoiser(train, x_t, abar) - ref).abs().max() < 1e-10
    out = sample_empirical(train, 4, seeds=range(20), method="ddim", steps=50)
    member = (out[:, None] == train[None]).all(-1).any(1)
    assert member.all()


def test_pool_roundtrip(tmp_path):
    g = Grammar.random(q=6, depth=4, q_eff=4, seed=0)
    x = g.sample(500, k=1, seed=9)
    path = save_pool(tmp_path / "pool.npz", x, g, k=1, seed=9)
    y, g2, meta = load_pool(path)
    assert torch.equal(x, y) and torch.equal(g.M, g2.M) and g2.depth == 4 and meta == {"k": 1, "seed": 9}


def test_bad_inputs_raise_clear_errors():
    g = Grammar.random(q=3, depth=2, q_eff=2, seed=0)
    with pytest.raises(BiasgenError, match="shape"):
        Grammar(torch.ones(3, 3), 2)
    with pytest.raises(BiasgenError, match="sums to"):
        Grammar(torch.ones(3, 3, 3), 2)
    with pytest.raises(BiasgenError, match="q_eff"):
        Grammar.random(q=3, depth=2, q_eff=4)
    gen = torch.Generator().manual_seed(0)
    M = torch.rand(3, 3, 3, generator=gen)
    ambiguous = Grammar(M / M.sum((1, 2), keepdim=True), 2)
    with pytest.raises(BiasgenError, match="unambiguous"):
        ambiguous.level_validity(ambiguous.sample(4))
    with pytest.raises(BiasgenError, match="unambiguous"):
        ambiguous.leaf_entropy()
    x_t = torch.randn(2, 4, 3)
    for k in (-1, 3, 1.5):
        with pytest.raises(BiasgenError, match="filtering level"):
            exact_denoiser(g, x_t, 0.5, k=k)
        with pytest.raises(BiasgenError, match="filtering level"):
            g.sample(3, k=k)
    with pytest.raises(BiasgenError, match="shape"):
        exact_denoiser(g, torch.randn(2, 5, 3), 0.5)
    with pytest.raises(BiasgenError, match="float32 or float64"):
        exact_denoiser(g, torch.zeros(2, 4, 3, dtype=torch.long), 0.5)
    for abar in (0.0, 1.0, -0.1, torch.tensor([0.5, 1.2])):
        with pytest.raises(BiasgenError, match="abar"):
            exact_denoiser(g, x_t, abar)
    with pytest.raises(BiasgenError, match="abar"):
        exact_denoiser(g, x_t, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(BiasgenError, match="Sequence symbols"):
        g.log_prob(torch.full((1, 4), 3))
