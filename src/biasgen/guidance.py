"""Classifier-free guidance (Ho & Salimans 2022) for any eps-predicting network that takes class labels.

One network trained with the label dropped now and then (the "null" label)
predicts both the conditional noise ``eps_c = model(x_t, t, y)`` and the
unconditional one ``eps_u = model(x_t, t, null)``. Guidance at scale ``w`` uses

    eps_w = eps_u + w (eps_c - eps_u)

so ``w = 0`` is unconditional sampling, ``w = 1`` conditional sampling and
``w > 1`` pushes further along the class direction. With ``start`` (the delayed
variant) the scale ``w > 1`` applies only at diffusion steps ``t <= start``;
earlier, at higher noise, the sample is drawn conditionally (``w = 1``).

    eps = guided_eps(model, scale=3.0, null_label=10)    # eps(x_t, t, y) -> (B, C, H, W)
    x = sample(x0_from_eps_model(eps, schedule), schedule, shape, seeds, labels=y)

Pure tensor code: ``model`` is any callable ``(x_t (B, ...), t (B,), y (B,)) -> eps (B, ...)``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import BiasgenError

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_scales(scales: Sequence[float]) -> None:
    """Raise :class:`BiasgenError` unless every guidance scale is a finite number >= 0."""
    bad = [w for w in scales if not (w >= 0 and w < float("inf"))]
    if bad:
        raise BiasgenError(f"Guidance scales must be finite and >= 0 (0: unconditional, 1: conditional, >1: guided), "
                           f"got {', '.join(f'{w:g}' for w in bad)}; e.g. --guidance 0,1,3.")


def guided_eps(model: EpsModel, scale: float, null_label: int, start: int | None = None) -> EpsModel:
    """``eps(x_t, t, y)``: the guided noise prediction ``eps_u + w (eps_c - eps_u)`` of ``model`` at scale ``scale``.

    ``null_label``: the label that means "no label" (``num_classes`` of biasgen's U-Net); ``start``: apply a
    scale above 1 only at steps ``t <= start`` (None: at every step). At ``w = 0`` only ``eps_u`` is computed and
    at ``w = 1`` only ``eps_c``, so those equal plain unconditional and conditional sampling bit for bit; at other
    scales each is computed by its own call on the batch (not one call on both), so a network whose two predictions
    agree samples the same at every ``w``, bit for bit.
    """
    check_scales([scale])

    def eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(y, null_label)
        w = torch.full(t.shape, float(scale), device=x.device)
        if start is not None and scale > 1:
            w = torch.where(t <= start, w, torch.ones_like(w))
        if bool((w == 0).all()):
            return model(x, t, null)
        if bool((w == 1).all()):
            return model(x, t, y)
        eps_c, eps_u = model(x, t, y), model(x, t, null)  # two calls: each as the plain samplers compute it
        return eps_u + w.view(-1, *[1] * (x.ndim - 1)) * (eps_c - eps_u)

    return eps
