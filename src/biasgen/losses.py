"""Training losses: small callables ``loss(model, x0_batch, generator) -> scalar`` (docs/method.md §1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule


def eps_mse_loss(schedule: NoiseSchedule):
    """Image loss: ``t`` uniform in ``{1..T-1}``, ``MSE(eps, model(x_t, t))``; ``x0``: ``(B, C, H, W)``."""

    def loss(model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(1, schedule.T, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)  # drawn on the CPU: the same on every device
        t = t.to(x0.device)
        return F.mse_loss(model(schedule.add_noise(x0, eps, t), t), eps)

    return loss


def x0_cross_entropy_loss(schedule: NoiseSchedule, q: int):
    """One-hot sequence loss: ``t`` uniform in ``{1..T-1}``, cross-entropy of ``model(x_t, t)`` logits against the tokens.

    ``x0``: LongTensor ``(B, L)`` of symbols in ``[0, q)``; the model maps ``(B, L, q)`` to logits ``(B, L, q)``.
    """

    def loss(model: torch.nn.Module, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(1, schedule.T, (len(x0),), generator=gen).to(x0.device)
        onehot = F.one_hot(x0, q).float()
        eps = torch.randn(onehot.shape, generator=gen).to(x0.device)
        logits = model(schedule.add_noise(onehot, eps, t), t)
        return F.cross_entropy(logits.reshape(-1, q), x0.reshape(-1))

    return loss
