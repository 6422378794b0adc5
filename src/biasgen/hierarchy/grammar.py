"""The hierarchical data model of docs/method.md §5: a random context-free grammar on a binary tree.

A grammar is a tensor ``M[a, b, c] = P(left=b, right=c | parent=a)`` of shape
``(q, q, q)`` and a tree depth ``l``: the root (level 0) is uniform on ``q``
symbols, every node of level ``d < l`` emits its two children with ``M``, and
the ``2**l`` nodes of level ``l`` are the sequence. Node ``j`` of level ``d``
has children ``2j`` and ``2j + 1`` of level ``d + 1``.

The **k-filtered** model (``0 <= k <= l``) replaces the top ``k`` levels by
independent draws of the ``2**k`` level-``k`` nodes from ``P(node_j | root)``
(the product of ``M_L = M.sum(2)`` and ``M_R = M.sum(1)`` along the path from
the root); below level ``k`` the rules apply. ``k = 0`` is the full model.

    g = Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0)   # the paper's grammar
    x = g.sample(10**6, k=0, seed=1)                              # LongTensor (10**6, 16)
    g.log_prob(x), g.is_grammatical(x), g.level_validity(x)
"""
from __future__ import annotations

import io
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import BiasgenError
from ..runs import write_bytes
from . import bp

ROW_SUM_TOL = 1e-6  # how far a row M[a] may sum from 1


class Grammar:
    """A grammar tensor ``M`` (float64, ``(q, q, q)``) on a binary tree of depth ``depth``."""

    def __init__(self, M, depth: int):
        M = torch.as_tensor(M, dtype=torch.float64)
        if M.ndim != 3 or not (M.shape[0] == M.shape[1] == M.shape[2]) or M.shape[0] < 2:
            raise BiasgenError(
                f"The grammar tensor must have shape (q, q, q) with q >= 2, got {tuple(M.shape)}; "
                "pass M[a, b, c] = P(left=b, right=c | parent=a)."
            )
        if not bool(torch.isfinite(M).all()) or bool((M < 0).any()):
            raise BiasgenError("The grammar tensor has negative or non-finite entries; probabilities must be >= 0.")
        sums = M.sum((1, 2))
        if not bool(((sums - 1).abs() <= ROW_SUM_TOL).all()):
            worst = int((sums - 1).abs().argmax())
            raise BiasgenError(
                f"Row M[{worst}] sums to {float(sums[worst]):.6g}, not 1; normalise each parent's "
                "rule table, e.g. M = M / M.sum((1, 2), keepdim=True)."
            )
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
            raise BiasgenError(f"The tree depth must be an integer >= 1, got {depth!r}.")
        self.M = M / sums[:, None, None]
        self.depth = int(depth)

    # -- construction -------------------------------------------------------
    @classmethod
    def random(cls, q: int = 6, depth: int = 4, q_eff: int = 4, sigma: float = 1.0, seed: int = 0) -> "Grammar":
        """The paper's random unambiguous grammar (docs/method.md §5).

        The ``q**2`` ordered child pairs are shuffled once; parent ``a`` owns the
        block ``[a*q_eff, (a+1)*q_eff)`` of them, with logits ``sigma * N(0, 1)``
        on owned pairs and ``M[a] = softmax`` (zero elsewhere).
        """
        if not 1 <= q_eff <= q:
            raise BiasgenError(
                f"q_eff={q_eff} must lie in [1, q={q}]: each of the q parents owns q_eff of the q**2 "
                "child pairs, disjointly, so the grammar stays unambiguous."
            )
        if sigma < 0 or not math.isfinite(sigma):
            raise BiasgenError(f"sigma must be a finite number >= 0, got {sigma}.")
        gen = torch.Generator().manual_seed(int(seed))
        pairs = torch.randperm(q * q, generator=gen)[: q * q_eff].reshape(q, q_eff)
        logits = sigma * torch.randn(q, q_eff, generator=gen, dtype=torch.float64)
        M = torch.zeros(q, q * q, dtype=torch.float64)
        M.scatter_(1, pairs, logits.softmax(-1))
        return cls(M.reshape(q, q, q), depth)

    # -- basic quantities ---------------------------------------------------
    @property
    def q(self) -> int:
        return self.M.shape[0]

    @property
    def n_leaves(self) -> int:
        return 2**self.depth

    @cached_property
    def M_L(self) -> torch.Tensor:
        """``(q, q)``: ``P(left child = b | parent = a)``."""
        return self.M.sum(2)

    @cached_property
    def M_R(self) -> torch.Tensor:
        """``(q, q)``: ``P(right child = c | parent = a)``."""
        return self.M.sum(1)

    @cached_property
    def ambiguous(self) -> bool:
        """True when some child pair can be emitted by more than one parent."""
        return bool(((self.M > 0).sum(0) > 1).any())

    def check_k(self, k: int) -> int:
        """Validate a filtering level; returns it as an int."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= self.depth:
            raise BiasgenError(f"The filtering level k must be an integer in [0, depth={self.depth}], got {k!r}.")
        return int(k)

    def level_transitions(self, k: int) -> torch.Tensor:
        """``(2**k, q, q)`` float64: ``P[j, r, a] = P(level-k node j = a | root = r)``."""
        k = self.check_k(k)
        P = torch.eye(self.q, dtype=torch.float64)[None]
        for _ in range(k):
            P = torch.stack([P @ self.M_L, P @ self.M_R], 1).flatten(0, 1)
        return P

    def __repr__(self) -> str:
        return f"Grammar(q={self.q}, depth={self.depth}, ambiguous={self.ambiguous})"

    # -- sampling -----------------------------------------------------------
    def sample(self, n: int, k: int = 0, seed: int = 0) -> torch.Tensor:
        """``n`` sequences of the k-filtered model: LongTensor ``(n, 2**depth)`` in ``[0, q)``.

        Vectorised (one inverse-CDF lookup per tree level) and reproducible: the
        result depends only on ``(grammar, n, k, seed)``.
        """
        k = self.check_k(k)
        if n < 0:
            raise BiasgenError(f"Cannot draw a negative number of sequences ({n}).")
        gen = torch.Generator().manual_seed(int(seed))
        J = 2**k
        # one uniform per draw: the root, the J level-k nodes, then 2**depth - J child pairs
        u = torch.rand(n, 1 + self.n_leaves, generator=gen, dtype=torch.float64)
        root = (u[:, 0] * self.q).long().clamp(max=self.q - 1)
        top = self.level_transitions(k).reshape(J * self.q, self.q)  # row j*q + r: law of node j given root r
        nodes = _draw(top, torch.arange(J) * self.q + root[:, None], u[:, 1 : 1 + J], torch.arange(self.q))
        table = self.M.reshape(self.q, self.q * self.q)
        children = torch.cartesian_prod(torch.arange(self.q), torch.arange(self.q))  # (q*q, 2): pair -> (b, c)
        col = 1 + J
        for d in range(k, self.depth):
            m = 2**d
            nodes = _draw(table, nodes, u[:, col : col + m], children).reshape(n, 2 * m)
            col += m
        return nodes

    # -- ground-truth statistics ---------------------------------------------
    def check_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a LongTensor ``(N, 2**depth)`` of symbols in ``[0, q)``; returns it as int64."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.n_leaves or x.dtype.is_floating_point:
            raise BiasgenError(
                f"Sequences must be an integer tensor of shape (N, {self.n_leaves}), got "
                f"{x.dtype} {tuple(x.shape)}; take the argmax over the symbol axis of one-hot data."
            )
        x = x.long()
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.q):
            raise BiasgenError(f"Sequence symbols must lie in [0, q={self.q}).")
        return x

    def log_prob(self, x: torch.Tensor, k: int = 0) -> torch.Tensor:
        """Exact ``log P_k(x)`` of each sequence under the k-filtered model: float64 ``(N,)``, ``-inf`` if impossible."""
        x = self.check_sequences(x)
        log_psi = torch.full((*x.shape, self.q), -math.inf, dtype=torch.float64)
        log_psi.scatter_(-1, x[..., None], 0.0)
        return bp.log_evidence(self, log_psi, k)

    def is_grammatical(self, x: torch.Tensor, k: int = 0) -> torch.Tensor:
        """Bool ``(N,)``: the sequence has probability > 0 under the k-filtered model."""
        return self.log_prob(x, k) > -math.inf

    @cached_property
    def _inferred_parent(self) -> torch.Tensor:
        """``(q, q)`` long: the most likely parent of each child pair ``(b, c)``.

        For an allowed pair it is the parent that owns it; for a forbidden pair,
        the parent maximising ``M_L[a, b] * M_R[a, c]`` (the best explanation of
        each child on its own). Ties go to the lowest symbol.
        """
        allowed = self.M.sum(0) > 0
        fallback = (self.M_L[:, :, None] * self.M_R[:, None, :]).argmax(0)
        return torch.where(allowed, self.M.argmax(0), fallback)

    def level_validity(self, x: torch.Tensor) -> torch.Tensor:
        """Per-level validity of each sequence: float64 ``(N, depth)``.

        Parents are inferred bottom-up (see ``_inferred_parent``). Column ``d``
        is the fraction of the ``2**d`` triples (parent at level ``d``, its two
        children at level ``d + 1``) whose child pair the rules allow. Column
        ``depth - 1`` checks the leaves directly. Needs an unambiguous grammar.
        """
        if self.ambiguous:
            raise BiasgenError(
                "level_validity infers each parent from its child pair, which needs an unambiguous "
                "grammar (every child pair owned by at most one parent); use log_prob / is_grammatical instead."
            )
        nodes = self.check_sequences(x)
        allowed = self.M.sum(0) > 0
        out = torch.empty(len(nodes), self.depth, dtype=torch.float64)
        for d in range(self.depth - 1, -1, -1):
            b, c = nodes[:, 0::2], nodes[:, 1::2]
            out[:, d] = allowed[b, c].double().mean(1)
            nodes = self._inferred_parent[b, c]
        return out

    def leaf_entropy(self) -> float:
        """Exact Shannon entropy (nats) of the full model's leaf distribution.

        For an unambiguous grammar the leaves determine the whole tree, so the
        entropy is ``log q + sum over internal nodes of E[H(M[parent])]``.
        """
        if self.ambiguous:
            raise BiasgenError(
                "The exact leaf entropy needs an unambiguous grammar; estimate it instead as "
                "-g.log_prob(g.sample(n)).mean()."
            )
        M = self.M
        h_rule = -(M * M.clamp_min(1e-300).log()).sum((1, 2))  # (q,) entropy of each parent's rule
        total = math.log(self.q)
        for d in range(self.depth):
            marg = self.level_transitions(d).mean(1)  # (2**d, q): marginal of each level-d node
            total += float((marg @ h_rule).sum())
        return total


def _draw(table: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: ``values[j]`` with ``j ~ table[rows[i]]``, using uniforms ``u`` (same shape as ``rows``).

    ``table`` is ``(R, W)`` with rows summing to 1, ``values`` is ``(W, ...)``;
    returns ``(*rows.shape, ...)``. Row ``r``'s CDF is shifted by ``r`` so all
    rows form one sorted array and a single ``searchsorted`` serves every draw;
    zero-probability entries are never returned.
    """
    R, W = table.shape
    cdf = table.cumsum(1)
    cdf[:, -1] = 1.0
    flat = (cdf + torch.arange(R, dtype=torch.float64)[:, None]).flatten()
    idx = torch.searchsorted(flat, rows + u, right=True)
    return values.repeat(R, *[1] * (values.ndim - 1))[idx]


# -- pools on disk -----------------------------------------------------------
def save_pool(path: str | Path, x: torch.Tensor, grammar: Grammar, k: int = 0, seed: int | None = None) -> Path:
    """Save sequences ``x`` ``(N, 2**depth)`` with their grammar as a compressed ``.npz``."""
    x = grammar.check_sequences(x)
    path = Path(path)
    if path.suffix != ".npz":
        raise BiasgenError(f"Pools are saved as .npz files; got {path.name!r}.")
    dtype = np.uint8 if grammar.q <= 256 else np.int64
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, x=x.numpy().astype(dtype), M=grammar.M.numpy(), depth=grammar.depth, k=grammar.check_k(k),
        seed=-1 if seed is None else int(seed),
    )
    write_bytes(path, buffer.getvalue())
    return path


def load_pool(path: str | Path) -> tuple[torch.Tensor, Grammar, dict]:
    """Load a pool written by :func:`save_pool`: ``(x LongTensor (N, 2**depth), grammar, {'k', 'seed'})``."""
    path = Path(path)
    if not path.is_file():
        raise BiasgenError(f"No pool file at {path}; create one with save_pool(path, g.sample(n), g).")
    with np.load(path) as z:
        missing = {"x", "M", "depth", "k", "seed"} - set(z.files)
        if missing:
            raise BiasgenError(f"{path} is not a biasgen pool (missing {sorted(missing)}).")
        grammar = Grammar(torch.from_numpy(z["M"]), int(z["depth"]))
        x = grammar.check_sequences(torch.from_numpy(z["x"].astype(np.int64)))
        seed = int(z["seed"])
        return x, grammar, {"k": int(z["k"]), "seed": None if seed < 0 else seed}
