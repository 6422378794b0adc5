"""Training losses: picklable callables ``loss(model, x0_batch, generator) -> scalar`` (docs/method.md §1).

A loss is a small frozen dataclass holding what it needs (the noise schedule, the alphabet size), so the
pipeline sends it to worker processes or Ray tasks as it is: ``TwinExperiment.loss()`` returns one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule


@dataclass(frozen=True)
class EpsMSELoss:
    """Image loss: ``t`` uniform in ``{1..T-1}``, ``MSE(eps, model(x_t, t))``; ``x0``: ``(B, C, H, W)``."""

    schedule: NoiseSchedule

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(1, self.schedule.T, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)  # drawn on the CPU: the same on every device
        t = t.to(x0.device)
        return F.mse_loss(model(self.schedule.add_noise(x0, eps, t), t), eps)


@dataclass(frozen=True)
class X0CrossEntropyLoss:
    """One-hot sequence loss: ``t`` uniform in ``{1..T-1}``, cross-entropy of ``model(x_t, t)`` logits against the tokens.

    ``x0``: LongTensor ``(B, L)`` of symbols in ``[0, q)``; the model maps ``(B, L, q)`` to logits ``(B, L, q)``.
    """

    schedule: NoiseSchedule
    q: int

    def __call__(self, model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(1, self.schedule.T, (len(x0),), generator=gen).to(x0.device)
        onehot = F.one_hot(x0, self.q).float()
        eps = torch.randn(onehot.shape, generator=gen).to(x0.device)
        logits = model(self.schedule.add_noise(onehot, eps, t), t)
        return F.cross_entropy(logits.reshape(-1, self.q), x0.reshape(-1))
