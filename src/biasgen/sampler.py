"""Reverse-diffusion samplers with per-sample shared noise (docs/method.md §1–§2).

Sample ``j`` draws its starting point ``x_T`` and every step's noise from its
own generator seeded with ``seeds[j]``. Two models sampled with the same seeds
therefore see exactly the same noise, whatever the batch size, the device, or
how many other samples are drawn.

The sampler knows nothing of the network: it takes an ``x0``-predictor
``denoise(x_t, t) -> x0_hat`` with ``x_t`` of shape ``(B, *shape)`` and ``t`` a
LongTensor ``(B,)``; with per-sample ``labels`` it calls ``denoise(x_t, t, y)``,
``y`` the ``(B,)`` labels of the batch. :func:`x0_from_eps_model` wraps an
eps-predicting network; :mod:`biasgen.guidance` makes a guided one.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import BiasgenError
from .runs import progress_bar
from .schedule import NoiseSchedule

Denoiser = Callable[..., torch.Tensor]  # (x_t, t) -> x0_hat, or (x_t, t, y) -> x0_hat with class labels

NOISE_CHUNK = 64  # steps of noise drawn at once per sample; fixed so streams never depend on batching


class NoiseStreams:
    """Independent Gaussian streams, one per seed, each of shape ``shape`` per draw."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        self.shape = tuple(shape)
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._buf: torch.Tensor | None = None
        self._pos = NOISE_CHUNK

    def draw(self) -> torch.Tensor:
        """The next draw of every stream: ``(len(seeds), *shape)`` float32 on CPU."""
        if self._pos == NOISE_CHUNK:
            self._buf = torch.stack([torch.randn((NOISE_CHUNK, *self.shape), generator=g) for g in self.gens])
            self._pos = 0
        out = self._buf[:, self._pos]
        self._pos += 1
        return out


def x0_from_eps_model(model: Callable, schedule: NoiseSchedule, clip: float | None = None) -> Denoiser:
    """Turn ``model(x_t, t[, y]) -> eps_hat`` into ``denoise(x_t, t[, y]) -> x0_hat`` (Tweedie), optionally clipped
    to ``[-clip, clip]``; a class label ``y`` is passed on to the model."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, *y: torch.Tensor) -> torch.Tensor:
        x0 = schedule.x0_from_eps(x_t, model(x_t, t, *y), t)
        return x0.clamp(-clip, clip) if clip is not None else x0

    return denoise


SAMPLERS = ("ddpm", "ddim")
# The one default of every sampling setting (the experiments' configs, sample(), the sequence samplers): the paper's
# sampler, ancestral DDPM on all T steps; the cheaper ones understate copying (docs/samplers.md).
DEFAULT_SAMPLER: str = "ddpm"
DEFAULT_SAMPLE_STEPS: int | None = None  # None: all T
DEFAULT_SAMPLE_SPACING: str = "uniform"
DEFAULT_HOLD_ABOVE: int = 0
DEFAULT_HOLD_EVERY: int = 1  # 1: the network is called at every visited step
SAMPLER_HELP = "ddpm (ancestral: draws of the DDPM posterior, the paper's) or ddim (deterministic unless --eta > 0)"
SAMPLE_STEPS_HELP = "sampling steps from T to 1, spaced by --sample-spacing (none: all T, the paper's sampler; docs/samplers.md)"
SPACINGS = ("uniform", "quadratic")
SPACING_HELP = ("how --sample-steps are spaced: uniform (evenly from T to 1), or quadratic (dense at low noise, where "
                "fine detail and copying are decided; docs/samplers.md)")
HOLD_HELP = ("with --hold-every k > 1: above this diffusion step the sampler calls the network on every k-th step "
             "only and reuses its last x0 prediction in between, on the same noise (docs/samplers.md)")
HOLD_EVERY_HELP = "above --hold-above, call the network on every this-many-th visited step (1: every step)"


def network_calls(ts: Sequence[int], hold_above: int = DEFAULT_HOLD_ABOVE,
                  hold_every: int = DEFAULT_HOLD_EVERY) -> list[bool]:
    """Which of the visited steps ``ts`` (descending, :func:`timesteps`) call the network: every step at or below
    ``hold_above``, and above it the first and then every ``hold_every``-th; the others reuse the last ``x0_hat``
    (``hold_every=1``: every step calls the network).

    At high noise the posterior mean gives ``x0_hat`` a small weight and ``x0_hat`` changes slowly, so holding it
    for a few steps moves a sample little, while every step still draws its own noise (docs/samplers.md measures
    what it moves).
    """
    if hold_above < 0 or hold_every < 1:
        raise BiasgenError(f"--hold-above must be >= 0 and --hold-every >= 1, got {hold_above} and {hold_every}.")
    return [t <= hold_above or i % hold_every == 0 for i, t in enumerate(ts)]


def is_paper_sampler(method: str, steps: int | None, T: int, hold_every: int = DEFAULT_HOLD_EVERY) -> bool:
    """Whether ``(method, steps, hold_every)`` is the paper's sampler: ancestral DDPM on all ``T`` steps, each
    calling the network (no held predictions, :func:`network_calls`)."""
    return method == "ddpm" and (steps is None or steps == T) and hold_every == 1


def network_call_count(T: int, steps: int | None = None, spacing: str = DEFAULT_SAMPLE_SPACING,
                       hold_above: int = DEFAULT_HOLD_ABOVE, hold_every: int = DEFAULT_HOLD_EVERY) -> int:
    """Network calls per sample of a sampler on ``T`` diffusion steps: its visited steps (:func:`step_grid`)
    that call the network (:func:`network_calls`)."""
    return sum(network_calls(step_grid(T, steps, spacing), hold_above, hold_every))


def timesteps(schedule: NoiseSchedule, steps: int | None = None, spacing: str = DEFAULT_SAMPLE_SPACING) -> list[int]:
    """The descending integer steps a sampler on ``schedule`` visits: :func:`step_grid` of its ``T``."""
    return step_grid(schedule.T, steps, spacing)


def step_grid(T: int, steps: int | None = None, spacing: str = DEFAULT_SAMPLE_SPACING) -> list[int]:
    """The descending integer steps a sampler visits, from ``T`` down to 1 (``steps`` None: all ``T``).

    ``spacing='uniform'``: ``steps`` evenly spaced. ``'quadratic'``: ``t = 1 + (T - 1) u^2`` for ``steps`` evenly
    spaced ``u`` in [0, 1] (the "quadratic" selection of Song et al. 2021, DDIM §D.2), rounded; where that grid is
    finer than one step (the low-noise end) every step is visited once, so it may visit fewer than ``steps``.
    ``steps`` None or ``T``: every step, whatever the spacing.
    """
    n = T if steps is None else steps
    if not 1 <= n <= T:
        raise BiasgenError(f"Sampling steps must be in [1, {T}], got {n}.")
    if spacing not in SPACINGS:
        raise BiasgenError(f"Unknown sample spacing {spacing!r}; choose {' or '.join(SPACINGS)}.")
    if n == T:  # every step, whatever the spacing
        return list(range(T, 0, -1))
    if spacing == "uniform":
        grid = torch.linspace(T, 1, n)
    else:
        grid = 1 + (T - 1) * torch.linspace(1, 0, n, dtype=torch.float64) ** 2
    ts = grid.round().long().unique(sorted=True).flip(0)
    return [int(t) for t in ts]


def describe_sampler(method: str, steps: int | None, eta: float, T: int, spacing: str = DEFAULT_SAMPLE_SPACING,
                     hold_above: int = DEFAULT_HOLD_ABOVE, hold_every: int = DEFAULT_HOLD_EVERY) -> str:
    """A short name of a sampler setting, e.g. ``'ddpm-1000'``, ``'ddpm-100'``, ``'ddim-50'``, ``'ddim-50-eta1'``,
    ``'ddpm-250-quadratic'``, ``'ddpm-1000-hold300x4'`` (:func:`network_calls`)."""
    name = f"{method}-{T if steps is None else steps}"
    name = name if method == "ddpm" or eta == 0 else f"{name}-eta{eta:g}"
    name = name if spacing == "uniform" or steps in (None, T) else f"{name}-{spacing}"
    return f"{name}-hold{hold_above}x{hold_every}" if hold_every > 1 else name


@torch.no_grad()
def sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    seeds: Sequence[int],
    method: str = DEFAULT_SAMPLER,
    steps: int | None = DEFAULT_SAMPLE_STEPS,
    eta: float = 0.0,
    spacing: str = DEFAULT_SAMPLE_SPACING,
    hold_above: int = DEFAULT_HOLD_ABOVE,
    hold_every: int = DEFAULT_HOLD_EVERY,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``len(seeds)`` samples of per-sample shape ``shape``; returns ``(N, *shape)`` float32 on CPU.

    Both samplers visit the steps of :func:`timesteps` (``steps`` of them spaced by ``spacing``; None: all ``T``):

    - ``method='ddpm'``: ancestral sampling, a draw of the DDPM posterior ``q(x_s | x_t, x0_hat)``
      between consecutive visited steps (the original DDPM sampler when ``steps`` is None or ``T``;
      "strided" with fewer). No noise on the last step.
    - ``method='ddim'``: DDIM with noise ``eta`` in [0, 1]; eta = 0 is deterministic (only ``x_T`` is
      random), eta = 1 gives the same chain as ``'ddpm'`` on the same steps.

    ``hold_above``, ``hold_every``: above step ``hold_above`` the network is called only on every ``hold_every``-th
    visited step, its ``x0_hat`` reused in between (:func:`network_calls`; ``hold_every=1``: every step).

    (Long for its documented settings; the loop itself is a dozen lines.)

    Every random draw (``x_T``, then one per step when the sampler is stochastic) comes from the
    sample's own stream, so a sample never depends on the batch it was drawn in. ``labels``: ``(N,)``
    long, one class label per sample, passed to ``denoise`` as its third argument (None: not passed).
    """
    if method not in SAMPLERS:
        raise BiasgenError(f"Unknown sampler {method!r}; choose 'ddpm' (ancestral) or 'ddim'.")
    if labels is not None and len(labels) != len(seeds):
        raise BiasgenError(f"One label per sample is needed: {len(seeds)} seeds but {len(labels)} labels.")
    if method == "ddpm" and eta != 0:
        raise BiasgenError("eta is a DDIM setting; the ancestral 'ddpm' sampler always draws the full posterior noise.")
    ts = timesteps(schedule, steps, spacing)
    calls = network_calls(ts, hold_above, hold_every)
    stochastic = method == "ddpm" or eta > 0
    out = []
    chunks = range(0, len(seeds), batch_size)
    name = describe_sampler(method, steps, eta, schedule.T, spacing, hold_above, hold_every)
    chunks = progress_bar(chunks, progress, f"sampling ({name})")
    for start in chunks:
        batch_seeds = seeds[start : start + batch_size]
        streams = NoiseStreams(batch_seeds, shape)
        x = streams.draw().to(device)
        y = () if labels is None else (torch.as_tensor(labels[start : start + batch_size]).long().to(device),)
        for i, t in enumerate(ts):
            if calls[i]:  # else the last x0_hat is reused
                x0_hat = denoise(x, torch.full((len(batch_seeds),), t, dtype=torch.long, device=device), *y)
            t_prev = ts[i + 1] if i + 1 < len(ts) else 0
            noise = streams.draw().to(device) if stochastic else None
            if method == "ddpm":
                x = schedule.ddpm_step(x, x0_hat, t, noise, t_prev=t_prev)
            else:
                x = schedule.ddim_step(x, x0_hat, t, t_prev, eta=eta, noise=noise)
        out.append(x.float().cpu())
    return torch.cat(out)


def ancestral_gaussian_variance(schedule: NoiseSchedule, ts: Sequence[int], var: float) -> float:
    """The exact variance of ancestral sampling on the steps ``ts`` (:func:`timesteps`) of 1-d Gaussian data with
    variance ``var``, driven by its exact denoiser: a closed-form check of a step schedule (docs/samplers.md).

    The denoiser is linear, ``x0_hat = k_t x_t + c``, and so is each step, ``x_s = A x0_hat + B x_t + sqrt(v) z``:
    the variance follows ``Var_s = (A k_t + B)^2 Var_t + v`` from ``Var_T = 1`` (no noise on the last step)."""
    out = 1.0
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else 0
        a = float(schedule.alpha_bar[t])
        k = math.sqrt(a) * var / (a * var + 1 - a)
        A = float(schedule.posterior_mean_var(zero, one, t, s)[0])  # the weight of x0_hat in the posterior mean
        B, v = (float(u) for u in schedule.posterior_mean_var(one, zero, t, s))  # the weight of x_t, the variance
        out = (A * k + B) ** 2 * out + (v if s > 0 else 0.0)
    return out
