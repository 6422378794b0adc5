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


@dataclass(frozen=True)
class EpsMSEConditionalLoss:
    """Class-conditional image loss: :class:`EpsMSELoss` with ``model(x_t, t, y)``, each label replaced by
    ``null_label`` with probability ``label_dropout`` (so one network also learns the unconditional noise, as
    classifier-free guidance needs; Ho & Salimans 2022). The batch is a :class:`Labelled` of ``(B, C, H, W)``
    images with ``(B,)`` labels."""

    schedule: NoiseSchedule
    label_dropout: float
    null_label: int

    def __call__(self, model: torch.nn.Module, batch: Labelled, gen: torch.Generator) -> torch.Tensor:
        x0 = batch.x
        t = torch.randint(1, self.schedule.T, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)  # drawn on the CPU: the same on every device
        dropped = (torch.rand(len(x0), generator=gen) < self.label_dropout).to(x0.device)
        y = torch.where(dropped, torch.full_like(batch.y, self.null_label), batch.y)
        t = t.to(x0.device)
        return F.mse_loss(model(self.schedule.add_noise(x0, eps, t), t, y), eps)


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
