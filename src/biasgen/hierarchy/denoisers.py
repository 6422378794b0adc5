"""Reverse diffusion on one-hot sequences with exact denoisers (docs/method.md §1, §6).

Two reference denoisers, both ``x0``-predictors for :func:`biasgen.sampler.sample`:

- the exact BP denoiser of a grammar (``bp_denoise_fn``): samples the grammar;
- the **empirical denoiser** of a finite training set (``empirical_denoise_fn``):
  the exact posterior mean when the data distribution *is* the training set,
  so it only reproduces training points.

Samples use per-sample shared noise (sample ``j`` follows the noise of
``seeds[j]``), and the final token of each position is the argmax.

    seqs = sample_bp(g, seeds=range(512))                     # LongTensor (512, 2**depth)
    copies = sample_empirical(train, g.q, seeds=range(512))   # rows of `train`
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BiasgenError
from ..sampler import (DEFAULT_HOLD_ABOVE, DEFAULT_HOLD_EVERY, DEFAULT_SAMPLE_SPACING, DEFAULT_SAMPLE_STEPS,
                       DEFAULT_SAMPLER, Denoiser, sample)
from ..schedule import NoiseSchedule
from .bp import exact_denoiser
from .grammar import Grammar


def bp_denoise_fn(g: Grammar, schedule: NoiseSchedule, k: int = 0) -> Denoiser:
    """``denoise(x_t (B, 2**depth, q), t (B,)) -> x0_hat_BP`` of the k-filtered model, for the sampler."""
    g.check_k(k)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return exact_denoiser(g, x_t, schedule.abar(t), k)

    return denoise


def _one_hot_rows(train: torch.Tensor, q: int) -> torch.Tensor:
    """Training sequences ``(N, n)`` as flattened one-hot rows ``(N, n * q)`` float32."""
    train = torch.as_tensor(train)
    if train.ndim != 2 or len(train) == 0 or train.dtype.is_floating_point:
        raise BiasgenError(f"The training set must be a non-empty integer tensor (N, n), got {train.dtype} {tuple(train.shape)}.")
    if int(train.min()) < 0 or int(train.max()) >= q:
        raise BiasgenError(f"Training symbols must lie in [0, q={q}).")
    return torch.nn.functional.one_hot(train.long(), q).flatten(1).float()


def _empirical(X: torch.Tensor, x_t: torch.Tensor, abar) -> torch.Tensor:
    """Posterior mean over the one-hot training rows ``X`` ``(N, n*q)`` given ``x_t`` ``(B, n, q)``."""
    if x_t.ndim != 3 or x_t.shape[1] * x_t.shape[2] != X.shape[1]:
        raise BiasgenError(f"x_t must have shape (B, n, q) with n * q = {X.shape[1]}, got {tuple(x_t.shape)}.")
    abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
    if not bool(((abar > 0) & (abar < 1)).all()):
        raise BiasgenError("abar must lie strictly inside (0, 1).")
    X = X.to(x_t.dtype)
    # log N(x_t; sqrt(abar) x, (1 - abar) I) up to terms equal for every one-hot x
    logits = (abar.sqrt() / (1 - abar)).to(x_t.dtype) * (x_t.flatten(1) @ X.T)  # (B, N)
    return (logits.softmax(-1) @ X).view_as(x_t)


def empirical_denoiser(train: torch.Tensor, x_t: torch.Tensor, abar) -> torch.Tensor:
    """Exact ``E[one_hot(x0) | x_t]`` when ``x0`` is uniform over the rows of ``train``.

    ``train``: LongTensor ``(N, n)``; ``x_t``: ``(B, n, q)``; ``abar``: float or ``(B,)``.
    Returns ``(B, n, q)`` in ``x_t``'s dtype: a convex combination of training one-hots.
    """
    return _empirical(_one_hot_rows(train, x_t.shape[-1]), x_t, abar)


def empirical_denoise_fn(train: torch.Tensor, q: int, schedule: NoiseSchedule) -> Denoiser:
    """``denoise(x_t, t)`` of the empirical denoiser of ``train`` ``(N, n)``, for the sampler."""
    X = _one_hot_rows(train, q)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _empirical(X, x_t, schedule.abar(t))

    return denoise


def sample_sequences(
    denoise: Denoiser,
    n_leaves: int,
    q: int,
    seeds: Sequence[int],
    schedule: NoiseSchedule | None = None,
    method: str = DEFAULT_SAMPLER,
    steps: int | None = DEFAULT_SAMPLE_STEPS,
    batch_size: int = 256,
    eta: float = 0.0,
    spacing: str = DEFAULT_SAMPLE_SPACING,
    hold_above: int = DEFAULT_HOLD_ABOVE,
    hold_every: int = DEFAULT_HOLD_EVERY,
) -> torch.Tensor:
    """Reverse diffusion of one-hot sequences driven by ``denoise``; LongTensor ``(len(seeds), n_leaves)``.

    ``schedule`` defaults to the one-hot schedule of docs/method.md §1 (T = 500); ``method``, ``steps``
    (None: all T), ``eta``, ``spacing``, ``hold_above`` and ``hold_every`` are those of
    :func:`biasgen.sampler.sample`.
    """
    schedule = schedule or NoiseSchedule.onehot()
    x = sample(denoise, schedule, (n_leaves, q), list(seeds), method=method, steps=steps, eta=eta,
               spacing=spacing, hold_above=hold_above, hold_every=hold_every, batch_size=batch_size)
    return x.argmax(-1)


def sample_bp(
    g: Grammar,
    seeds: Sequence[int],
    k: int = 0,
    schedule: NoiseSchedule | None = None,
    method: str = DEFAULT_SAMPLER,
    steps: int | None = DEFAULT_SAMPLE_STEPS,
    batch_size: int = 256,
) -> torch.Tensor:
    """The BP sampler: reverse diffusion with the exact denoiser of the k-filtered model; ``(len(seeds), 2**depth)``."""
    schedule = schedule or NoiseSchedule.onehot()
    return sample_sequences(bp_denoise_fn(g, schedule, k), g.n_leaves, g.q, seeds, schedule, method, steps, batch_size)


def sample_empirical(
    train: torch.Tensor,
    q: int,
    seeds: Sequence[int],
    schedule: NoiseSchedule | None = None,
    method: str = DEFAULT_SAMPLER,
    steps: int | None = DEFAULT_SAMPLE_STEPS,
    batch_size: int = 256,
) -> torch.Tensor:
    """Reverse diffusion with the empirical denoiser of ``train`` ``(N, n)``; ``(len(seeds), n)``."""
    schedule = schedule or NoiseSchedule.onehot()
    n = torch.as_tensor(train).shape[-1]
    return sample_sequences(empirical_denoise_fn(train, q, schedule), n, q, seeds, schedule, method, steps, batch_size)
