"""The keys of a metrics record: one line of a run's ``metrics.jsonl``, one checkpoint of all models.

    from biasgen.records import MetricRecord, ImageRecord, HierarchyRecord, MonitorRecord
    record: ImageRecord = {"step": 120, "test_loss": 0.31, ...}     # IMAGE_KEYS, HIERARCHY_KEYS: the key sets

``M`` is the number of models, ``P`` of twin pairs (models on different splits), ``P_c`` of
control pairs (models on the same split). Image losses are the mean squared noise-prediction
error per pixel (the training loss); image distances are on images in the run's scaling.
Hierarchy divergences and cross-entropies are in nats per sequence (summed over the
``2**depth`` positions), distances in positions (Hamming). What each diagnostic means:
docs/method.md. Readers that index a record by a key name it through these constants or
this type, so a renamed key is one edit here.
"""
from __future__ import annotations

from typing import Optional, TypedDict


class _Step(TypedDict, total=False):
    """The key every record holds."""

    step: int  # training step of the checkpoint


class ImageRecord(_Step, total=False):
    """One checkpoint of an image audit (``biasgen.images.audit``)."""

    test_loss: float  # frozen-noise test loss, mean over test images of the per-image mean over models
    test_loss_sem: float  # its standard error over test images
    test_loss_per_model: list[float]  # (M,) each model's frozen-noise test loss
    train_loss: float  # frozen-noise loss on each model's own split, mean over models and images
    test_loss_units: list[float]  # (n_test,) per-image test loss, mean over models (the units of the bootstrap)
    test_loss_by_t: dict  # test loss in 10 bins of t: {"t_lo", "t_hi", "mean" (None: empty bin), "count"}
    train_loss_by_t: dict  # the same on the training splits
    twin_distance: float  # twin cosine distance D_cos = 1 - mean cosine of samples from shared noise: median over pairs
    twin_distance_sem: float  # its standard error over pairs
    twin_distance_pairs: list[float]  # (P,) D_cos per twin pair
    twin_distance_samples: list[float]  # (n_samples,) 1 - c_j per shared noise j, mean over pairs
    same_split_distance: float  # D_cos of same-split (control) pairs, median; only with seeds_per_split > 1
    same_split_distance_sem: float  # its standard error over control pairs
    same_split_distance_pairs: list[float]  # (P_c,) D_cos per control pair
    nn_own_sim: float  # cosine similarity of a sample to its nearest image of the model's own split, mean
    nn_other_sim: float  # the same to the other splits
    nn_test_sim: float  # the same to a size-matched test slice
    nn_own_l2: float  # L2 distance of a sample to its nearest own-split image, mean
    nn_other_l2: float  # the same to the other splits
    nn_test_l2: float  # the same to the test slice
    f_mem: float  # memorized fraction: samples with d1/d2 < 1/3 to the own split, pooled over models
    f_mem_ci: list[float]  # [lo, hi] its bootstrap 95% interval
    copy_z: float  # data-copying z (negative: samples closer to training than held-out data), mean over models
    score_sim: dict  # {str(t): {"train", "train_sem", "test", "test_sem"}}: twins' score cosine similarity at t


class HierarchyRecord(_Step, total=False):
    """One checkpoint of the hierarchical lab (``biasgen.hierarchy.evaluation``)."""

    skl_test_pairs: list[float]  # (P,) symmetric KL between twins' x0 predictions on test inputs at t_c
    skl_train_pairs: list[float]  # (P,) the same on both twins' training inputs, averaged over the two
    skl_control_pairs: list[float]  # (P_c,) the same as skl_test_pairs for same-split pairs ([] without them)
    oracle_kl: list[list[float]]  # (M, depth + 1) KL(BP_k || model) at t_c on test inputs, k = 0..depth
    oracle_kl_along_t_test: list[list[list[float]]]  # (M, depth + 1, len(kl_steps)) KL(BP_k || model) along t, test
    oracle_kl_along_t_train: list[list[list[float]]]  # the same on each model's own training sequences
    kl_along_t: list[list[float]]  # (M, len(kl_steps)) KL(BP_0 || model) along t on test inputs (k = 0 alone)
    test_l: list[float]  # (M,) cross-entropy l on test inputs, each at its own frozen random t
    test_l_star: list[float]  # (M,) l* = -BP_0 . log model: distillation of the exact denoiser (the paper's Eq. 4)
    test_l_tilde: list[float]  # (M,) l~ = l - l*: data-dependent excess, negative on training data once memorizing
    train_l: list[float]  # (M,) l on each model's own split
    train_l_star: list[float]  # (M,)
    train_l_tilde: list[float]  # (M,)
    test_l_at_t: list[float]  # (M,) l with every input at the step of loss_t_frac
    test_l_star_at_t: list[float]  # (M,)
    test_l_tilde_at_t: list[float]  # (M,)
    train_l_at_t: list[float]  # (M,)
    train_l_star_at_t: list[float]  # (M,)
    train_l_tilde_at_t: list[float]  # (M,)
    d_nn: list[float]  # (M,) D_NN: divergence of generated sequences' nearest-training distances from test ones'
    gen_nn_hist: list[list[int]]  # (M, L + 1) counts of generated sequences at each Hamming distance to the own split
    gen_nn_mean: list[float]  # (M,) mean Hamming distance of a generated sequence to its nearest own-split sequence
    gen_copy_share: list[float]  # (M,) share of generated sequences that are exact copies of the own split
    gen_mem_share: list[float]  # (M,) share that are near-copies (d1/d2 < 1/3), exact copies included
    gen_grammatical: list[float]  # (M,) share of generated sequences the grammar can produce
    gen_logprob: list[Optional[float]]  # (M,) mean exact log-probability of the grammatical ones (None: none are)
    uturn_ratio_train: list[list[float]]  # (M, len(uturn_steps)) U-turn overlap model / BP on own training sequences
    uturn_ratio_train_sem: list[list[float]]  # its standard error over sequences
    uturn_ratio_test: list[list[float]]  # the same on test sequences
    uturn_ratio_test_sem: list[list[float]]
    uturn_random: list[list[float]]  # (M, len(random_uturn_steps)) U-turn overlap on uniformly random sequences
    uturn_random_sem: list[list[float]]


class MetricRecord(ImageRecord, HierarchyRecord, total=False):
    """A record of either experiment: what the shared readers (pipeline, report, judge) take."""


class MonitorRecord(TypedDict, total=False):
    """One check of ``biasgen.Monitor`` (a single model during its own training): a line of its ``metrics.jsonl``."""

    step: int  # training step of the check
    val_loss: float  # frozen-noise loss on the held-out images (the per-pixel noise-prediction error)
    val_loss_sem: float  # its standard error over images
    train_loss: float  # the same on a training slice of the same size
    train_loss_sem: float
    gap_by_t: dict  # per band of t: {"t_lo", "t_hi", "val", "train", "gap" (val - train; None: empty), "count"}
    nn_train_l2: float  # L2 distance of a sample to its nearest image of the training reference slice, mean
    nn_heldout_l2: float  # the same to the held-out reference slice
    nn_train_sim: float  # cosine similarity to the nearest training reference image, mean
    nn_heldout_sim: float  # the same, held-out
    copy_z: float  # data-copying z statistic (negative: samples closer to training than held-out data)
    f_mem: float  # memorized fraction: samples with d1/d2 < 1/3 to the whole training set
    f_mem_ci: list[float]  # [lo, hi] its bootstrap 95% interval
    flags: dict  # {"val_loss_minimum", "closer_to_train", "copies", "first_copies"}: bools (docs/your-model.md)
    wall_s: float  # seconds the check took


# the keys the hierarchical lab's curves and verdict pick by name
SKL_TEST_PAIRS, SKL_CONTROL_PAIRS, ORACLE_KL = "skl_test_pairs", "skl_control_pairs", "oracle_kl"
D_NN, TEST_L = "d_nn", "test_l"
GEN_MEM_SHARE, GEN_COPY_SHARE = "gen_mem_share", "gen_copy_share"

IMAGE_KEYS = frozenset(ImageRecord.__annotations__)
HIERARCHY_KEYS = frozenset(HierarchyRecord.__annotations__)
