"""Noise schedules, Tweedie identities, the shared-noise sampler and the training loop."""
import math

import pytest
import torch

from biasgen.errors import BiasgenError
from biasgen.losses import EpsMSELoss, X0CrossEntropyLoss
from biasgen.sampler import NoiseStreams, describe_sampler, sample, step_grid, timesteps, x0_from_eps_model
from biasgen.schedule import NoiseSchedule
from biasgen.training import checkpoint_stem, checkpoint_steps, completed_step, train
from biasgen.checkpoint import load_tensors


def test_linear_schedule_matches_spec():
    s = NoiseSchedule.linear()
    assert s.T == 1000
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    assert float(s.alpha_bar[0]) == 1.0
    assert float(s.alpha_bar[5]) == pytest.approx(math.prod(1 - float(b) for b in s.betas[:5]))
    oh = NoiseSchedule.onehot()
    assert oh.T == 500 and float(oh.betas[0]) == pytest.approx(2e-4) and float(oh.betas[-1]) == pytest.approx(0.04)
    cos = NoiseSchedule.cosine(T=100)
    assert bool((cos.alpha_bar[1:] < cos.alpha_bar[:-1]).all())


def test_tweedie_identities_roundtrip():
    s = NoiseSchedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1000, (8,), generator=g)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.x0_from_eps(x_t, eps, t), x0)
    torch.testing.assert_close(s.eps_from_x0(x_t, x0, t), eps)
    a = s.alpha_bar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.score_from_x0(x_t, x0, t), -eps / (1 - a).sqrt())


def test_posterior_mean_is_exact_gaussian_posterior():
    # q(x_{t-1} | x_t, x0) for a scalar: compare with the product of Gaussians computed directly
    s = NoiseSchedule.linear(T=50)
    t = 20
    x0, x_t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.7], dtype=torch.float64)
    a_prev, beta = float(s.alpha_bar[t - 1]), float(s.betas[t - 1])
    # prior x_{t-1} ~ N(sqrt(a_prev) x0, 1 - a_prev); likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    prec = 1 / (1 - a_prev) + (1 - beta) / beta
    mean = (math.sqrt(a_prev) * 0.3 / (1 - a_prev) + math.sqrt(1 - beta) * -0.7 / beta) / prec
    m, v = s.posterior_mean_var(x_t, x0, t)
    assert float(m) == pytest.approx(mean) and v == pytest.approx(1 / prec)
    # the last DDPM step returns x0_hat exactly (no noise)
    assert float(s.ddpm_step(x_t, x0, 1, torch.ones(1))) == pytest.approx(0.3)


def test_strided_posterior_is_the_exact_gaussian_conditional():
    # q(x_s | x_t, x0) for non-adjacent s < t: prior x_s ~ N(sqrt(a_s) x0, 1 - a_s),
    # likelihood x_t ~ N(sqrt(a_t / a_s) x_s, 1 - a_t / a_s)
    sched = NoiseSchedule.linear(T=50)
    x0, x_t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.7], dtype=torch.float64)
    for t, s in ((40, 25), (40, 39), (12, 1)):
        a_s, alpha = float(sched.alpha_bar[s]), float(sched.alpha_bar[t] / sched.alpha_bar[s])
        prec = 1 / (1 - a_s) + alpha / (1 - alpha)
        mean = (math.sqrt(a_s) * 0.3 / (1 - a_s) + math.sqrt(alpha) * -0.7 / (1 - alpha)) / prec
        m, v = sched.posterior_mean_var(x_t, x0, t, s)
        assert float(m) == pytest.approx(mean) and v == pytest.approx(1 / prec)
    assert float(sched.ddpm_step(x_t, x0, 40, torch.ones(1), t_prev=0)) == pytest.approx(0.3)  # last step: no noise
    with pytest.raises(BiasgenError, match="t_prev < t"):
        sched.posterior_mean_var(x_t, x0, 10, 10)


def test_ddim_with_eta_one_is_the_strided_ancestral_sampler():
    # two formulas of one chain: DDIM's sigma = posterior std, and the DDPM posterior between visited steps
    s = NoiseSchedule.linear(T=200)
    den = lambda x, t: torch.tanh(x)  # any denoiser
    ancestral = sample(den, s, (2, 3), [5, 6, 7], method="ddpm", steps=20)
    torch.testing.assert_close(sample(den, s, (2, 3), [5, 6, 7], method="ddim", steps=20, eta=1.0), ancestral)
    half = sample(den, s, (2, 3), [5, 6, 7], method="ddim", steps=20, eta=0.5)
    deterministic = sample(den, s, (2, 3), [5, 6, 7], method="ddim", steps=20)
    assert not torch.allclose(half, ancestral) and not torch.allclose(half, deterministic)


def test_shared_noise_is_invariant_to_batch_size_and_sample_count():
    s = NoiseSchedule.linear(T=100)
    den = lambda x, t: 0.5 * x  # any deterministic denoiser
    seeds = [11, 12, 13, 14, 15]
    full = sample(den, s, (1, 3, 3), seeds, batch_size=5)
    assert not torch.allclose(full[0], full[1])
    torch.testing.assert_close(sample(den, s, (1, 3, 3), seeds, batch_size=2), full)
    torch.testing.assert_close(sample(den, s, (1, 3, 3), seeds[2:4], batch_size=1), full[2:4])
    for method, eta in (("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)):  # strided samplers, with and without noise
        strided = sample(den, s, (1, 3, 3), seeds, method=method, steps=10, eta=eta, batch_size=3)
        torch.testing.assert_close(sample(den, s, (1, 3, 3), seeds[3:], method=method, steps=10, eta=eta), strided[3:])


def test_noise_streams_are_standard_normal():
    draws = torch.cat([NoiseStreams([3, 4], (100,)).draw() for _ in range(5)])
    assert abs(float(draws.mean())) < 0.1 and abs(float(draws.std()) - 1) < 0.1


def test_sampler_recovers_a_point_mass():
    # the exact denoiser of a single data point x* is x0_hat = x*: every sample must end at x*
    s = NoiseSchedule.linear(T=200)
    target = torch.tensor([[0.5, -0.25]])
    out = sample(lambda x, t: target.expand_as(x), s, (2,), [1, 2, 3])
    torch.testing.assert_close(out, target.expand(3, 2))
    eps_model = lambda x, t: s.eps_from_x0(x, target.expand_as(x), t)  # eps-parameterised version
    out = sample(x0_from_eps_model(eps_model, s), s, (2,), [1, 2], method="ddim", steps=20)
    torch.testing.assert_close(out, target.expand(2, 2), atol=1e-5, rtol=0)


def test_sampler_rejects_bad_settings():
    s = NoiseSchedule.linear(T=10)
    den = lambda x, t: x
    with pytest.raises(BiasgenError, match="Unknown sampler"):
        sample(den, s, (2,), [0], method="euler")
    with pytest.raises(BiasgenError, match="eta is a DDIM setting"):
        sample(den, s, (2,), [0], method="ddpm", eta=0.5)
    with pytest.raises(BiasgenError, match=r"eta must lie in \[0, 1\]"):
        sample(den, s, (2,), [0], method="ddim", eta=1.5)
    with pytest.raises(BiasgenError, match=r"steps must be in \[1, 10\]"):
        timesteps(s, 11)
    with pytest.raises(BiasgenError, match="Unknown noise schedule"):
        NoiseSchedule.from_name("sigmoid", 10)
    assert timesteps(s, 3) == [10, 6, 1]
    assert timesteps(s) == list(range(10, 0, -1))
    with pytest.raises(BiasgenError, match="Unknown sample spacing 'log'"):
        timesteps(s, 3, "log")


def test_quadratic_spacing_is_dense_at_low_noise_and_named():
    assert step_grid(10, 4, "quadratic") == [10, 5, 2, 1]  # t = 1 + 9 u^2 for u = 1, 2/3, 1/3, 0
    grid = step_grid(1000, 250, "quadratic")
    assert grid[0] == 1000 and grid[-1] == 1 and grid == sorted(set(grid), reverse=True)
    assert grid[-15:] == list(range(15, 0, -1))  # every step at the low-noise end, where the grid is finer than 1
    assert len(grid) == 234  # so fewer calls than the 250 asked for
    assert step_grid(1000, None, "quadratic") == step_grid(1000, 1000, "quadratic") == list(range(1000, 0, -1))
    assert describe_sampler("ddpm", 250, 0.0, 1000, "quadratic") == "ddpm-250-quadratic"
    assert describe_sampler("ddpm", None, 0.0, 1000, "quadratic") == "ddpm-1000"  # all steps: the paper's sampler
    assert describe_sampler("ddim", 50, 0.5, 1000) == "ddim-50-eta0.5"


def test_checkpoint_steps_are_log_spaced_and_end_at_total():
    steps = checkpoint_steps(2000, 12, first=20)
    assert steps[0] == 20 and steps[-1] == 2000 and steps == sorted(set(steps))
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert max(ratios) / min(ratios) < 1.3
    assert checkpoint_steps(5, 10) == [1, 2, 3, 4, 5]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 4))

    def forward(self, x, t):
        return self.net(x.flatten(1)).reshape(x.shape)


def _model(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


def test_training_resumes_bit_identically(tmp_path):
    s = NoiseSchedule.linear(T=100)
    data = torch.randn(50, 1, 2, 2)
    kw = dict(batch_size=8, lr=1e-2, seed=3, meta={"x": 1}, progress=False)
    train(_model(), EpsMSELoss(s), data, steps=40, checkpoints=[5, 20, 40], out_dir=tmp_path / "a", **kw)
    train(_model(), EpsMSELoss(s), data, steps=20, checkpoints=[5, 20], out_dir=tmp_path / "b", **kw)  # "killed" at 20
    assert completed_step(tmp_path / "b") == 20
    train(_model(), EpsMSELoss(s), data, steps=40, checkpoints=[5, 20, 40], out_dir=tmp_path / "b", **kw)
    a, meta = load_tensors(checkpoint_stem(tmp_path / "a", 40))
    b, _ = load_tensors(checkpoint_stem(tmp_path / "b", 40))
    assert meta["step"] == 40 and meta["x"] == 1
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_training_stops_on_non_finite_loss(tmp_path):
    calls = {"n": 0}

    def exploding(model, x0, gen):
        calls["n"] += 1
        loss = model(x0, None).pow(2).mean()
        return loss * (float("nan") if calls["n"] >= 7 else 1.0)

    with pytest.raises(BiasgenError, match=r"non-finite loss at step 7.*checkpoint step 5"):
        train(_model(), exploding, torch.randn(10, 1, 2, 2), steps=10, batch_size=4, lr=1e-3,
              checkpoints=[5, 10], seed=0, out_dir=tmp_path, meta={}, progress=False)
    assert checkpoint_stem(tmp_path, 5).with_suffix(".safetensors").exists()
    assert completed_step(tmp_path) == 5


def test_corrupt_resume_state_is_a_clear_error(tmp_path):
    s = NoiseSchedule.linear(T=100)
    data = torch.randn(20, 1, 2, 2)
    kw = dict(batch_size=4, lr=1e-3, seed=0, meta={}, progress=False)
    train(_model(), EpsMSELoss(s), data, steps=4, checkpoints=[2, 4], out_dir=tmp_path, **kw)
    (tmp_path / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(BiasgenError, match="corrupt"):
        train(_model(), EpsMSELoss(s), data, steps=8, checkpoints=[2, 4, 8], out_dir=tmp_path, **kw)


def test_ema_checkpoint_differs_from_raw_weights(tmp_path):
    s = NoiseSchedule.linear(T=100)
    data = torch.randn(20, 1, 2, 2)
    kw = dict(batch_size=4, lr=1e-2, seed=0, meta={}, progress=False, steps=10, checkpoints=[10])
    train(_model(), EpsMSELoss(s), data, out_dir=tmp_path / "raw", **kw)
    train(_model(), EpsMSELoss(s), data, out_dir=tmp_path / "ema", ema_decay=0.9, **kw)
    raw, _ = load_tensors(checkpoint_stem(tmp_path / "raw", 10))
    ema, meta = load_tensors(checkpoint_stem(tmp_path / "ema", 10))
    assert meta["ema"] is True
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_cross_entropy_loss_is_small_for_a_perfect_token_model():
    s = NoiseSchedule.onehot()
    tokens = torch.randint(0, 3, (6, 4))
    perfect = lambda x, t: 50 * torch.nn.functional.one_hot(tokens, 3).float()
    uniform = lambda x, t: torch.zeros(6, 4, 3)
    gen = torch.Generator().manual_seed(0)
    loss = X0CrossEntropyLoss(s, 3)
    assert float(loss(perfect, tokens, gen)) < 1e-6
    assert float(loss(uniform, tokens, gen)) == pytest.approx(math.log(3))



def test_losses_travel_to_worker_processes_as_they_are():
    """A loss is a picklable object (worker processes and Ray tasks receive it): after a pickle round trip it draws
    the same noise and gives the same value."""
    import pickle

    model = torch.nn.Conv2d(1, 1, 1)
    net = lambda x, t: model(x)
    x0 = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 3, (4, 5), generator=torch.Generator().manual_seed(2))
    logits = lambda x, t: x * 2.0
    for loss, args in ((EpsMSELoss(NoiseSchedule.linear(T=50)), (net, x0)),
                       (X0CrossEntropyLoss(NoiseSchedule.onehot(T=50), 3), (logits, tokens))):
        copy = pickle.loads(pickle.dumps(loss))
        assert type(copy) is type(loss)
        a = loss(*args, torch.Generator().manual_seed(0)).detach()
        b = copy(*args, torch.Generator().manual_seed(0)).detach()
        assert float(a) == float(b) and float(a) > 0


def test_ema_is_bias_corrected_so_the_init_does_not_linger(tmp_path):
    """Step 1's EMA equals the step-1 weights, and step k's EMA is the (1-d) d^(k-i) weighted mean of w_1..w_k:
    an uncorrected EMA would still hold 99% of the random init at step 1 (decay 0.99)."""
    s = NoiseSchedule.linear(T=100)
    data = torch.randn(20, 1, 2, 2)
    kw = dict(batch_size=4, lr=1e-2, seed=0, meta={}, progress=False)
    snapshots = []
    for k in (1, 2, 3):  # raw weights after each step: resume state of runs stopped there
        train(_model(), EpsMSELoss(s), data, steps=k, checkpoints=[k], out_dir=tmp_path / f"raw{k}", **kw)
        state, _ = load_tensors(tmp_path / f"raw{k}" / "state")
        snapshots.append({n[6:]: v for n, v in state.items() if n.startswith("model.")})
    d = 0.99
    train(_model(), EpsMSELoss(s), data, steps=3, checkpoints=[1, 3], out_dir=tmp_path / "ema", ema_decay=d, **kw)
    first, _ = load_tensors(checkpoint_stem(tmp_path / "ema", 1))
    third, _ = load_tensors(checkpoint_stem(tmp_path / "ema", 3))
    weights = torch.tensor([(1 - d) * d ** 2, (1 - d) * d, 1 - d]) / (1 - d ** 3)
    for name in snapshots[0]:
        torch.testing.assert_close(first[name], snapshots[0][name], rtol=1e-5, atol=1e-6)
        expected = sum(w * snap[name] for w, snap in zip(weights, snapshots))
        torch.testing.assert_close(third[name], expected, rtol=1e-5, atol=1e-6)


def test_ema_resume_is_bit_identical(tmp_path):
    s = NoiseSchedule.linear(T=100)
    data = torch.randn(20, 1, 2, 2)
    kw = dict(batch_size=4, lr=1e-2, seed=0, meta={}, progress=False, ema_decay=0.9)
    train(_model(), EpsMSELoss(s), data, steps=8, checkpoints=[4, 8], out_dir=tmp_path / "a", **kw)
    train(_model(), EpsMSELoss(s), data, steps=4, checkpoints=[4], out_dir=tmp_path / "b", **kw)
    train(_model(), EpsMSELoss(s), data, steps=8, checkpoints=[4, 8], out_dir=tmp_path / "b", **kw)
    a, _ = load_tensors(checkpoint_stem(tmp_path / "a", 8))
    b, _ = load_tensors(checkpoint_stem(tmp_path / "b", 8))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_halve_cosine_schedule_shape():
    from biasgen.training import lr_factor

    assert lr_factor("constant", 7, 10) == 1.0
    assert [lr_factor("halve-cosine", s, 100) for s in (1, 50, 51, 75)] == [1.0, 1.0, 0.5, 0.5]
    assert lr_factor("halve-cosine", 76, 100) == pytest.approx(0.5, abs=0.01)
    assert lr_factor("halve-cosine", 100, 100) == pytest.approx(0.1)
    with pytest.raises(BiasgenError, match="schedule"):
        lr_factor("linear", 1, 10)
