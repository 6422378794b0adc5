"""Exact inference on the hierarchical model: batched belief propagation (docs/method.md §6).

A Gaussian-noised one-hot leaf ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``
carries the evidence ``log psi(a) = sqrt(abar) / (1 - abar) * x_t[a]`` (up to a
constant). One upward pass from the leaves to level ``k``, a star through the
root (the ``2**k`` factors ``P(node_j | root)``; for ``k = 0`` it is the root
itself), and one downward pass give the exact leaf marginals ``E[x0 | x_t]``
of the k-filtered model.

How it is fast and exact:

- Messages are log-vectors shifted to max 0 after every update, laid out
  ``(q, nodes, batch)`` so every operation runs along the contiguous batch axis,
  on all nodes of a level at once, in cache-sized chunks of the batch.
- An update exponentiates its (max-0) inputs and contracts them with ``M`` by a
  matrix product: ``q**2`` work per node instead of the ``(q, q, q)`` joint.
- Computation is in float64. The only possible error of that fast path is
  underflow, which can matter only when the evidence conflicts with the grammar
  by hundreds of nats. Every update reports how small its result was; a batch
  row where some update fell below a floor chosen so that underflow cannot
  reach 1e-16 is recomputed with exact logsumexp over the joint. So the answer is
  always the exact one, and the slow path is taken only in such conflicts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import BiasgenError
from ..jobs import torch_threads
from ..schedule import NoiseSchedule


CHUNK = 1024  # batch rows per pass: keeps every intermediate in cache




@dataclass(frozen=True)
class _Tables:
    """Float64 constants of one (grammar, k)."""

    M_up: torch.Tensor  # (q, q*q): M[a, (b, c)]
    M_down: torch.Tensor  # (q*q, q): its transpose
    log_M: torch.Tensor  # (q, q, q, 1, 1): log M for the exact path
    log_top: torch.Tensor  # (q, q, 2**k, 1): log P(level-k node j = a | root = r) at [r, a, j]
    log_floor: float  # updates whose max (log, relative to max-0 inputs) falls below this are redone exactly


@lru_cache(maxsize=64)
def _tables(g, k: int) -> _Tables:
    q = g.q
    M_up = g.M.reshape(q, q * q)
    log_top = g.level_transitions(k).log().permute(1, 2, 0)[..., None]
    # underflow error <= 36 * tiny * (2 / floor) ** stages; this floor keeps it below ~1e-17
    log_floor = (math.log(torch.finfo(torch.float64).tiny) + 60) / (2 * g.depth + 4)
    return _Tables(M_up, M_up.T.contiguous(), g.M.log()[..., None, None], log_top, log_floor)


def _normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift log-messages ``(q, ...)`` to max 0 over symbols; returns them and the max ``(...)``.

    A message that is ``-inf`` everywhere (an impossible event) is left as is.
    """
    m = x.amax(0)
    return x - m.masked_fill(m == -math.inf, 0.0), m


def _up(tab: _Tables, left: torch.Tensor, right: torch.Tensor, exact: bool) -> torch.Tensor:
    """``log sum_{b,c} M[a, b, c] exp(left[b] + right[c])``; messages ``(q, m, B)`` with max 0."""
    if exact:
        return torch.logsumexp(tab.log_M + left[None, :, None] + right[None, None, :], (1, 2))
    pairs = left.exp()[:, None] * right.exp()[None]  # (q, q, m, B)
    return (tab.M_up @ pairs.flatten(2).flatten(0, 1)).view_as(left).log()


def _down(tab: _Tables, down: torch.Tensor, left: torch.Tensor, right: torch.Tensor, exact: bool):
    """Messages from a parent to its children, ``(q, m, B)`` each.

    ``to_left[b] = log sum_{a,c} exp(down[a]) M[a, b, c] exp(right[c])`` and
    symmetrically ``to_right``; ``down`` is what the parent hears from above.
    """
    if exact:
        joint = down[:, None, None] + tab.log_M  # (a, b, c, m, B)
        return torch.logsumexp(joint + right[None, None], (0, 2)), torch.logsumexp(joint + left[None, :, None], (0, 1))
    q = len(down)
    pairs = (tab.M_down @ down.exp().flatten(1)).view(q, q, *down.shape[1:])  # (b, c, m, B)
    return (pairs * right.exp()[None]).sum(1).log(), (pairs * left.exp()[:, None]).sum(0).log()


def _upward(tab: _Tables, log_psi: torch.Tensor, J: int, exact: bool):
    """Upward pass from leaf log-potentials ``(q, n, B)`` to the ``J = 2**k`` level-k nodes.

    Returns the max-0 messages of levels ``k..depth`` (list, level ``k`` first),
    the star's messages into the root ``(q, J, B)``, the log-normaliser removed
    along the way ``(B,)`` and the smallest update max ``(B,)`` (the underflow
    certificate).
    """
    u, scale = _normalise(log_psi)
    scale = scale.sum(0)
    worst = torch.zeros_like(scale)
    ups = [u]
    while u.shape[1] > J:
        u, m = _normalise(_up(tab, u[:, 0::2], u[:, 1::2], exact))
        scale, worst = scale + m.sum(0), torch.minimum(worst, m.amin(0))
        ups.append(u)
    root_in, m = _normalise(torch.logsumexp(tab.log_top + u[None], 1))  # [r, j]: log sum_a P_j[r, a] e^u[a, j]
    return ups[::-1], root_in, scale + m.sum(0), torch.minimum(worst, m.amin(0))


def _posterior_chunk(tab: _Tables, log_psi: torch.Tensor, J: int, exact: bool):
    """Log leaf marginals ``(q, n, B)`` from leaf log-potentials ``(q, n, B)``, and the certificate ``(B,)``."""
    ups, root_in, _, worst = _upward(tab, log_psi, J, exact)
    # star: node j hears the root prior times the messages of every other node j'
    zero = torch.zeros_like(root_in[:, :1])
    before = torch.cat([zero, root_in.cumsum(1)[:, :-1]], 1)
    after = torch.cat([root_in.flip(1).cumsum(1).flip(1)[:, 1:], zero], 1)
    others, m1 = _normalise(before + after)
    down, m2 = _normalise(torch.logsumexp(tab.log_top + others[:, None], 0))  # [a, j]
    worst = torch.minimum(worst, torch.minimum(m1, m2).amin(0))
    for u in ups[1:]:
        to_left, to_right = _down(tab, down, u[:, 0::2], u[:, 1::2], exact)
        down, m = _normalise(torch.stack([to_left, to_right], 2).flatten(1, 2))
        worst = torch.minimum(worst, m.amin(0))
    logits = down + ups[-1]
    log_z = torch.logsumexp(logits, 0, keepdim=True)
    return logits - log_z, torch.minimum(worst, log_z[0].amin(0))


def _chunked(g, log_psi: torch.Tensor, k: int, run) -> list:
    """Apply ``run(tab, chunk (q, n, b), exact) -> (result (..., b), certificate (b,))`` to cache-sized
    chunks of ``log_psi`` ``(B, n, q)``, redoing rows with a failed certificate exactly."""
    tab = _tables(g, k)
    psi = log_psi.to(torch.float64).permute(2, 1, 0).contiguous()  # (q, n, B): the batch is the fast axis
    out = []
    with torch_threads(1):  # many small cache-sized ops: intra-op threads mostly wait on each other
        for s in range(0, max(psi.shape[-1], 1), CHUNK):  # an empty batch still runs once
            chunk = psi[..., s : s + CHUNK]
            res, worst = run(tab, chunk, exact=False)
            redo = torch.nonzero(~(worst >= tab.log_floor)).flatten()  # also catches NaN
            if len(redo):
                res[..., redo] = run(tab, chunk[..., redo], exact=True)[0]
            out.append(res)
    return out


def _check_leaves(g, x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise BiasgenError(f"{name} must be a float32 or float64 tensor of shape (B, {g.n_leaves}, {g.q}).")
    if x.ndim != 3 or x.shape[1:] != (g.n_leaves, g.q):
        raise BiasgenError(
            f"{name} must have shape (B, 2**depth, q) = (B, {g.n_leaves}, {g.q}), got {tuple(x.shape)}; "
            "one-hot encode the sequence and noise it."
        )


def log_evidence(g, log_psi: torch.Tensor, k: int = 0) -> torch.Tensor:
    """``log sum_x P_k(x) prod_i psi_i(x_i)`` for leaf log-potentials ``log_psi`` ``(B, 2**depth, q)``: float64 ``(B,)``.

    With ``log_psi`` = 0 on the observed symbol and ``-inf`` elsewhere this is
    the exact ``log P_k(x)`` of a sequence (see ``Grammar.log_prob``).
    """
    k = g.check_k(k)
    _check_leaves(g, log_psi, "log_psi")

    def run(tab, chunk, exact):
        _, root_in, scale, worst = _upward(tab, chunk, 2**k, exact)
        return scale + torch.logsumexp(root_in.sum(1), 0) - math.log(g.q), worst

    return torch.cat(_chunked(g, log_psi, k, run))


def leaf_log_evidence(x_t: torch.Tensor, abar) -> torch.Tensor:
    """``log psi = sqrt(abar) / (1 - abar) * x_t``, shifted to max 0 per leaf: float64 ``(B, n, q)``.

    ``x_t``: ``(B, n, q)`` float; ``abar``: float or ``(B,)``, each in (0, 1).
    The shift is taken in ``x_t``'s own dtype, where it is exact for the
    entries that matter, so float32 inputs lose nothing even at very low noise.
    """
    abar = torch.as_tensor(abar, dtype=torch.float64)
    if abar.ndim > 1 or (abar.ndim == 1 and len(abar) != len(x_t)):
        raise BiasgenError(f"abar must be a float or a tensor of shape (B,) = ({len(x_t)},), got {tuple(abar.shape)}.")
    if not bool(((abar > 0) & (abar < 1)).all()):
        raise BiasgenError("abar must lie strictly inside (0, 1); at abar = 1 there is no noise, use the clean tokens.")
    coef = (abar.sqrt() / (1 - abar)).reshape(-1, 1, 1)
    return coef * (x_t - x_t.amax(-1, keepdim=True)).to(torch.float64)


def _log_posterior64(g, x_t: torch.Tensor, abar, k: int) -> torch.Tensor:
    """Float64 log leaf marginals ``(B, n, q)``, after validating the inputs."""
    k = g.check_k(k)
    _check_leaves(g, x_t, "x_t")
    if not bool(torch.isfinite(x_t).all()):
        raise BiasgenError("x_t contains NaN or inf values.")
    run = lambda tab, chunk, exact: _posterior_chunk(tab, chunk, 2**k, exact)  # noqa: E731
    return torch.cat(_chunked(g, leaf_log_evidence(x_t, abar), k, run), -1).permute(2, 1, 0)


def exact_log_posterior(g, x_t: torch.Tensor, abar, k: int = 0) -> torch.Tensor:
    """Exact per-position log posterior ``log P_k(x0_i = a | x_t)``: ``(B, 2**depth, q)`` in ``x_t``'s dtype.

    The same form as a model's ``log_softmax(logits)``, ready for KL and
    cross-entropy comparisons. ``x_t``: ``(B, 2**depth, q)`` float32/float64;
    ``abar``: float or ``(B,)`` in (0, 1); ``k`` in ``[0, depth]``.
    """
    return _log_posterior64(g, x_t, abar, k).to(x_t.dtype)


def exact_denoiser(g, x_t: torch.Tensor, abar, k: int = 0) -> torch.Tensor:
    """The exact denoiser ``x0_hat_BP = E[one_hot(x0) | x_t]`` of the k-filtered model: ``(B, 2**depth, q)``.

    ``x_t``: a Gaussian-noised one-hot batch ``(B, 2**depth, q)``, float32 or
    float64 (the result has the same dtype); ``abar``: float or ``(B,)`` in (0, 1).
    These are the per-position x0 distributions a model's softmax estimates.
    """
    return _log_posterior64(g, x_t, abar, k).exp().to(x_t.dtype)


def exact_eps(g, x_t: torch.Tensor, t, schedule: NoiseSchedule, k: int = 0) -> torch.Tensor:
    """Exact noise prediction at integer step(s) ``t`` (int or ``(B,)``) by Tweedie: ``(B, 2**depth, q)``."""
    x0 = exact_denoiser(g, x_t, schedule.abar(t), k)
    return schedule.eps_from_x0(x_t, x0, t)


def exact_score(g, x_t: torch.Tensor, t, schedule: NoiseSchedule, k: int = 0) -> torch.Tensor:
    """Exact score ``grad log p_t(x_t)`` of the k-filtered model at step(s) ``t``: ``(B, 2**depth, q)``."""
    x0 = exact_denoiser(g, x_t, schedule.abar(t), k)
    return schedule.score_from_x0(x_t, x0, t)
