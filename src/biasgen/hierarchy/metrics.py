"""Diagnostics of biased generalization on hierarchical data (SPEC §7), as pure functions on tensors.

A *denoiser* is any callable ``denoise(x_t (B, L, q), t (B,) long) -> x0 probabilities (B, L, q)``:
a trained network (:func:`biasgen.hierarchy.model.as_denoiser`), the exact BP_k
denoiser (:func:`biasgen.hierarchy.bp_denoise_fn`) or the empirical denoiser of a training set.
Sequences are LongTensors ``(N, L)`` with symbols in ``[0, q)``. Every
divergence is summed over positions and averaged over inputs (nats per sequence).

    x_t, t = noised_inputs(test, q, schedule, t=75, seed=0)          # frozen noise, reused at every checkpoint
    sample_split_kl(model_a, model_b, x_t, t)                       # twin disagreement: its minimum is tau_bias
    oracle_kls(grammar, model, x_t, t, schedule)                     # KL(BP_k || model) for k = 0..depth
    loss_decomposition(model, bp0, x0, x_t, t)                       # l = l* + l~
    nn_divergence(generated, test, train)                            # D_NN
    uturn_overlap(model, x0, q, [20, 60], schedule, reps=4, seed=0)  # (2, N): compare with the BP denoiser's
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import BiasgenError
from ..schedule import NoiseSchedule
from .denoisers import bp_denoise_fn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TINY = 1e-30  # floor on probabilities before the log, so a hard zero gives a large finite penalty


# -- inputs -----------------------------------------------------------------
def noised_inputs(x0: torch.Tensor, q: int, schedule: NoiseSchedule, t: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise sequences once with a fixed seed: ``(x_t (N, L, q) float64, t (N,) long)``.

    ``t=None`` draws each input's step uniformly in ``1..T-1`` (the frozen-noise test
    loss of SPEC §2); an integer ``t`` noises every input at that step.
    """
    _check_tokens(x0, q)
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, schedule.T, (len(x0),), generator=gen) if t is None else torch.full((len(x0),), int(t))
    if not bool(((steps >= 1) & (steps <= schedule.T)).all()):
        raise BiasgenError(f"Noise step t={t} is outside 1..{schedule.T}; pick t/T in (0, 1].")
    onehot = F.one_hot(x0, q).double()
    eps = torch.randn(onehot.shape, generator=gen, dtype=torch.float64)
    return schedule.add_noise(onehot, eps, steps), steps


# -- divergences between denoisers -------------------------------------------
def kl_per_input(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``KL(p || r)`` summed over positions: ``p, r`` of shape ``(B, L, q)`` -> ``(B,)`` (float64)."""
    p, r = p.double(), r.double()
    return (p * (p.clamp_min(TINY).log() - r.clamp_min(TINY).log())).sum((1, 2))


def symmetric_kl(p: torch.Tensor, r: torch.Tensor) -> float:
    """``(KL(p || r) + KL(r || p)) / 2`` per input, mean over inputs: ``p, r`` of shape ``(B, L, q)``."""
    return 0.5 * float(kl_per_input(p, r).mean() + kl_per_input(r, p).mean())


def sample_split_kl(den_a: Denoiser, den_b: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> float:
    """Twin disagreement: KL between the predicted x0 distributions of models A and B, summed over
    positions, averaged over both directions (A‖B and B‖A) and over the inputs.

    ``x_t``: ``(B, L, q)`` noised inputs (test or training), ``t``: ``(B,)``. Identical twins give 0.
    """
    return symmetric_kl(den_a(x_t, t), den_b(x_t, t))


def oracle_kls(grammar, den: Denoiser, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> list[float]:
    """``KL(BP_k || model)`` for ``k = 0..depth`` on the same inputs: sequential learning shows as large k first."""
    pred = den(x_t, t)
    return [float(kl_per_input(bp_denoise_fn(grammar, schedule, k)(x_t, t), pred).mean()) for k in range(grammar.depth + 1)]


def kl_along_t(den_p: Denoiser, den_r: Denoiser, x0: torch.Tensor, q: int, schedule: NoiseSchedule,
               steps: Sequence[int], seed: int) -> list[float]:
    """``KL(p || r)`` averaged over ``x0 (N, L)`` noised at each step in ``steps``; one value per step (SPEC §7, Fig. 3b)."""
    out = []
    for t in steps:
        x_t, tt = noised_inputs(x0, q, schedule, t, seed)
        out.append(float(kl_per_input(den_p(x_t, tt), den_r(x_t, tt)).mean()))
    return out


# -- losses -------------------------------------------------------------------
def loss_decomposition(den: Denoiser, oracle: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
    """Cross-entropy ``l = -x0 . log x0_hat`` split as ``l* + l~`` (SPEC §7), means over inputs.

    ``l* = -x0_hat_BP . log x0_hat`` (distillation of the exact denoiser ``oracle``),
    ``l~ = -(x0 - x0_hat_BP) . log x0_hat`` (data-dependent excess; 0 in expectation on
    test data). ``x0``: ``(B, L)``; ``x_t``: ``(B, L, q)`` noised from ``x0`` at ``t (B,)``.
    Returns ``{"l", "l_star", "l_tilde"}`` (nats per sequence).
    """
    logp = den(x_t, t).double().clamp_min(TINY).log()
    onehot = F.one_hot(x0, logp.shape[-1]).double()
    l = -(onehot * logp).sum((1, 2))
    l_star = -(oracle(x_t, t).double() * logp).sum((1, 2))
    return {"l": float(l.mean()), "l_star": float(l_star.mean()), "l_tilde": float((l - l_star).mean())}


# -- generated sequences ------------------------------------------------------
def nearest_hamming(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Hamming distance of each row of ``x (N, L)`` to its nearest row of ``ref (M, L)``: ``(N,)`` long."""
    if x.shape[1:] != ref.shape[1:] or len(ref) == 0:
        raise BiasgenError(f"nearest_hamming needs sequences of equal length and a non-empty reference; got {tuple(x.shape)} vs {tuple(ref.shape)}.")
    out = [(x[i:i + chunk, None, :] != ref[None]).sum(-1).min(1).values for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def nn_histogram(dist: torch.Tensor, length: int) -> torch.Tensor:
    """Normalised histogram of Hamming distances over ``0..length``: ``(length + 1,)`` float64."""
    return torch.bincount(dist, minlength=length + 1).double() / max(len(dist), 1)


def nn_divergence(generated: torch.Tensor, test: torch.Tensor, train: torch.Tensor, pseudo: float = 0.5) -> float:
    """``D_NN = KL(P_gen || P_test)`` of nearest-training-sequence Hamming histograms (SPEC §7).

    ``generated (N, L)``, ``test (M, L)``, ``train (n, L)``. Both histograms get ``pseudo``
    counts per bin (additive smoothing) so an empty test bin gives a finite value.
    """
    L = train.shape[1]
    counts = [torch.bincount(nearest_hamming(x, train), minlength=L + 1).double() + pseudo for x in (generated, test)]
    p, r = (c / c.sum() for c in counts)
    return float((p * (p.log() - r.log())).sum())


# -- U-turns --------------------------------------------------------------------
@torch.no_grad()
def uturn_overlap(den: Denoiser, x0: torch.Tensor, q: int, steps: Sequence[int], schedule: NoiseSchedule, reps: int,
                  seed: int) -> torch.Tensor:
    """U-turns: noise ``x0 (N, L)`` to each step ``t`` in ``steps``, run DDPM ancestral steps ``t..1`` with
    ``den`` and take the argmax. Returns the overlap (fraction of positions equal to the original symbol)
    per depth and sequence, averaged over ``reps`` repetitions: ``(len(steps), N)`` float64.

    All depths and repetitions run as one batch (a row joins the reverse chain at its own ``t``), and
    every draw depends only on ``seed`` and the batch layout, so two denoisers given the same
    arguments see exactly the same forward and reverse noise.
    """
    _check_tokens(x0, q)
    n, starts = len(x0), torch.as_tensor(list(steps), dtype=torch.long)
    if not bool(((starts >= 1) & (starts <= schedule.T)).all()):
        raise BiasgenError(f"U-turn steps must lie in 1..{schedule.T}, got {starts.tolist()}.")
    rows = x0.repeat(len(starts) * reps, 1)  # (depth, rep, seq) flattened
    start = starts.repeat_interleave(reps * n)
    gen = torch.Generator().manual_seed(seed)
    onehot = F.one_hot(rows, q).double()
    x = schedule.add_noise(onehot, torch.randn(onehot.shape, generator=gen, dtype=torch.float64), start)
    for s in range(int(starts.max()), 0, -1):
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        active = start >= s
        x0_hat = den(x[active].float(), torch.full((int(active.sum()),), s, dtype=torch.long)).double()
        x[active] = schedule.ddpm_step(x[active], x0_hat, s, noise[active])
    overlap = (x.argmax(-1) == rows).double().mean(-1)
    return overlap.reshape(len(starts), reps, n).mean(1)


def _check_tokens(x0: torch.Tensor, q: int) -> None:
    if x0.dtype != torch.long or x0.ndim != 2:
        raise BiasgenError(f"Sequences must be a LongTensor (N, L); got {x0.dtype} of shape {tuple(x0.shape)}.")
    if len(x0) and (int(x0.min()) < 0 or int(x0.max()) >= q):
        raise BiasgenError(f"Sequence symbols must lie in [0, {q}); got values in [{int(x0.min())}, {int(x0.max())}].")
