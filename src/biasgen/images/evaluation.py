"""The image audit's evaluation of one checkpoint: losses, samples from shared noise, proximity to the data,
score-level twin similarity (docs/method.md), and the loss bands of the summary.

    record, extra = evaluate_checkpoint(models, members, ref, cfg, seeds)   # extra["samples"]: (M, n, C, H, W)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..compiling import compiled, should_compile
from ..drift import noise_sd
from ..onset import checkpoint_minimum
from ..sampler import sample, x0_from_eps_model
from ..twins import model_pairs
from .metrics import (
    data_copying_z,
    frozen_noise_loss,
    loss_by_t,
    memorized_fraction,
    nearest_neighbors,
    score_similarity,
    twin_distance,
)
from .unet import UNet

if TYPE_CHECKING:
    from .audit import AuditConfig


def evaluate_checkpoint(models, members, ref: dict, cfg: AuditConfig, seeds) -> tuple[dict, dict]:
    """Every image metric (docs/method.md) for one checkpoint of all models.

    ``models``: eps-predicting networks, ``members[m] = (split, seed)``; ``ref``: ``train`` (one
    ``(n, C, H, W)`` set per split), ``test`` ``(n_test, C, H, W)``, ``heldout_l2`` (per model,
    ``(n_samples,)`` L2 distances of test images to its split), ``schedule``.
    Returns the metric record and ``{"samples": (M, n_samples, C, H, W)}``.
    """
    record = loss_record(models, members, ref, cfg, seeds)
    shape = tuple(ref["test"].shape[1:])
    samples = torch.stack([sample(x0_from_eps_model(m, ref["schedule"], clip=sample_clip(cfg)), ref["schedule"], shape,
                                  seeds.sample_seeds(cfg.n_samples), **cfg.sampler_settings, batch_size=cfg.eval_batch,
                                  device=cfg.device)
                           for m in sampling_networks(models, cfg, shape)])  # from shared noise
    record.update(sample_record(list(samples), members, ref["train"], ref["test"], ref["heldout_l2"], cfg, seeds))
    record.update(score_record(models, members, ref["train"], ref["test"], ref["schedule"], cfg, seeds))
    return record, {"samples": samples}


def sampling_networks(models, cfg: AuditConfig, shape: tuple[int, ...]) -> list:
    """The networks the sampler calls: each compiled (:mod:`biasgen.compiling`) where ``cfg.compile`` says it pays
    (``auto``: biasgen's own :class:`~biasgen.images.unet.UNet`, not a wrapped or adapted one)."""
    wanted = [should_compile(cfg.compile, cfg.device, cfg.sample_step_count, measured_network=type(m) is UNet)
              for m in models]
    if not any(wanted):
        return list(models)
    batch = min(cfg.n_samples, cfg.eval_batch)  # the sampler's batch per network call
    example = (torch.zeros(batch, *shape, device=cfg.device), torch.ones(batch, dtype=torch.long, device=cfg.device))
    return [compiled(m, example) if want else m for m, want in zip(models, wanted)]


def sample_clip(cfg: AuditConfig) -> float | None:
    """The sampler's clip of ``x0_hat``: [-1, 1] for images scaled to [-1, 1], none for centred ones."""
    return 1.0 if cfg.scaling == "minus1to1" else None


def loss_record(models, members, ref: dict, cfg: AuditConfig, seeds, labels: tuple | None = None) -> dict:
    """Frozen-noise test and train losses (the same ``(t, eps)`` per example at every checkpoint), overall and per
    noise band. ``labels``: ``(train labels per split, test labels)`` for class-conditional models."""
    train_sets, test_set, schedule, device = ref["train"], ref["test"], ref["schedule"], cfg.device
    train_labels, test_labels = labels or ([None] * len(train_sets), None)
    test_runs = [frozen_noise_loss(m, test_set.to(device), schedule, seed=seeds.evaluation("test_loss"),
                                   batch_size=cfg.eval_batch, labels=test_labels) for m in models]
    test_losses = torch.stack([r["per_example"] for r in test_runs])  # (M, n_test); the same t per example in every run
    train_runs = [frozen_noise_loss(m, train_sets[members[i][0]].to(device), schedule, seed=seeds.evaluation("train_loss"),
                                    batch_size=cfg.eval_batch, labels=train_labels[members[i][0]])
                  for i, m in enumerate(models)]
    train_losses = torch.stack([r["per_example"] for r in train_runs])  # (M, n); the same t per index in every run
    per_example = test_losses.mean(0)
    return dict(test_loss=float(per_example.mean()), test_loss_sem=float(per_example.std() / len(per_example) ** 0.5),
                test_loss_per_model=[float(v) for v in test_losses.mean(1)], train_loss=float(train_losses.mean()),
                test_loss_units=[round(float(v), 6) for v in per_example],
                test_loss_by_t=loss_by_t(per_example, test_runs[0]["t"], n_bins=10, T=schedule.T),
                train_loss_by_t=loss_by_t(train_losses.mean(0), train_runs[0]["t"], n_bins=10, T=schedule.T))


def sample_record(samples, members, train_sets, test_set, heldout_l2, cfg: AuditConfig, seeds,
                  nn=nearest_neighbors) -> dict:
    """Twin and control distances of each model's samples ``samples[m]`` (drawn from shared noise), and their
    proximity to the data (:func:`proximity`; ``nn``: the nearest-neighbour search)."""
    twins, controls = model_pairs(members)
    samples_x = [getattr(s, "x", s) for s in samples]  # the images of labelled samples
    twin = twin_distance(samples_x, twins)
    record = dict(twin_distance=twin["median"], twin_distance_sem=twin["sem"], twin_distance_pairs=twin["per_pair"],
                  twin_distance_samples=[round(v, 6) for v in twin["per_sample"]])
    if controls:
        control = twin_distance(samples_x, controls)
        record.update(same_split_distance=control["median"], same_split_distance_sem=control["sem"],
                      same_split_distance_pairs=control["per_pair"])
    record.update(proximity(samples, members, train_sets, test_set, heldout_l2, cfg, seeds, nn=nn))
    return record


def score_record(models, members, train_sets, test_set, schedule, cfg: AuditConfig, seeds) -> dict:
    """The score-level twin similarity on training vs test inputs, per noise level in ``cfg.score_ts``."""
    twins, _ = model_pairs(members)
    x_train = [train_sets[split][: cfg.n_score_inputs].to(cfg.device) for split, _ in members]
    ordered = twins + [(b, a) for a, b in twins]
    sim = score_similarity(models, ordered, x_train, test_set[: cfg.n_score_inputs].to(cfg.device), list(cfg.score_ts),
                           schedule, seed=seeds.evaluation("score_inputs"), batch_size=cfg.eval_batch, device=cfg.device)
    return {"score_sim": {str(t): {"train": sim["train_mean"][i], "train_sem": sim["train_sem"][i],
                                   "test": sim["test_mean"][i], "test_sem": sim["test_sem"][i]}
                          for i, t in enumerate(sim["ts"])}}


def proximity(samples, members, train_sets, test_set, heldout_l2, cfg: AuditConfig, seeds, nn=nearest_neighbors) -> dict:
    """Nearest-neighbour proximity of each model's samples ``samples[m]`` ``(n_samples, C, H, W)`` to its own split,
    the other splits and a size-matched test slice; the memorized fraction and the data-copying z (docs/method.md
    §3). ``nn(samples, reference)``: :func:`~biasgen.images.metrics.nearest_neighbors`, or a class-restricted search
    on labelled sets (:func:`biasgen.images.conditional.nearest_in_class`)."""
    own, other, test_nn = [], [], []
    for m, (split, _) in enumerate(members):
        own.append(nn(samples[m], train_sets[split]))
        other.extend(nn(samples[m], train_sets[j]) for j in range(cfg.splits) if j != split)
        test_nn.append(nn(samples[m], test_set[: cfg.n]))  # size-matched to a split
    cat = lambda results, key: torch.cat([r[key] for r in results])
    fmem = memorized_fraction(cat(own, "l2"), cat(own, "l2_second"), n_boot=cfg.n_boot,
                              seed=seeds.evaluation("f_mem_bootstrap"))
    return dict(nn_own_sim=float(cat(own, "sim").mean()), nn_other_sim=float(cat(other, "sim").mean()),
                nn_test_sim=float(cat(test_nn, "sim").mean()), nn_own_l2=float(cat(own, "l2").mean()),
                nn_other_l2=float(cat(other, "l2").mean()), nn_test_l2=float(cat(test_nn, "l2").mean()),
                f_mem=fmem["value"], f_mem_ci=fmem["ci"],
                copy_z=float(sum(data_copying_z(o["l2"], h) for o, h in zip(own, heldout_l2)) / len(own)))


def loss_bands(records: list[dict], n_boot: int, seed: int) -> dict:
    """The test loss per noise band (docs/method.md §2, §12): ``tau_loss`` of each band, the train–test gap per
    band, and the band where the gap opens first.

    A band's gap ``test - train`` *opens* at the first checkpoint from which it stays above its level at the
    first three checkpoints by more than three times its own checkpoint noise (:func:`biasgen.drift.noise_sd`). The gap is largest, and opens first, at
    intermediate noise levels in diffusion models (Kaiser & Kollmann 2026): the average over t hides it.
    Returns JSON: ``bands`` (t ranges), ``tau_loss`` (step per band), ``gap`` (per band, per checkpoint),
    ``gap_opens`` (step per band or None), ``first_band`` (index of the band where it opens first, or None).
    """
    if not records or "train_loss_by_t" not in records[0]:
        return {}
    steps = [r["step"] for r in records]
    means = lambda key: np.array([[np.nan if v is None else v for v in r[key]["mean"]] for r in records], dtype=float).T
    test, train = means("test_loss_by_t"), means("train_loss_by_t")  # (bands, C)
    ok = np.isfinite(test).all(1) & np.isfinite(train).all(1)  # a band with no example has no curve
    gap = test - train
    taus, opens = [], []
    for b in range(len(test)):
        if not ok[b]:
            taus.append(None), opens.append(None)
            continue
        taus.append(checkpoint_minimum(steps, test[b], n_boot=n_boot, seed=seed)["step"])
        level = 3 * float(noise_sd(gap[b])) if len(steps) > 4 else 0.0
        above = gap[b] - gap[b][:3].mean() > level  # the two example sets differ a little from the start
        last_below = np.flatnonzero(~above)
        first = 0 if not len(last_below) else int(last_below[-1]) + 1
        opens.append(int(steps[first]) if first < len(steps) else None)
    candidates = [(step, b) for b, step in enumerate(opens) if step is not None]
    bins = records[0]["test_loss_by_t"]
    return {"bands": [[round(lo), round(hi)] for lo, hi in zip(bins["t_lo"], bins["t_hi"])], "tau_loss": taus,
            "gap": [[round(float(v), 6) for v in row] for row in gap], "gap_opens": opens,
            "first_band": min(candidates)[1] if candidates else None,
            "rule": "a band's test-minus-train gap opens at the first checkpoint from which it stays above its "
                    "early level (first 3 checkpoints) by more than 3x its checkpoint noise"}

