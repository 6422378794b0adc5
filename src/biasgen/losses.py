"""Training losses: small callables ``loss(model, x0_batch, generator) -> scalar`` (docs/method.md §1)."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Labelled:
    """Examples ``x`` ``(N, ...)`` with one class label each, ``y`` ``(N,)`` long: indexes and moves like a tensor,
    so the training loop draws batches of it as of a plain training set."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index) -> "Labelled":
        return Labelled(self.x[index], self.y[index])

    def to(self, device) -> "Labelled":
        return Labelled(self.x.to(device), self.y.to(device))


def eps_mse_conditional_loss(schedule: NoiseSchedule, label_dropout: float, null_label: int):
    """Class-conditional image loss: :func:`eps_mse_loss` with ``model(x_t, t, y)``, each label replaced by
    ``null_label`` with probability ``label_dropout`` (so one network also learns the unconditional noise, as
    classifier-free guidance needs). The batch is a :class:`Labelled` of ``(B, C, H, W)`` images."""

    def loss(model: torch.nn.Module, batch: Labelled, gen: torch.Generator) -> torch.Tensor:
        x0 = batch.x
        t = torch.randint(1, schedule.T, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        dropped = (torch.rand(len(x0), generator=gen) < label_dropout).to(x0.device)
        y = torch.where(dropped, torch.full_like(batch.y, null_label), batch.y)
        t = t.to(x0.device)
        return F.mse_loss(model(schedule.add_noise(x0, eps, t), t, y), eps)

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
