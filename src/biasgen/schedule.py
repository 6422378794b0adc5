"""Discrete-time DDPM noise schedules and the identities between parameterisations.

Pure tensor math, separate from any model (docs/method.md §1). Time steps are integers
``t`` in ``1..T``; index 0 of ``alpha_bar`` is the clean data (``alpha_bar[0] = 1``).

    schedule = NoiseSchedule.linear()            # images: T=1000, betas 1e-4..0.02
    schedule = NoiseSchedule.onehot()            # sequences: T=500, betas 2e-4..0.04
    x_t = schedule.add_noise(x0, eps, t)         # forward process q(x_t | x_0)
    x0_hat = schedule.x0_from_eps(x_t, eps_hat, t)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BiasgenError


@dataclass(frozen=True)
class NoiseSchedule:
    """A variance schedule ``beta_1..beta_T`` (float64 tensor of shape ``(T,)``)."""

    betas: torch.Tensor
    name: str = "custom"

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or len(b) < 2:
            raise BiasgenError("NoiseSchedule needs a 1-D tensor of at least 2 betas.")
        if not bool(((b > 0) & (b < 1)).all()):
            raise BiasgenError("NoiseSchedule betas must lie in (0, 1).")
        object.__setattr__(self, "betas", b.to(torch.float64))
        abar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - self.betas, 0)])
        object.__setattr__(self, "alpha_bar", abar)

    # -- constructors -----------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """Linear betas (Ho et al. 2020); the image default of docs/method.md §1."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64), name=f"linear(T={T})")

    @classmethod
    def onehot(cls, T: int = 500) -> "NoiseSchedule":
        """Linear betas rescaled by 1000/T: the one-hot sequence default of docs/method.md §1 (2e-4..0.04 at T=500)."""
        s = 1000.0 / T
        return cls(torch.linspace(1e-4 * s, 0.02 * s, T, dtype=torch.float64), name=f"onehot-linear(T={T})")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        """Cosine alpha-bar (Nichol & Dhariwal 2021), betas clipped at 0.999."""
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(1e-8, 0.999)
        return cls(betas, name=f"cosine(T={T})")

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        """``'linear'``, ``'cosine'`` or ``'onehot'`` with ``T`` steps."""
        makers = {"linear": cls.linear, "cosine": cls.cosine, "onehot": cls.onehot}
        if name not in makers:
            raise BiasgenError(f"Unknown noise schedule {name!r}; choose one of {sorted(makers)}.")
        return makers[name](T=T)

    # -- basic quantities -------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.betas)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha_bar_t`` for integer steps ``t`` (any shape), cast to ``like``'s dtype/device."""
        a = self.alpha_bar[torch.as_tensor(t, dtype=torch.long)]
        if like is not None:
            a = a.to(dtype=like.dtype, device=like.device)
        return a

    def _bcast(self, t, x: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` shaped ``(B, 1, ..., 1)`` to broadcast against ``x`` of shape ``(B, ...)``."""
        a = self.abar(torch.as_tensor(t).to("cpu"), like=x)
        if a.ndim == 0:
            return a
        return a.reshape(-1, *([1] * (x.ndim - 1)))

    # -- forward process and Tweedie identities ---------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. ``x0, eps``: ``(B, ...)``; ``t``: ``(B,)`` or int."""
        a = self._bcast(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Tweedie: ``x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``."""
        a = self._bcast(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """Inverse of :meth:`x0_from_eps`: ``eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar)``."""
        a = self._bcast(t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def score_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """Score ``grad log p_t(x_t) = (sqrt(abar) x0_hat - x_t) / (1 - abar)``."""
        a = self._bcast(t, x_t)
        return (a.sqrt() * x0 - x_t) / (1 - a)

    # -- reverse process --------------------------------------------------
    def posterior_mean_var(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, t_prev: int | None = None):
        """Mean ``(B, ...)`` and variance (float) of the DDPM posterior ``q(x_s | x_t, x0_hat)``.

        ``s = t_prev`` (default ``t - 1``) with ``0 <= s < t``. Between non-adjacent steps the forward
        process from ``s`` to ``t`` keeps the signal ``alpha = abar_t / abar_s`` and adds the noise
        ``1 - alpha``; for ``s = t - 1`` this is the usual ``beta_t``.
        """
        s = t - 1 if t_prev is None else t_prev
        if not 0 <= s < t <= self.T:
            raise BiasgenError(f"The posterior needs steps 0 <= t_prev < t <= {self.T}, got t={t}, t_prev={s}.")
        a_t, a_s = float(self.alpha_bar[t]), float(self.alpha_bar[s])
        alpha = a_t / a_s
        mean = (math.sqrt(a_s) * (1 - alpha) / (1 - a_t)) * x0_hat + (math.sqrt(alpha) * (1 - a_s) / (1 - a_t)) * x_t
        var = (1 - alpha) * (1 - a_s) / (1 - a_t)
        return mean, var

    def ddpm_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, noise: torch.Tensor,
                  t_prev: int | None = None) -> torch.Tensor:
        """One ancestral step ``x_t -> x_s`` (``s = t_prev``, default ``t - 1``): a draw of the DDPM posterior.

        No noise is added on the last step (``s == 0``), which returns the posterior mean.
        """
        mean, var = self.posterior_mean_var(x_t, x0_hat, t, t_prev)
        return mean if (t - 1 if t_prev is None else t_prev) == 0 else mean + math.sqrt(var) * noise

    def ddim_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM step from step ``t`` to ``t_prev < t`` (Song et al. 2021, Eq. 12); ``t_prev = 0`` returns ``x0_hat``.

        ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma noise`` with
        ``sigma = eta * sqrt(var)``, ``var`` the DDPM posterior variance between ``t`` and ``s``: eta = 0
        is deterministic and eta = 1 is a draw of the DDPM posterior (:meth:`ddpm_step`). ``noise``
        (shaped like ``x_t``) is required when ``eta > 0``.
        """
        if not 0 <= eta <= 1:
            raise BiasgenError(f"DDIM eta must lie in [0, 1], got {eta}.")
        a_t, a_s = float(self.alpha_bar[t]), float(self.alpha_bar[t_prev])
        eps = (x_t - math.sqrt(a_t) * x0_hat) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_t / a_s) * (1 - a_s) / (1 - a_t))
        x = math.sqrt(a_s) * x0_hat + math.sqrt(max(0.0, 1 - a_s - sigma**2)) * eps
        if sigma == 0:
            return x
        if noise is None:
            raise BiasgenError("A DDIM step with eta > 0 needs a noise tensor shaped like x_t.")
        return x + sigma * noise
