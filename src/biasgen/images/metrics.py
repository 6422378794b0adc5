"""Twin-split metrics on images: sample level (docs/method.md §3), score level (docs/method.md §4), frozen-noise loss (docs/method.md §2).

Public API. Every function takes plain tensors or plain callables, so it works
on any diffusion model, not only those biasgen trained. An *eps-denoiser* is
any callable ``denoise(x_t, t) -> eps_hat`` with ``x_t`` of shape ``(B, ...)``
(float32) and ``t`` a LongTensor ``(B,)`` of integer steps in ``1..T``.

All computation is float32 under ``torch.no_grad``; results come back on CPU.

    d = twin_distance([samples_A, samples_B])        # D_cos per pair, median ± SEM
    nn = nearest_neighbors(samples_A, split_A)       # sim, l2, index, l2_second
    fm = memorized_fraction(nn["l2"], nn["l2_second"])
    z = data_copying_z(nn["l2"], nearest_neighbors(test, split_A)["l2"])
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from ..errors import BiasgenError
from ..schedule import NoiseSchedule

EpsDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MEDIAN_SEM_FACTOR = math.sqrt(math.pi / 2)  # 1.2533: SEM(median) / SEM(mean) for Gaussian data, large n


# -- helpers ---------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(N, ...)`` -> ``(N, D)`` float32 on CPU."""
    if x.ndim < 1 or len(x) == 0:
        raise BiasgenError(f"Expected a non-empty batch of shape (N, ...), got shape {tuple(x.shape)}.")
    return x.detach().to("cpu", torch.float32).reshape(len(x), -1)


def _mean_sem(table: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Mean and SEM of per-pair value vectors (``table[p]``: ``(n_items_p,)``), pairs weighted equally.

    The SEM is taken across pairs (std of the per-pair means / sqrt(n_pairs))
    when there are at least two pairs; with a single pair, across its items.
    """
    per_pair = torch.stack([v.mean() for v in table])
    if len(per_pair) >= 2:
        sem = float(per_pair.std()) / math.sqrt(len(per_pair))
    else:
        sem = float(table[0].std()) / math.sqrt(len(table[0])) if len(table[0]) >= 2 else 0.0
    return float(per_pair.mean()), sem


def _all_pairs(k: int, ordered: bool) -> list[tuple[int, int]]:
    make = itertools.permutations if ordered else itertools.combinations
    return list(make(range(k), 2))


# -- sample level (docs/method.md §3) -------------------------------------------------
def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The map ``f`` of docs/method.md §3: per image subtract its pixel mean, divide by its pixel std, flatten, L2-normalise.

    ``x``: ``(N, ...)`` -> ``(N, D)`` unit rows. A constant image maps to the zero vector.
    """
    v = _flat(x)
    v = (v - v.mean(1, keepdim=True)) / (v.std(1, unbiased=False, keepdim=True) + eps)
    return F.normalize(v, dim=1, eps=eps)


@torch.no_grad()
def twin_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``c_j = <f(a_j), f(b_j)>`` for samples drawn from the same noise. ``a, b``: ``(N, ...)`` -> ``(N,)``."""
    if a.shape != b.shape:
        raise BiasgenError(f"Twin samples must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    return (standardize(a) * standardize(b)).sum(1)


@torch.no_grad()
def twin_distance(samples: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]] | None = None) -> dict:
    """Twin cosine distance ``D_cos = 1 - mean_j c_j`` per pair of models, and its median ± SEM over pairs.

    ``samples[k]``: ``(N, ...)``, model k's samples, sample j from shared noise j.
    ``pairs``: index pairs into ``samples``; default all unordered pairs.

    Returns a JSON-ready dict: ``pairs``, ``per_pair`` (D_cos per pair),
    ``per_sample`` (``(N,)`` list: ``1 - c_j`` averaged over pairs; the units to
    bootstrap over when there is a single pair), ``median``, ``mean``, ``sem``,
    ``sem_kind``. With two or more pairs the SEM is that of the median,
    approximated by ``1.2533 * std(per_pair) / sqrt(n_pairs)`` (exact for
    Gaussian spread and many pairs); with one pair it is the SEM of that pair's
    mean over samples, ``std_j(1 - c_j) / sqrt(N)``.
    """
    if len(samples) < 2:
        raise BiasgenError("twin_distance needs samples from at least 2 models (one per split).")
    pairs = [tuple(p) for p in (pairs if pairs is not None else _all_pairs(len(samples), ordered=False))]
    if not pairs:
        raise BiasgenError("twin_distance got an empty list of pairs; pass at least one (i, j).")
    if len({tuple(x.shape) for x in samples}) != 1:
        raise BiasgenError("Twin samples must all have the same shape (same number of samples from the same seeds).")
    f = [standardize(x) for x in samples]
    dist = torch.stack([1 - (f[i] * f[j]).sum(1) for i, j in pairs])  # (n_pairs, N)
    per_pair = dist.mean(1)
    if len(pairs) >= 2:
        sem = MEDIAN_SEM_FACTOR * float(per_pair.std()) / math.sqrt(len(pairs))
        sem_kind = "median over pairs, 1.2533*std/sqrt(n_pairs)"
    else:
        sem = float(dist[0].std()) / math.sqrt(dist.shape[1]) if dist.shape[1] >= 2 else 0.0
        sem_kind = "single pair, std over samples/sqrt(N)"
    return {
        "pairs": [list(p) for p in pairs],
        "per_pair": per_pair.tolist(),
        "per_sample": dist.mean(0).tolist(),
        "median": float(per_pair.quantile(0.5)),
        "mean": float(per_pair.mean()),
        "sem": sem,
        "sem_kind": sem_kind,
    }


@torch.no_grad()
def nearest_neighbors(samples: torch.Tensor, reference: torch.Tensor, batch: int = 2048) -> dict:
    """Nearest neighbours of each sample in a reference set (e.g. a training split).

    ``samples``: ``(N, ...)``; ``reference``: ``(M, ...)`` with the same per-image
    shape, ``M >= 2``. References are processed ``batch`` at a time, so memory is
    ``O(N * batch + M * D)`` (512 samples x 10^4 references is a few hundred MB at most).

    Returns a dict of CPU tensors, each ``(N,)``:
    ``sim`` (max standardized cosine ``<f(x), f(r)>``), ``sim_index`` (its argmax),
    ``l2`` (min pixel L2 distance), ``index`` (its argmin), ``l2_second``
    (second-smallest L2). The two smallest L2 distances are recomputed exactly
    from pixel differences, so a sample that is a training image has ``l2 == 0``.
    """
    s, r = _flat(samples), _flat(reference)
    if s.shape[1] != r.shape[1]:
        raise BiasgenError(
            f"Samples {tuple(samples.shape[1:])} and reference images {tuple(reference.shape[1:])} differ in shape; "
            "resize them to the same resolution."
        )
    if len(r) < 2:
        raise BiasgenError("nearest_neighbors needs at least 2 reference images (for the second-nearest distance).")
    fs, fr = standardize(s), standardize(r)
    s_sq = (s * s).sum(1, keepdim=True)
    best_sim = torch.full((len(s),), -math.inf)
    best_sim_idx = torch.zeros(len(s), dtype=torch.long)
    top_d2 = torch.full((len(s), 2), math.inf)
    top_idx = torch.zeros((len(s), 2), dtype=torch.long)
    for start in range(0, len(r), batch):
        rc, frc = r[start : start + batch], fr[start : start + batch]
        sim = fs @ frc.T
        val, arg = sim.max(1)
        better = val > best_sim
        best_sim = torch.where(better, val, best_sim)
        best_sim_idx = torch.where(better, arg + start, best_sim_idx)
        d2 = (s_sq + (rc * rc).sum(1) - 2 * s @ rc.T).clamp_min(0)
        cand_d2 = torch.cat([top_d2, d2], 1)
        cand_idx = torch.cat([top_idx, torch.arange(start, start + len(rc)).expand(len(s), -1)], 1)
        top_d2, pos = cand_d2.topk(2, dim=1, largest=False)
        top_idx = cand_idx.gather(1, pos)
    exact = (s[:, None, :] - r[top_idx]).norm(dim=2)  # (N, 2)
    exact, order = exact.sort(1)
    top_idx = top_idx.gather(1, order)
    return {"sim": best_sim, "sim_index": best_sim_idx, "l2": exact[:, 0], "index": top_idx[:, 0], "l2_second": exact[:, 1]}


def memorized_fraction(
    d1: torch.Tensor, d2: torch.Tensor, threshold: float = 1 / 3, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Share of samples with ``d1 / d2 < threshold`` (Gu et al. 2023), with a bootstrap 95% CI.

    ``d1, d2``: ``(N,)`` L2 distances to the nearest and second-nearest training
    image (see :func:`nearest_neighbors`). A sample with ``d1 == d2 == 0`` (a copy
    of an image duplicated in the split) counts as memorized.
    Returns ``{"value", "ci": [lo, hi], "n"}`` (percentile bootstrap over samples).
    """
    d1 = torch.as_tensor(d1, dtype=torch.float64).reshape(-1)
    d2 = torch.as_tensor(d2, dtype=torch.float64).reshape(-1)
    if len(d1) == 0 or d1.shape != d2.shape:
        raise BiasgenError(f"memorized_fraction needs two non-empty distance vectors of equal length, got {len(d1)} and {len(d2)}.")
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-300), torch.zeros_like(d1))
    hits = (ratio < threshold).numpy().astype(np.float64)
    rng = np.random.default_rng(seed)
    boot = hits[rng.integers(0, len(hits), (n_boot, len(hits)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"value": float(hits.mean()), "ci": [float(lo), float(hi)], "n": int(len(hits))}


def data_copying_z(sample_nn_dist: torch.Tensor, heldout_nn_dist: torch.Tensor) -> float:
    """Mann–Whitney U z-score of the data-copying test (Meehan et al. 2020).

    ``sample_nn_dist``: ``(m,)`` distances of generated samples to their nearest
    training image; ``heldout_nn_dist``: ``(n,)`` the same for held-out real images.
    ``U`` counts pairs (sample, held-out) where the sample is farther (ties count
    1/2), from tie-averaged ranks; ``z = (U - mn/2) / sigma_U`` with the tie
    correction of the variance and no continuity correction. Negative ``z``:
    samples sit closer to the training data than fresh data does (copying);
    ``|z| > 2`` is significant. Returns 0.0 when every distance is tied.
    """
    a = np.asarray(torch.as_tensor(sample_nn_dist, dtype=torch.float64).reshape(-1))
    b = np.asarray(torch.as_tensor(heldout_nn_dist, dtype=torch.float64).reshape(-1))
    m, n = len(a), len(b)
    if m == 0 or n == 0:
        raise BiasgenError("data_copying_z needs at least one sample distance and one held-out distance.")
    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[:m].sum() - m * (m + 1) / 2
    N = m + n
    _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    tie = (counts**3 - counts).sum() / (N * (N - 1)) if N > 1 else 0.0
    var = m * n / 12 * ((N + 1) - tie)
    return 0.0 if var <= 0 else float((u - m * n / 2) / math.sqrt(var))


# -- score level (docs/method.md §4) ---------------------------------------------------
def _noised(x0: torch.Tensor, t: int, schedule: NoiseSchedule, seed: int) -> torch.Tensor:
    """``x0`` noised at integer step ``t`` with eps drawn from ``seed`` (the same eps at every call and every t)."""
    if not 1 <= t <= schedule.T:
        raise BiasgenError(f"Diffusion step t={t} is outside 1..{schedule.T}.")
    x0 = x0.detach().to("cpu", torch.float32)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed)))
    return schedule.add_noise(x0, eps, t)


@torch.no_grad()
def _outputs(denoise: EpsDenoiser, x: torch.Tensor, t: torch.Tensor | int, batch_size: int, device,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """``denoise`` applied in batches; ``x``: ``(N, ...)``, ``t``: ``(N,)`` or int -> ``(N, D)`` float32 on CPU.
    ``labels``: ``(N,)`` class labels passed as ``denoise``'s third argument (None: not passed)."""
    t = torch.as_tensor(t, dtype=torch.long).expand(len(x))
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        tb = t[start : start + batch_size].to(device)
        yb = () if labels is None else (labels[start : start + batch_size].to(device),)
        out.append(denoise(xb, tb, *yb).detach().to("cpu", torch.float32).reshape(len(xb), -1))
    return torch.cat(out)


@torch.no_grad()
def denoiser_similarity(
    denoise_a: EpsDenoiser,
    denoise_b: EpsDenoiser,
    x0: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    seed: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-input cosine of two eps-denoisers' flattened outputs on the same noised inputs.

    ``x0``: ``(N, ...)`` clean inputs, noised once at step ``t`` with noise drawn
    from ``seed`` (identical for every call). Returns ``(N,)``.
    """
    x_t = _noised(x0, t, schedule, seed)
    ea = _outputs(denoise_a, x_t, int(t), batch_size, device)
    eb = _outputs(denoise_b, x_t, int(t), batch_size, device)
    return F.cosine_similarity(ea, eb, dim=1, eps=1e-8)


@torch.no_grad()
def score_similarity(
    models: Sequence[EpsDenoiser],
    pairs: Sequence[tuple[int, int]] | None,
    x0_train_per_model: Sequence[torch.Tensor],
    x0_test: torch.Tensor,
    ts: Sequence[int],
    schedule: NoiseSchedule,
    seed: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """Score-level twin similarity (docs/method.md §4) on training inputs vs test inputs, per diffusion step.

    ``models[k]``: model k's eps-denoiser; ``x0_train_per_model[k]``: ``(n_k, ...)``
    model k's own training images; ``x0_test``: ``(n_test, ...)``.
    ``pairs``: ordered pairs ``(A, B)``; default all ordered pairs. For pair
    ``(A, B)`` the *train* similarity uses A's training inputs and the *test*
    similarity the test inputs. Inputs are noised once per t from ``seed``.

    Returns a JSON-ready dict with ``ts``, ``pairs`` and, per t (lists aligned
    with ``ts``): ``train_mean``, ``train_sem``, ``test_mean``, ``test_sem`` and
    ``train_per_pair`` / ``test_per_pair`` (mean cosine per pair). The mean is
    over pairs and inputs; the SEM is across pairs when there are at least two,
    else across inputs. Ordered pairs share models, so this SEM is a rough guide.
    """
    if len(models) != len(x0_train_per_model):
        raise BiasgenError(f"Got {len(models)} models but {len(x0_train_per_model)} training sets; pass one per model.")
    pairs = [tuple(p) for p in (pairs if pairs is not None else _all_pairs(len(models), ordered=True))]
    if not pairs:
        raise BiasgenError("score_similarity needs at least one pair of models.")
    out = {"ts": [int(t) for t in ts], "pairs": [list(p) for p in pairs]}
    out |= {f"{name}_{stat}": [] for name in ("train", "test") for stat in ("mean", "sem", "per_pair")}
    used = sorted({k for p in pairs for k in p})
    for t in ts:
        # test inputs: every model once
        x_t = _noised(x0_test, t, schedule, seed)
        test_out = {k: _outputs(models[k], x_t, t, batch_size, device) for k in used}
        test_cos = [F.cosine_similarity(test_out[a], test_out[b], dim=1, eps=1e-8) for a, b in pairs]
        # training inputs: pair (A, B) on A's own split; each model run once per split
        train_cos = {}
        for a in sorted({p[0] for p in pairs}):
            partners = {b for p, b in pairs if p == a}
            x_t = _noised(x0_train_per_model[a], t, schedule, seed)
            own = {k: _outputs(models[k], x_t, t, batch_size, device) for k in partners | {a}}
            for b in partners:
                train_cos[(a, b)] = F.cosine_similarity(own[a], own[b], dim=1, eps=1e-8)
        for name, table in (("train", [train_cos[p] for p in pairs]), ("test", test_cos)):
            mean, sem = _mean_sem(table)
            out[f"{name}_mean"].append(mean)
            out[f"{name}_sem"].append(sem)
            out[f"{name}_per_pair"].append([float(c.mean()) for c in table])
    return out


# -- frozen-noise loss (docs/method.md §2) ----------------------------------------------
@torch.no_grad()
def frozen_noise_loss(
    eps_model: EpsDenoiser,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    seed: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    labels: torch.Tensor | None = None,
) -> dict:
    """Denoising loss with frozen noise: example i gets one ``(t_i, eps_i)`` drawn from ``seed``, reused at every call.

    ``x0``: ``(N, ...)``. ``t_i`` is uniform in ``1..T-1``, ``eps_i ~ N(0, I)``;
    the draws depend only on ``seed``, ``N`` and the image shape. ``labels``: ``(N,)`` class labels for a
    conditional ``eps_model(x_t, t, y)`` (None: ``eps_model(x_t, t)``).
    Returns ``{"per_example": (N,) MSE(eps_i, eps_hat_i), "t": (N,) long, "mean": float}``.
    """
    x0 = x0.detach().to("cpu", torch.float32)
    if len(x0) == 0:
        raise BiasgenError("frozen_noise_loss needs at least one example.")
    g = torch.Generator().manual_seed(int(seed))
    t = torch.randint(1, schedule.T, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    eps_hat = _outputs(eps_model, schedule.add_noise(x0, eps, t), t, batch_size, device, labels)
    per_example = ((eps_hat - eps.reshape(len(x0), -1)) ** 2).mean(1)
    return {"per_example": per_example, "t": t, "mean": float(per_example.mean())}


def loss_by_t(per_example: torch.Tensor, t: torch.Tensor, n_bins: int = 10, T: int | None = None) -> dict:
    """Mean loss in ``n_bins`` equal-width bins of the diffusion step over ``[1, T)``.

    ``per_example``, ``t``: ``(N,)`` as returned by :func:`frozen_noise_loss`; ``T``
    defaults to ``max(t) + 1``. Returns JSON-ready lists ``t_lo``, ``t_hi``
    (bin ``[t_lo, t_hi)``), ``mean`` (None for an empty bin) and ``count``.
    """
    loss = torch.as_tensor(per_example, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(t).reshape(-1).long()
    T = int(T if T is not None else int(t.max()) + 1)
    edges = torch.linspace(1, T, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(t.double(), edges[1:-1], right=True)
    out = {"t_lo": edges[:-1].tolist(), "t_hi": edges[1:].tolist(), "mean": [], "count": []}
    for k in range(n_bins):
        sel = loss[which == k]
        out["mean"].append(float(sel.mean()) if len(sel) else None)
        out["count"].append(int(len(sel)))
    return out
