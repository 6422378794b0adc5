"""Tests that pin the science, each built so that the bug it guards against makes it fail.

- every sampler (ancestral on all or strided steps, DDIM with and without noise), driven by
  an exact denoiser, reproduces the data distribution (Gaussian data, whose posterior mean
  is known in closed form; the grammar, whose exact denoiser is BP) once it has enough
  steps, and a DDPM sampler without its noise term does not;
- the memorized fraction counts ``d1 / d2 < 1/3`` of L2 distances, exactly;
- the twin similarity standardizes each image on its own before the cosine.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from biasgen.hierarchy import Grammar, sample_bp
from biasgen.images import metrics
from biasgen.images.metrics import memorized_fraction, nearest_neighbors, twin_distance, twin_similarity
from biasgen.sampler import ancestral_gaussian_variance, sample, timesteps
from biasgen.schedule import NoiseSchedule

# -- samplers against Gaussian data ------------------------------------------------------------
SCHEDULE = NoiseSchedule.linear()  # the image schedule: T = 1000
MU = torch.linspace(-1.0, 1.0, 8)  # data x0 ~ N(MU, SD^2 I) in 8 dimensions
SD = 0.5
SEEDS = list(range(2000))
Z_MAX = 4.0  # tolerance in standard errors


def gaussian_denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact ``E[x0 | x_t]`` of Gaussian data: ``MU + SD^2 sqrt(a) / (a SD^2 + 1 - a) (x_t - sqrt(a) MU)``."""
    a = SCHEDULE.abar(t, like=x_t).reshape(-1, 1)
    gain = SD**2 * a.sqrt() / (a * SD**2 + 1 - a)
    return MU + gain * (x_t - a.sqrt() * MU)


def assert_data_moments(x: torch.Tensor) -> None:
    """``x (N, D)`` has the data's per-dimension means, variance and zero correlations within Z_MAX standard errors."""
    n, d = x.shape
    x = x.double()
    z_mean = (x.mean(0) - MU.double()) / (SD / math.sqrt(n))
    z_var = (x.var(0).mean() - SD**2) / (SD**2 * math.sqrt(2 / (n - 1)) / math.sqrt(d))  # pooled over dimensions
    corr = torch.corrcoef(x.T)
    z_corr = corr[~torch.eye(d, dtype=torch.bool)] * math.sqrt(n)
    assert z_mean.abs().max() < Z_MAX, f"means off by {z_mean.tolist()} standard errors"
    assert abs(float(z_var)) < Z_MAX, f"variance {float(x.var(0).mean()):.4f} vs {SD**2} ({float(z_var):.1f} SE)"
    assert z_corr.abs().max() < Z_MAX, "dimensions are correlated"


@pytest.mark.parametrize("method, steps, eta", [
    ("ddpm", None, 0.0),  # the paper's sampler: ancestral, all T steps
    ("ddpm", 750, 0.0),  # ancestral on a strided schedule (at 100 / 250 steps it under-disperses: docs/samplers.md)
    ("ddim", None, 0.0),
    ("ddim", 250, 0.0),
    ("ddim", 250, 0.5),  # stochastic DDIM
])
def test_sampler_with_exact_denoiser_reproduces_gaussian_data(method, steps, eta):
    x = sample(gaussian_denoiser, SCHEDULE, (len(MU),), SEEDS, method=method, steps=steps, eta=eta,
               batch_size=len(SEEDS))
    assert x.shape == (len(SEEDS), len(MU))
    assert_data_moments(x)


@pytest.mark.parametrize("method, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_variance_converges_to_the_data_as_steps_grow(method, eta):
    # every sampler is first order in the step: with few steps it under-disperses, and the gap
    # must shrink as steps are added (samples share their noise streams, so the comparison is paired).
    # For this Gaussian the strided ancestral sampler (= DDIM eta 1) under-disperses most at equal steps.
    gaps = []
    for steps in (10, 50, 250):
        x = sample(gaussian_denoiser, SCHEDULE, (len(MU),), SEEDS[:500], method=method, steps=steps, eta=eta,
                   batch_size=500)
        gaps.append(SD**2 - float(x.var(0).mean()))
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_the_variance_recursion_matches_sampling():
    x = sample(gaussian_denoiser, SCHEDULE, (len(MU),), SEEDS, method="ddpm", steps=100, batch_size=len(SEEDS))
    exact = ancestral_gaussian_variance(SCHEDULE, timesteps(SCHEDULE, 100), SD**2)
    se = exact * math.sqrt(2 / (len(SEEDS) - 1)) / math.sqrt(len(MU))
    assert abs(float(x.double().var(0).mean()) - exact) < Z_MAX * se


def test_quadratic_spacing_keeps_the_papers_variance_at_every_scale():
    # Images hold structure at many scales; fine detail (small variance) is settled at low noise. Against the
    # paper's sampler (all T steps), 250 quadratically spaced steps keep the variance within 2% at every scale,
    # while 250 evenly spaced steps lose 28% of the finest scale's (docs/samplers.md).
    paper = timesteps(SCHEDULE)
    quadratic, uniform = timesteps(SCHEDULE, 250, "quadratic"), timesteps(SCHEDULE, 250)
    for var in (1e-3, 1e-2, 0.05, 0.25, 1.0):
        ref = ancestral_gaussian_variance(SCHEDULE, paper, var)
        assert abs(ancestral_gaussian_variance(SCHEDULE, quadratic, var) / ref - 1) < 0.02, var
    exact = lambda ts, var: ancestral_gaussian_variance(SCHEDULE, ts, var)
    assert exact(uniform, 1e-3) / exact(paper, 1e-3) < 0.75


def test_holding_the_prediction_at_high_noise_keeps_each_sample_and_the_data_moments():
    # Held predictions (the network called on every 4th step above t = 300; docs/samplers.md) run the paper's
    # chain on the same noise: each sample stays next to its paper's twin, at every scale of the data, and the
    # moments hold. Holding at every noise level (one call in 50) moves samples ~100 times further: the check bites.
    def exact(var):  # E[x0 | x_t] of x0 ~ N(0, var)
        def denoise(x_t, t):
            a = SCHEDULE.abar(t, like=x_t).reshape(-1, 1)
            return a.sqrt() * var / (a * var + 1 - a) * x_t
        return denoise

    for var in (1e-3, 0.05, 1.0):
        draw = lambda **hold: sample(exact(var), SCHEDULE, (len(MU),), SEEDS[:500], batch_size=500, **hold)
        paper, held = draw(), draw(hold_above=300, hold_every=4)
        coarse = draw(hold_above=0, hold_every=50)
        rms = lambda x: float((x - paper).pow(2).mean().sqrt()) / math.sqrt(var)  # in units of the data's sd
        assert rms(held) < 0.01 and rms(coarse) > 10 * rms(held), (var, rms(held), rms(coarse))
    x = sample(gaussian_denoiser, SCHEDULE, (len(MU),), SEEDS, batch_size=len(SEEDS), hold_above=300, hold_every=4)
    assert_data_moments(x)


@pytest.mark.parametrize("steps", [None, 100])
def test_ddpm_without_its_noise_term_fails_the_moment_test(monkeypatch, steps):
    def mean_only(self, x_t, x0_hat, t, noise, t_prev=None):  # the bug: the ancestral step forgets sqrt(var) * noise
        return self.posterior_mean_var(x_t, x0_hat, t, t_prev)[0]

    monkeypatch.setattr(NoiseSchedule, "ddpm_step", mean_only)
    x = sample(gaussian_denoiser, SCHEDULE, (len(MU),), SEEDS[:500], method="ddpm", steps=steps, batch_size=500)
    with pytest.raises(AssertionError, match="variance"):
        assert_data_moments(x)
    assert float(x.var(0).mean()) < 0.01 * SD**2  # collapsed to (nearly) the mean


# -- the BP sampler against the grammar ---------------------------------------------------------
def _grammar_fit(x: torch.Tensor, g: Grammar) -> tuple[float, float]:
    """Share of impossible sequences and the chi-square p-value of the sample frequencies of ``x (N, L)``."""
    xs = torch.cartesian_prod(*[torch.arange(g.q)] * g.n_leaves)  # every sequence, in base-q order
    p = g.log_prob(xs).exp()
    counts = torch.bincount((x * g.q ** torch.arange(g.n_leaves - 1, -1, -1)).sum(1), minlength=len(xs)).double()
    ok = p > 0
    return float(counts[~ok].sum() / len(x)), float(chisquare(counts[ok], p[ok] * counts[ok].sum()).pvalue)


def test_bp_ddpm_sampler_reproduces_the_grammar_and_fails_without_noise(monkeypatch):
    g = Grammar.random(q=3, depth=2, q_eff=2, seed=2)  # 24 possible sequences of 4 leaves
    schedule = NoiseSchedule.onehot(T=100)  # a short one-hot schedule keeps the test fast
    impossible, pvalue = _grammar_fit(sample_bp(g, seeds=range(2000), schedule=schedule, batch_size=2000), g)
    assert impossible == 0 and pvalue > 1e-3
    monkeypatch.setattr(NoiseSchedule, "ddpm_step",
                        lambda self, x_t, x0_hat, t, noise, t_prev=None: self.posterior_mean_var(x_t, x0_hat, t, t_prev)[0])
    _, pvalue = _grammar_fit(sample_bp(g, seeds=range(500), schedule=schedule, batch_size=500), g)
    assert pvalue < 1e-6


# -- the memorization threshold -----------------------------------------------------------------
def test_memorized_fraction_counts_ratio_strictly_below_one_third():
    d2 = torch.tensor([1.0, 3.0, 0.2, 7.5, 100.0])
    just_below, just_above = d2 / 3 * (1 - 1e-6), d2 / 3 * (1 + 1e-6)
    assert memorized_fraction(just_below, d2)["value"] == 1.0
    assert memorized_fraction(just_above, d2)["value"] == 0.0
    assert memorized_fraction(torch.tensor([1.0]), torch.tensor([3.0]))["value"] == 0.0  # exactly 1/3: strict
    mixed = memorized_fraction(torch.cat([just_below, just_above]), torch.cat([d2, d2]))
    assert mixed["value"] == 0.5 and mixed["n"] == 10


def test_memorized_fraction_on_nearest_neighbors_uses_l2_not_squared_distances():
    # training images A = 0 and B = 4 e_0 (and one far away); a sample at delta e_0 has
    # d1 = delta and d2 = 4 - delta: memorized iff delta < 1. Squared distances would count both.
    train = torch.zeros(3, 1, 4, 4)
    train[1, 0, 0, 0], train[2, 0, 3, 3] = 4.0, 100.0
    samples = torch.zeros(2, 1, 4, 4)
    samples[0, 0, 0, 0], samples[1, 0, 0, 0] = 0.99, 1.01
    nn = nearest_neighbors(samples, train)
    assert nn["l2"].tolist() == pytest.approx([0.99, 1.01]) and nn["l2_second"].tolist() == pytest.approx([3.01, 2.99])
    assert memorized_fraction(nn["l2"][:1], nn["l2_second"][:1])["value"] == 1.0
    assert memorized_fraction(nn["l2"][1:], nn["l2_second"][1:])["value"] == 0.0


# -- the twin-distance standardization ----------------------------------------------------------
def _affine_twins(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``x (n, 1, 8, 8)`` and ``a_i x_i + b_i`` with each image's own contrast ``a_i > 0`` and offset ``b_i``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, 1, 8, 8), generator=gen)
    a = 0.1 + 5 * torch.rand(n, generator=gen)
    b = 10 * torch.randn(n, generator=gen)
    return x, a.view(-1, 1, 1, 1) * x + b.view(-1, 1, 1, 1)


def test_twin_similarity_ignores_each_images_brightness_and_contrast():
    x, y = _affine_twins()
    assert torch.allclose(twin_similarity(x, y), torch.ones(len(x)), atol=1e-5)
    assert twin_distance([x, y])["median"] == pytest.approx(0, abs=1e-5)
    nn = nearest_neighbors(y[:4], x)  # the standardized nearest neighbour of a twin is its original
    assert torch.equal(nn["sim_index"], torch.arange(4)) and torch.allclose(nn["sim"], torch.ones(4), atol=1e-5)
    assert float(F.cosine_similarity(x.flatten(1), y.flatten(1)).min()) < 0.5  # the raw cosine does not see it


@pytest.mark.parametrize("broken", ["no standardization", "batch mean", "pixel-wise over the batch"])
def test_twin_similarity_fails_without_per_image_standardization(monkeypatch, broken):
    wrong = {
        "no standardization": lambda v: v,
        "batch mean": lambda v: (v - v.mean()) / v.std(),
        "pixel-wise over the batch": lambda v: (v - v.mean(0)) / (v.std(0) + 1e-8),
    }[broken]
    monkeypatch.setattr(metrics, "standardize", lambda x, eps=1e-8: F.normalize(wrong(x.reshape(len(x), -1).float()), dim=1))
    x, y = _affine_twins()
    assert float(twin_similarity(x, y).min()) < 0.9
