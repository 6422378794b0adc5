"""The hierarchical twins' evaluation: inputs noised once with the exact denoisers' answers on them
(:func:`make_reference`, once per run) and every diagnostic of one checkpoint (:func:`evaluate_checkpoint`).

    ref = make_reference(data, cfg, seeds)                          # BP_0..BP_depth on frozen noise, once
    record, outputs = evaluate_checkpoint(models, members, ref, cfg, seeds)   # models' forward passes only

Keys and units of the record: :class:`biasgen.records.HierarchyRecord`; their meaning: docs/method.md §7.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..pipeline import Data
from ..records import HierarchyRecord
from ..schedule import NoiseSchedule
from ..seeds import SeedPlan
from ..twins import model_pairs
from .denoisers import bp_denoise_fn, empirical_denoise_fn, sample_sequences
from .grammar import Grammar
from .metrics import (bp_predictions, distance_divergence, is_near_copy, loss_terms, nearest_hamming,
                      nearest_two_hamming, nn_histogram, noised_inputs, oracle_kl, oracle_kl_along_t, symmetric_kl,
                      uturn_overlap, uturn_random, uturn_ratio)
from .model import as_denoiser

if TYPE_CHECKING:
    from .experiment import HierarchyConfig


def steps_of(fracs, T: int) -> list[int]:
    """Diffusion steps ``round(f * T)`` (clamped to 1..T) of the fractions ``fracs``."""
    return [max(1, min(T, round(f * T))) for f in fracs]


@dataclass
class Frozen:
    """Sequences noised once with a fixed seed (reused at every checkpoint) and the exact denoisers on them."""

    x0: torch.Tensor  # LongTensor (N, L): the clean sequences
    x_t: torch.Tensor  # (N, L, q) float64: their noised one-hot encodings
    t: torch.Tensor  # (N,) long: the step of each input
    bp: torch.Tensor  # (K, N, L, q) float64: BP_0..BP_{K-1} on (x_t, t); K = 0 where no exact prediction is needed


@dataclass
class Reference:
    """Evaluation inputs noised once (frozen noise) and what the exact denoisers say about them."""

    grammar: Grammar
    train: list[torch.Tensor]  # one training split per entry, LongTensor (n, L)
    test: torch.Tensor  # LongTensor (n_test, L)
    test_c: Frozen  # n_eval test inputs at the critical step, BP_0..BP_depth
    train_c: list[Frozen]  # per split, its first n_eval sequences at the critical step (no BP)
    test_l: Frozen  # n_loss test inputs, each at its own random step (frozen-noise cross-entropy), BP_0
    train_l: list[Frozen]  # per split, the same for its first n_loss sequences
    test_lt: Frozen  # the same n_loss test sequences, all at the step of loss_t_frac, BP_0
    train_lt: list[Frozen]  # per split
    kl_test: list[Frozen]  # per step of kl_steps, n_eval test inputs, BP_0..BP_depth
    kl_train: list[list[Frozen]]  # per split, per step of kl_steps, its first n_eval sequences, BP_0..BP_depth
    kl_steps: list[int]  # the t grid of the KL-along-t curves
    kl_bp: list[list[float]]  # KL(BP_0 || BP_k) along t on the test inputs: (depth + 1) lists of len(kl_steps)
    test_nn_dist: list[torch.Tensor]  # per split, LongTensor (n_test,): each test sequence's distance to its nearest training one
    uturn_steps: list[int]
    uturn_own: int  # training sequences at the head of each uturn_inputs entry: min(n_uturn, n)
    uturn_inputs: list[torch.Tensor]  # per split: its first uturn_own sequences then n_uturn test sequences (., L)
    uturn_bp: list[torch.Tensor]  # per split: BP overlaps on uturn_inputs, (len(uturn_steps), len(uturn_inputs[i]))
    random_uturn_steps: list[int]
    random_uturn: dict  # U-turns of random sequences: {"bp_k" / "empirical_split_i": {"mean", "sem"}}


def make_reference(data: Data, cfg: HierarchyConfig, seeds: SeedPlan) -> Reference:
    """Noise the evaluation inputs once and run the exact (BP) and empirical denoisers on them."""
    g, q, L, schedule = data.extra["grammar"], cfg.q, 2 ** cfg.depth, NoiseSchedule.onehot(cfg.T)
    every_k = cfg.depth + 1

    def frozen(x0: torch.Tensor, t: int | None, seed: int, levels: int) -> Frozen:
        x_t, tt = noised_inputs(x0, q, schedule, t, seed)
        bp = bp_predictions(g, schedule, x_t, tt, levels) if levels else torch.zeros((0, *x_t.shape), dtype=x_t.dtype)
        return Frozen(x0, x_t, tt, bp)

    t_c, t_l = steps_of([cfg.t_frac, cfg.loss_t_frac], cfg.T)
    kl_steps = steps_of(cfg.kl_t_fracs, cfg.T)
    kl_test = [frozen(data.test[: cfg.n_eval], t, seeds.evaluation("kl_along_t"), every_k) for t in kl_steps]
    uturn_steps = steps_of(cfg.uturn_fracs, cfg.T)
    uturn_inputs = [torch.cat([s[: cfg.n_uturn], data.test[: cfg.n_uturn]]) for s in data.train]
    random_uturn_steps = steps_of(cfg.random_uturn_fracs, cfg.T)
    exact = {f"bp_{k}": bp_denoise_fn(g, schedule, k) for k in range(every_k)}
    empirical = {f"empirical_split_{i}": empirical_denoise_fn(s, q, schedule) for i, s in enumerate(data.train)}
    splits = list(enumerate(data.train))
    return Reference(
        grammar=g, train=data.train, test=data.test,
        test_c=frozen(data.test[: cfg.n_eval], t_c, seeds.evaluation("critical_test"), every_k),
        train_c=[frozen(s[: cfg.n_eval], t_c, seeds.evaluation("critical_train", i), 0) for i, s in splits],
        test_l=frozen(data.test[: cfg.n_loss], None, seeds.evaluation("loss_test"), 1),
        train_l=[frozen(s[: cfg.n_loss], None, seeds.evaluation("loss_train", i), 1) for i, s in splits],
        test_lt=frozen(data.test[: cfg.n_loss], t_l, seeds.evaluation("loss_at_t_test"), 1),
        train_lt=[frozen(s[: cfg.n_loss], t_l, seeds.evaluation("loss_at_t_train", i), 1) for i, s in splits],
        kl_test=kl_test,
        kl_train=[[frozen(s[: cfg.n_eval], t, seeds.evaluation("kl_along_t_train", i), every_k) for t in kl_steps]
                  for i, s in splits],
        kl_steps=kl_steps,
        kl_bp=[oracle_kl_along_t([f.bp[:1] for f in kl_test], [f.bp[k] for f in kl_test])[0] for k in range(every_k)],
        test_nn_dist=[nearest_hamming(data.test, s) for s in data.train],
        uturn_steps=uturn_steps, uturn_own=min(cfg.n_uturn, cfg.n), uturn_inputs=uturn_inputs,
        uturn_bp=[uturn_overlap(exact["bp_0"], x, q, uturn_steps, schedule, cfg.uturn_reps, seeds.evaluation("uturn"))
                  for x in uturn_inputs],
        random_uturn_steps=random_uturn_steps,
        random_uturn=uturn_random(exact | empirical, cfg.n_random_uturn, L, q, random_uturn_steps, schedule,
                                  cfg.uturn_reps, seeds.evaluation("uturn_random")),
    )


def evaluate_checkpoint(models, members, ref: Reference, cfg: HierarchyConfig,
                        seeds: SeedPlan) -> tuple[HierarchyRecord, dict]:
    """Every hierarchical diagnostic (docs/method.md §7) for one checkpoint of all models.

    ``models``: networks predicting x0 logits; ``members[m] = (split, seed)``. Divergences and losses
    are in nats per sequence (summed over the ``2**depth`` positions). The exact (BP) side comes
    precomputed in ``ref``: a checkpoint costs only the models' forward passes. Returns the metrics
    record and ``{"samples": LongTensor (M, n_samples, 2**depth)}``, the generated sequences.
    """
    dens = [as_denoiser(m) for m in models]
    splits = [s for s, _ in members]
    rec: HierarchyRecord = {**_disagreement(dens, splits, members, ref), **_losses(dens, splits, ref)}
    gen = [sample_sequences(d, 2 ** cfg.depth, cfg.q, seeds.sample_seeds(cfg.n_samples), NoiseSchedule.onehot(cfg.T),
                            **cfg.sampler_settings, batch_size=1024) for d in dens]
    rec.update(_generation(gen, splits, ref, 2 ** cfg.depth))
    rec.update(_uturns(dens, splits, ref, cfg, seeds))
    return rec, {"samples": torch.stack(gen)}


def _disagreement(dens, splits: list[int], members, ref: Reference) -> HierarchyRecord:
    """Twin disagreement at t_c (test inputs, both twins' training inputs, same-split controls) and the sequential
    learning: KL(BP_k || model) for every k at t_c, and along t on test and own training inputs."""
    twins, controls = model_pairs(members)
    pred_test = [d(ref.test_c.x_t, ref.test_c.t) for d in dens]
    pred_train = [[d(f.x_t, f.t) for f in ref.train_c] for d in dens]
    rec: HierarchyRecord = {
        "skl_test_pairs": [symmetric_kl(pred_test[a], pred_test[b]) for a, b in twins],
        "skl_train_pairs": [0.5 * sum(symmetric_kl(pred_train[a][s], pred_train[b][s]) for s in (splits[a], splits[b]))
                            for a, b in twins],
        "skl_control_pairs": [symmetric_kl(pred_test[a], pred_test[b]) for a, b in controls],
        "oracle_kl": [oracle_kl(ref.test_c.bp, p) for p in pred_test],  # (M, depth + 1)
        "oracle_kl_along_t_test": [_kl_along_t(d, ref.kl_test) for d in dens],  # (M, depth + 1, len(kl_steps))
        "oracle_kl_along_t_train": [_kl_along_t(d, ref.kl_train[s]) for d, s in zip(dens, splits)],
    }
    rec["kl_along_t"] = [curves[0] for curves in rec["oracle_kl_along_t_test"]]  # k = 0 alone, (M, len(kl_steps))
    return rec


def _losses(dens, splits: list[int], ref: Reference) -> HierarchyRecord:
    """Cross-entropy ``l = l* + l~`` on test and on each model's own split: frozen random t, then all at loss_t_frac."""
    rec: HierarchyRecord = {}
    for suffix, test, train in (("", ref.test_l, ref.train_l), ("_at_t", ref.test_lt, ref.train_lt)):
        test_terms = [frozen_loss_terms(d, test) for d in dens]
        train_terms = [frozen_loss_terms(d, train[s]) for d, s in zip(dens, splits)]
        for key in ("l", "l_star", "l_tilde"):
            rec[f"test_{key}{suffix}"] = [r[key] for r in test_terms]
            rec[f"train_{key}{suffix}"] = [r[key] for r in train_terms]
    return rec


def _generation(gen: list[torch.Tensor], splits: list[int], ref: Reference, L: int) -> HierarchyRecord:
    """Of the sequences generated from shared noise (``gen[m]``: (n_samples, L)): D_NN and its histogram,
    copies and near-copies of the own split, grammaticality and exact log-probability."""
    two = [nearest_two_hamming(x, ref.train[s]) for x, s in zip(gen, splits)]  # (N, 2) per model: d1, d2
    nearest = [d[:, 0] for d in two]
    logp = [ref.grammar.log_prob(x) for x in gen]
    return {
        "d_nn": [distance_divergence(d, ref.test_nn_dist[s], L) for d, s in zip(nearest, splits)],
        "gen_nn_hist": [nn_histogram(d, L).tolist() for d in nearest],  # (M, L + 1); the test one: in the summary
        "gen_nn_mean": [float(d.double().mean()) for d in nearest],
        "gen_copy_share": [float((d == 0).double().mean()) for d in nearest],
        "gen_mem_share": [float(is_near_copy(d).double().mean()) for d in two],
        "gen_grammatical": [float(lp.isfinite().double().mean()) for lp in logp],
        "gen_logprob": [float(lp[lp.isfinite()].mean()) if lp.isfinite().any() else None for lp in logp],
    }


def _uturns(dens, splits: list[int], ref: Reference, cfg: HierarchyConfig, seeds: SeedPlan) -> HierarchyRecord:
    """U-turn overlap ratio model / BP (mean, SEM over sequences) on the model's own training vs test sequences,
    and the U-turns of uniformly random sequences (the same sequences and noise as the reference's)."""
    q, L, schedule, n = cfg.q, 2 ** cfg.depth, NoiseSchedule.onehot(cfg.T), ref.uturn_own
    rec: HierarchyRecord = {key: [] for key in ("uturn_ratio_train", "uturn_ratio_train_sem", "uturn_ratio_test",
                                             "uturn_ratio_test_sem")}
    for d, s in zip(dens, splits):
        model = uturn_overlap(d, ref.uturn_inputs[s], q, ref.uturn_steps, schedule, cfg.uturn_reps,
                              seeds.evaluation("uturn"))
        for side, cols in (("train", slice(None, n)), ("test", slice(n, None))):
            ratio = uturn_ratio(model[:, cols], ref.uturn_bp[s][:, cols])
            rec[f"uturn_ratio_{side}"].append(ratio["mean"])
            rec[f"uturn_ratio_{side}_sem"].append(ratio["sem"])
    rand = [uturn_random({"model": d}, cfg.n_random_uturn, L, q, ref.random_uturn_steps, schedule, cfg.uturn_reps,
                         seeds.evaluation("uturn_random"))["model"] for d in dens]
    rec["uturn_random"] = [r["mean"] for r in rand]  # (M, len(random_uturn_steps))
    rec["uturn_random_sem"] = [r["sem"] for r in rand]
    return rec


def _kl_along_t(den, inputs: list[Frozen]) -> list[list[float]]:
    """``KL(BP_k || den)`` for every k at each step of ``inputs`` (one :class:`Frozen` per step): ``(K, len(inputs))``."""
    return oracle_kl_along_t([f.bp for f in inputs], [den(f.x_t, f.t) for f in inputs])


def frozen_loss_terms(den, inputs: Frozen) -> dict:
    """``l = l* + l~`` of the denoiser ``den`` on ``inputs`` (``None``: of BP_0 itself, the floor of ``l``)."""
    pred = inputs.bp[0] if den is None else den(inputs.x_t, inputs.t)
    return loss_terms(pred, inputs.bp[0], inputs.x0)
