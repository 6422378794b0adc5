"""Twin bookkeeping shared by every twin experiment (the protocol: docs/method.md, "Twins").

A *member* is one model, ``(split, seed_index)``: ``K`` disjoint splits times
``S`` seeds per split. Model ``m`` starts from its own init seed (unless
``same_init``) and draws its own training noise (both from the run's
:class:`~biasgen.seeds.SeedPlan`); pairs of members on different splits are the
twins, pairs on the same split the seed-variance control.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import load_checkpoint
from .jobs import Backend
from .runs import progress_bar
from .seeds import SeedPlan
from .training import LossFn, train


def make_members(splits: int, seeds_per_split: int) -> list[tuple[int, int]]:
    """``[(split, seed_index), ...]`` in model order."""
    return [(i, s) for i in range(splits) for s in range(seeds_per_split)]


def model_pairs(members: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(twins, controls)``: index pairs of models on different splits, and on the same split."""
    twins, controls = [], []
    for a, b in itertools.combinations(range(len(members)), 2):
        (twins if members[a][0] != members[b][0] else controls).append((a, b))
    return twins, controls


def build_model(cls, kwargs: dict, seed: int) -> torch.nn.Module:
    """``cls(**kwargs)`` initialised from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kwargs)


def load_model(cls, kwargs: dict, stem: Path, device: str) -> torch.nn.Module:
    """``cls(**kwargs)`` with the weights of the checkpoint ``stem`` (``<stem>.safetensors``, e.g.
    :func:`biasgen.training.checkpoint_stem` of a model's folder and step), in eval mode on ``device``."""
    model = cls(**kwargs)
    load_checkpoint(stem, model)
    return model.to(device).eval()


def train_members(
    model_cls,  # the network class, e.g. UNet or SequenceDenoiser
    model_kwargs: dict,  # its constructor arguments (recorded in every sidecar)
    loss: LossFn,  # picklable loss(model, x0, gen), e.g. biasgen.losses.EpsMSELoss
    train_sets: Sequence[torch.Tensor],  # one training set per split
    members: list[tuple[int, int]],  # (split, seed_index) per model
    models_dir: Path,  # model m writes to models_dir / f"model{m}"
    *,
    seeds: SeedPlan,  # the run's seeds: model_init(m) and training(m)
    meta: dict,  # recorded in every sidecar, plus the model's split and seed index
    backend: Backend,  # where the models train: biasgen.jobs.LocalBackend (worker processes) or RayBackend
    device: str,  # torch device
    progress: bool,  # tqdm bars
    **train_kwargs,  # steps, batch_size, lr, checkpoints, grad_clip, ema_decay: see biasgen.training.train
) -> None:
    """Train (or resume) every model of a twin experiment on ``backend`` (local workers at a time, or as Ray places them).

    The training sets go to the workers once (``shared``), not with every model's job. Locally each
    model shows its own progress bar; Ray workers cannot draw one, so the Ray backend shows one bar
    of finished models instead.
    """
    bar_per_model = progress and backend.draws_bars
    jobs = [dict(model_cls=model_cls, model_kwargs=model_kwargs, init_seed=seeds.model_init(m),
                 loss=loss, split=split, device=device,
                 train_kwargs=dict(train_kwargs, seed=seeds.training(m), out_dir=Path(models_dir) / f"model{m}",
                                   meta={**meta, "split": split, "split_seed": s}, resume=True, progress=bar_per_model,
                                   desc=f"model {m + 1}/{len(members)} (split {split})",
                                   position=backend.bar_position(m)))
            for m, (split, s) in enumerate(members)]
    trained = backend.run(_train_member, jobs, list(train_sets))
    for _ in progress_bar(trained, progress and not bar_per_model, "training models", len(jobs)):
        pass


def _train_member(job: dict, train_sets: list[torch.Tensor]) -> None:
    """One model of :func:`train_members` (a worker job)."""
    model = build_model(job["model_cls"], job["model_kwargs"], job["init_seed"]).to(job["device"])
    data = train_sets[job["split"]].to(job["device"])
    train(model, job["loss"], data, **job["train_kwargs"])
