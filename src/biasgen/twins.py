"""Twin bookkeeping shared by the image audit and the hierarchical experiments (SPEC §2).

A *member* is one model, ``(split, seed_index)``: ``K`` disjoint splits times
``S`` seeds per split. Model ``m`` starts from its own init seed (unless
``same_init``) and draws its own training noise; pairs of members on different
splits are the twins, pairs on the same split the seed-variance control.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .training import checkpoint_stem


def make_members(splits: int, seeds_per_split: int) -> list[tuple[int, int]]:
    """``[(split, seed_index), ...]`` in model order."""
    return [(i, s) for i in range(splits) for s in range(seeds_per_split)]


def model_pairs(members: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(twins, controls)``: index pairs of models on different splits, and on the same split."""
    twins, controls = [], []
    for a, b in itertools.combinations(range(len(members)), 2):
        (twins if members[a][0] != members[b][0] else controls).append((a, b))
    return twins, controls


def init_seed(seed: int, m: int, same_init: bool) -> int:
    """The weight-init seed of model ``m`` (shared by all models with ``same_init``)."""
    return seed * 1000 + (0 if same_init else m + 1)


def training_seed(seed: int, m: int) -> int:
    """The seed of model ``m``'s batches, diffusion times, noise and dropout."""
    return seed * 1000 + 500 + m


def build_model(cls, kwargs: dict, seed: int) -> torch.nn.Module:
    """``cls(**kwargs)`` initialised from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs)


def load_model(cls, kwargs: dict, folder: Path, step: int, device: str) -> torch.nn.Module:
    """The model saved in ``folder`` at ``step``, in eval mode on ``device``."""
    model = cls(**kwargs)
    load_checkpoint(checkpoint_stem(folder, step), model)
    return model.to(device).eval()
