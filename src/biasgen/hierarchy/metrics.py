"""Diagnostics of biased generalization on hierarchical data (docs/method.md §7), as pure functions on tensors.

A *denoiser* is any callable ``denoise(x_t (B, L, q), t (B,) long) -> x0 probabilities (B, L, q)``:
a trained network (:func:`biasgen.hierarchy.model.as_denoiser`), the exact BP_k
denoiser (:func:`biasgen.hierarchy.bp_denoise_fn`) or the empirical denoiser of a training set.
Sequences are LongTensors ``(N, L)`` with symbols in ``[0, q)``. Every
divergence is summed over positions and averaged over inputs (nats per sequence).

    x_t, t = noised_inputs(test, q, schedule, t=75, seed=0)          # frozen noise, reused at every checkpoint
    sample_split_kl(model_a, model_b, x_t, t)                       # twin disagreement: its minimum is tau_bias
    bp = bp_predictions(grammar, schedule, x_t, t)                   # BP_0..BP_depth once per run: (depth + 1, N, L, q)
    oracle_kl(bp, model(x_t, t))                                     # KL(BP_k || model) for k = 0..depth, per checkpoint
    loss_terms(model(x_t, t), bp[0], test)                           # l = l* + l~ (at one t: the paper's Fig. 4b)
    nn_histograms(generated, test, train)                            # D_NN histograms (Fig. 4a); nn_divergence: D_NN
    near_copies(generated, train)                                    # (N,) bool: d1/d2 < 1/3 in Hamming distance
    uturn_overlap(model, x0, q, [20, 60], schedule, reps=4, seed=0)  # (2, N): compare with the BP denoiser's
    uturn_ratio(model_overlap, bp_overlap)                           # model/BP per step, mean ± SEM over sequences
    uturn_random({"model": model, "bp_0": bp0}, 100, L, q, [25, 50], schedule, reps=4, seed=0)
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

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
    loss of docs/method.md §2); an integer ``t`` noises every input at that step.
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


def bp_predictions(grammar, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                   levels: int | None = None) -> torch.Tensor:
    """The exact denoisers BP_0..BP_{K-1} on fixed inputs: ``(K, B, L, q)`` float64.

    ``x_t``: ``(B, L, q)`` and ``t``: ``(B,)``, e.g. from :func:`noised_inputs`; ``levels`` = K
    (default ``depth + 1``: every k; 1: BP_0 alone). Compute them once per run on frozen inputs,
    then compare every checkpoint with :func:`oracle_kl`, :func:`oracle_kl_along_t` or
    :func:`loss_terms` without running BP again.
    """
    levels = grammar.depth + 1 if levels is None else levels
    if not 1 <= levels <= grammar.depth + 1:
        raise BiasgenError(f"levels must lie in 1..{grammar.depth + 1} (BP_0..BP_depth), got {levels}.")
    return torch.stack([bp_denoise_fn(grammar, schedule, k)(x_t, t).double() for k in range(levels)])


def oracle_kl(bp_preds: torch.Tensor, pred: torch.Tensor) -> list[float]:
    """``KL(BP_k || model)`` for every k, from precomputed predictions on the same inputs.

    ``bp_preds``: ``(K, B, L, q)`` from :func:`bp_predictions`; ``pred``: ``(B, L, q)`` the model's.
    Returns ``K`` floats (nats per sequence, mean over inputs). Along training at t/T = 0.15
    (the paper's Figs. 1b and 6), sequential learning shows as the model approaching large k
    (coarse) before k = 0 (exact).
    """
    if bp_preds.ndim != 4 or bp_preds.shape[1:] != pred.shape:
        raise BiasgenError(f"BP predictions (K, B, L, q) {tuple(bp_preds.shape)} do not match the model's "
                           f"{tuple(pred.shape)}; compute both on the same inputs.")
    return [float(kl_per_input(bp, pred).mean()) for bp in bp_preds]


def oracle_kl_along_t(bp_preds: Sequence[torch.Tensor], preds: Sequence[torch.Tensor]) -> list[list[float]]:
    """``KL(BP_k || model)`` for every k along the diffusion time: the paper's Fig. 3b in full.

    ``bp_preds[i]``: ``(K, B, L, q)`` BP_0..BP_{K-1} on the inputs noised at the i-th step
    (:func:`bp_predictions`, once per run); ``preds[i]``: ``(B, L, q)`` the model on the same
    inputs. Works alike on test inputs and on training inputs. Returns ``K`` lists (one per k)
    of ``len(preds)`` floats.
    """
    if len(bp_preds) != len(preds) or not preds:
        raise BiasgenError(f"Got BP predictions at {len(bp_preds)} steps and model predictions at {len(preds)}; "
                           "pass one of each per step (at least one).")
    per_step = [oracle_kl(bp, p) for bp, p in zip(bp_preds, preds)]
    return [list(row) for row in zip(*per_step)]


# -- losses -------------------------------------------------------------------
def loss_terms(pred: torch.Tensor, oracle_pred: torch.Tensor, x0: torch.Tensor) -> dict:
    """Cross-entropy ``l = -x0 . log x0_hat`` split as ``l* + l~`` (the paper's Eq. 4), from predictions; means over inputs.

    ``l* = -x0_hat_BP . log x0_hat`` (distillation of the exact denoiser), ``l~ = -(x0 - x0_hat_BP) . log x0_hat``
    (data-dependent excess: 0 in expectation on test data, negative on training data once
    the model favours its own training sequences). ``pred``, ``oracle_pred``: ``(B, L, q)`` the
    model's and BP_0's predictions on inputs noised from ``x0 (B, L)``. Inputs noised at one
    step (``noised_inputs(..., t=round(0.3 * T))``) give the paper's Fig. 4b; random steps the
    t-average. Returns ``{"l", "l_star", "l_tilde"}`` (nats per sequence).
    """
    if pred.shape != oracle_pred.shape or pred.shape[:2] != x0.shape:
        raise BiasgenError(f"loss_terms needs predictions (B, L, q) of equal shape and x0 (B, L); got "
                           f"{tuple(pred.shape)}, {tuple(oracle_pred.shape)} and {tuple(x0.shape)}.")
    logp = pred.double().clamp_min(TINY).log()
    l = -(F.one_hot(x0, logp.shape[-1]).double() * logp).sum((1, 2))
    l_star = -(oracle_pred.double() * logp).sum((1, 2))
    return {"l": float(l.mean()), "l_star": float(l_star.mean()), "l_tilde": float((l - l_star).mean())}


# -- generated sequences ------------------------------------------------------
def _smallest_hamming(x: torch.Tensor, ref: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """The ``k`` smallest Hamming distances of each row of ``x (N, L)`` to the rows of ``ref (M, L)``: ``(N, k)`` long, sorted."""
    if x.shape[1:] != ref.shape[1:] or len(ref) < k:
        raise BiasgenError(f"Hamming distances need sequences of equal length and at least {k} reference sequence(s); "
                           f"got {tuple(x.shape)} vs {tuple(ref.shape)}.")
    out = [(x[i:i + chunk, None, :] != ref[None]).sum(-1).topk(k, dim=1, largest=False).values
           for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def nearest_hamming(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Hamming distance of each row of ``x (N, L)`` to its nearest row of ``ref (M, L)``: ``(N,)`` long."""
    return _smallest_hamming(x, ref, 1, chunk)[:, 0]


NEAR_COPY_RATIO = 1 / 3  # the image rule d1/d2 < 1/3 (docs/method.md §3), here on Hamming distances


def nearest_two_hamming(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Hamming distances ``(d1, d2)`` of each row of ``x (N, L)`` to its nearest and second-nearest *distinct*
    sequence of ``ref (M, L)`` (a sequence repeated in ``ref`` counts once): ``(N, 2)`` long, ``d1 <= d2``."""
    distinct = torch.unique(ref, dim=0)
    if len(distinct) < 2:
        raise BiasgenError(f"A near-copy needs a second-nearest training sequence, but the reference holds "
                           f"{len(distinct)} distinct sequence(s); use a larger training split.")
    return _smallest_hamming(x, distinct, 2)


def near_copies(x: torch.Tensor, ref: torch.Tensor, ratio: float = NEAR_COPY_RATIO) -> torch.Tensor:
    """Which rows of ``x (N, L)`` are near-copies of a sequence of ``ref (M, L)``: BoolTensor ``(N,)``.

    A sequence is a near-copy when its Hamming distance ``d1`` to the nearest distinct sequence
    of ``ref`` is less than ``ratio`` times its distance ``d2`` to the second-nearest: the image
    memorization rule d1/d2 < 1/3 (docs/method.md §7) on sequences. With integer distances and
    ``ratio = 1/3``: every exact copy (``d1 = 0``), one symbol off when ``d2 >= 4``, two when
    ``d2 >= 7``, ``k`` when ``d2 >= 3k + 1``.
    """
    return is_near_copy(nearest_two_hamming(x, ref), ratio)


def is_near_copy(d: torch.Tensor, ratio: float = NEAR_COPY_RATIO) -> torch.Tensor:
    """``d1 / d2 < ratio`` for the distances ``d (N, 2)`` of :func:`nearest_two_hamming`: BoolTensor ``(N,)``."""
    d = d.double()
    return d[:, 0] / d[:, 1] < ratio  # d2 >= 1 (distinct sequences), so the ratio is finite


def nn_histogram(dist: torch.Tensor, length: int) -> torch.Tensor:
    """Normalised histogram of Hamming distances over ``0..length``: ``(length + 1,)`` float64."""
    return torch.bincount(dist, minlength=length + 1).double() / max(len(dist), 1)


def nn_histograms(generated: torch.Tensor, test: torch.Tensor, train: torch.Tensor) -> dict:
    """The two histograms behind D_NN (the paper's Fig. 4a; appendix Figs. 9 and 10, left).

    Normalised histograms over Hamming distances ``0..L`` of each generated sequence
    (``(N, L)``) and each test sequence (``(M, L)``) to its nearest training sequence
    (``(n, L)``). Returns JSON-ready lists ``{"distance", "generated", "test"}`` of length ``L + 1``.
    """
    L = train.shape[1]
    hists = {name: nn_histogram(nearest_hamming(x, train), L).tolist() for name, x in (("generated", generated), ("test", test))}
    return {"distance": list(range(L + 1)), **hists}


def nn_divergence(generated: torch.Tensor, test: torch.Tensor, train: torch.Tensor, pseudo: float = 0.5) -> float:
    """``D_NN = KL(P_gen || P_test)`` of nearest-training-sequence Hamming histograms (docs/method.md §7).

    ``generated (N, L)``, ``test (M, L)``, ``train (n, L)``. Both histograms get ``pseudo``
    counts per bin (additive smoothing) so an empty test bin gives a finite value.
    """
    return distance_divergence(nearest_hamming(generated, train), nearest_hamming(test, train), train.shape[1], pseudo)


def distance_divergence(gen_dist: torch.Tensor, test_dist: torch.Tensor, length: int, pseudo: float = 0.5) -> float:
    """:func:`nn_divergence` from the nearest-training-sequence distances ``(N,)`` and ``(M,)`` already computed
    (sequences of ``length`` symbols), so a fixed test set's distances are computed once."""
    counts = [torch.bincount(d, minlength=length + 1).double() + pseudo for d in (gen_dist, test_dist)]
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


def uturn_ratio(model_overlap: torch.Tensor, bp_overlap: torch.Tensor) -> dict:
    """Model/BP U-turn overlap ratio per step, mean ± SEM over sequences (the paper's Fig. 5).

    ``model_overlap``, ``bp_overlap``: ``(S, N)`` from :func:`uturn_overlap` on the same sequences
    and seed (S steps, N sequences, each already averaged over repetitions). The ratio of
    each sequence, ``model_i / bp_i``, is averaged over the sequences whose BP overlap is
    positive (``n`` of them). Returns JSON-ready lists of length ``S``: ``mean``, ``sem``
    (``std / sqrt(n)``; None when ``n < 2``) and ``n``.
    """
    if model_overlap.shape != bp_overlap.shape or model_overlap.ndim != 2:
        raise BiasgenError(f"U-turn overlaps must both be (steps, sequences); got {tuple(model_overlap.shape)} "
                           f"and {tuple(bp_overlap.shape)}.")
    out: dict = {"mean": [], "sem": [], "n": []}
    for m, b in zip(model_overlap.double(), bp_overlap.double()):
        r = m[b > 0] / b[b > 0]
        out["mean"].append(float(r.mean()) if len(r) else None)
        out["sem"].append(float(r.std()) / math.sqrt(len(r)) if len(r) >= 2 else None)
        out["n"].append(int(len(r)))
    return out


def uniform_sequences(n: int, length: int, q: int, seed: int) -> torch.Tensor:
    """``n`` sequences of independent uniform symbols: LongTensor ``(n, length)`` in ``[0, q)``, fixed by ``seed``."""
    return torch.randint(0, q, (n, length), generator=torch.Generator().manual_seed(seed))


def uturn_random(dens: Mapping[str, Denoiser], n: int, length: int, q: int, steps: Sequence[int],
                 schedule: NoiseSchedule, reps: int, seed: int) -> dict:
    """U-turns of uniformly random (out-of-distribution) sequences (the paper's appendix, Fig. 11).

    ``n`` sequences of :func:`uniform_sequences` (seeded by ``seed``) go through
    :func:`uturn_overlap` (noise seeded by ``seed + 1``) with every denoiser of ``dens`` (e.g.
    the model, the empirical denoiser, BP_0..BP_depth); every denoiser sees the same sequences
    and the same noise, so BP and the empirical denoiser can be run once per run and the model
    per checkpoint with the same arguments. Returns ``{name: {"mean": [S], "sem": [S]}}``:
    overlap per step, mean and SEM over the ``n`` sequences (each averaged over ``reps`` U-turns).
    """
    if n < 2:
        raise BiasgenError(f"uturn_random needs at least 2 sequences for a standard error, got n={n}.")
    x0 = uniform_sequences(n, length, q, seed)
    out = {}
    for name, den in dens.items():
        overlap = uturn_overlap(den, x0, q, steps, schedule, reps, seed + 1)  # (S, n)
        out[name] = {"mean": overlap.mean(1).tolist(), "sem": (overlap.std(1) / math.sqrt(n)).tolist()}
    return out


def _check_tokens(x0: torch.Tensor, q: int) -> None:
    if x0.dtype != torch.long or x0.ndim != 2:
        raise BiasgenError(f"Sequences must be a LongTensor (N, L); got {x0.dtype} of shape {tuple(x0.shape)}.")
    if len(x0) and (int(x0.min()) < 0 or int(x0.max()) >= q):
        raise BiasgenError(f"Sequence symbols must lie in [0, {q}); got values in [{int(x0.min())}, {int(x0.max())}].")
