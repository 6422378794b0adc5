"""Reverse-diffusion samplers with per-sample shared noise (docs/method.md §1–§2).

Sample ``j`` draws its starting point ``x_T`` and every step's noise from its
own generator seeded with ``seeds[j]``. Two models sampled with the same seeds
therefore see exactly the same noise, whatever the batch size, the device, or
how many other samples are drawn.

The sampler knows nothing of the network: it takes an ``x0``-predictor
``denoise(x_t, t) -> x0_hat`` with ``x_t`` of shape ``(B, *shape)`` and ``t`` a
LongTensor ``(B,)``. :func:`x0_from_eps_model` wraps an eps-predicting network.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import BiasgenError
from .runs import progress_bar
from .schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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
    """Turn ``model(x_t, t) -> eps_hat`` into ``denoise(x_t, t) -> x0_hat`` (Tweedie), optionally clipped to ``[-clip, clip]``."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = schedule.x0_from_eps(x_t, model(x_t, t), t)
        return x0.clamp(-clip, clip) if clip is not None else x0

    return denoise


def timesteps(schedule: NoiseSchedule, method: str, steps: int | None) -> list[int]:
    """Descending integer steps visited by the sampler (``T..1`` for DDPM; ``steps`` evenly spaced for DDIM)."""
    if method == "ddpm":
        if steps not in (None, schedule.T):
            raise BiasgenError("The DDPM ancestral sampler always uses all T steps; use method='ddim' for fewer.")
        return list(range(schedule.T, 0, -1))
    if method == "ddim":
        n = steps or schedule.T
        if not 1 <= n <= schedule.T:
            raise BiasgenError(f"DDIM steps must be in [1, {schedule.T}], got {n}.")
        ts = torch.linspace(schedule.T, 1, n).round().long().unique(sorted=True).flip(0)
        return [int(t) for t in ts]
    raise BiasgenError(f"Unknown sampler {method!r}; choose 'ddpm' (ancestral) or 'ddim' (deterministic).")


@torch.no_grad()
def sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    shape: Sequence[int],
    seeds: Sequence[int],
    method: str = "ddpm",
    steps: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``len(seeds)`` samples of per-sample shape ``shape``; returns ``(N, *shape)`` float32 on CPU.

    ``method='ddpm'`` is ancestral sampling with the DDPM posterior (no noise on
    the last step); ``'ddim'`` is deterministic (eta = 0) with ``steps`` steps.
    Only ``x_T`` is random for DDIM, still drawn from each sample's own stream.
    """
    ts = timesteps(schedule, method, steps)
    out = []
    chunks = range(0, len(seeds), batch_size)
    chunks = progress_bar(chunks, progress, f"sampling ({method})")
    for start in chunks:
        batch_seeds = seeds[start : start + batch_size]
        streams = NoiseStreams(batch_seeds, shape)
        x = streams.draw().to(device)
        for i, t in enumerate(ts):
            t_vec = torch.full((len(batch_seeds),), t, dtype=torch.long, device=device)
            x0_hat = denoise(x, t_vec)
            if method == "ddpm":
                x = schedule.ddpm_step(x, x0_hat, t, streams.draw().to(device))
            else:
                t_prev = ts[i + 1] if i + 1 < len(ts) else 0
                x = schedule.ddim_step(x, x0_hat, t, t_prev)
        out.append(x.float().cpu())
    return torch.cat(out)
