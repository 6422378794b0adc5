"""Encoder-only transformer that predicts x0 logits of a noised one-hot sequence (docs/method.md §1, §8).

    model = SequenceDenoiser(q=6, length=16, T=500, layers=8, width=512, heads=4, ffn=1024)  # the paper's size
    logits = model(x_t, t)          # x_t: (B, L, q) float, t: (B,) LongTensor of raw steps in 0..T
    denoise = as_denoiser(model)    # (x_t, t) -> x0 probabilities, for samplers and diagnostics

The network knows nothing of the noise schedule: it sees the noisy one-hot and
the integer step ``t``. It is trained with :class:`biasgen.losses.X0CrossEntropyLoss`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import BiasgenError


class TimeEmbedding(nn.Module):
    """Sinusoidal features of the integer step ``t`` followed by a small MLP: ``(B,) -> (B, width)``."""

    def __init__(self, width: int, T: int):
        super().__init__()
        half = width // 2
        self.register_buffer("freqs", torch.exp(-math.log(10 * T) * torch.arange(half) / max(half - 1, 1)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class SequenceDenoiser(nn.Module):
    """x0-predictor for one-hot diffusion: input projection + learned positions + time embedding, pre-norm encoder.

    ``forward(x_t (B, L, q) float, t (B,) long) -> logits (B, L, q)``; ``softmax`` of
    the logits is the predicted expected one-hot ``x0_hat``.
    """

    def __init__(self, q: int, length: int, T: int, layers: int = 2, width: int = 64, heads: int = 4, ffn: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        if min(q, length, T, layers, width, heads, ffn) < 1 or width % heads:
            raise BiasgenError(f"Transformer sizes must be positive with width divisible by heads; got width={width}, heads={heads}.")
        self.kwargs = dict(q=q, length=length, T=T, layers=layers, width=width, heads=heads, ffn=ffn, dropout=dropout)
        self.inp = nn.Linear(q, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        self.time = TimeEmbedding(width, T)
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, q)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        L, q = self.kwargs["length"], self.kwargs["q"]
        if x_t.ndim != 3 or x_t.shape[1:] != (L, q):
            raise BiasgenError(f"SequenceDenoiser expects x_t of shape (B, {L}, {q}), got {tuple(x_t.shape)}.")
        h = self.inp(x_t) + self.pos[None] + self.time(t)[:, None]
        return self.out(self.norm(self.encoder(h)))


def as_denoiser(model: nn.Module, batch_size: int = 4096):
    """Wrap a network as ``denoise(x_t (B, L, q), t (B,)) -> x0 probabilities (B, L, q)`` (no grad, eval mode, batched)."""

    @torch.no_grad()
    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model.eval()
        dev = _device(model)
        t = torch.as_tensor(t, dtype=torch.long).expand(len(x_t))
        parts = [model(x_t[i:i + batch_size].float().to(dev), t[i:i + batch_size].to(dev)).softmax(-1).cpu()
                 for i in range(0, len(x_t), batch_size)]
        return torch.cat(parts).to(x_t.dtype)

    return denoise


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
