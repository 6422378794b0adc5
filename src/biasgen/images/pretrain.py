"""A fine-tune's base, pretrained on public data inside the fine-tune's run folder (``biasgen finetune --pretrain``).

    images = pretrain_images(cfg)                       # checked before the run folder exists
    stem = pretrain_base(experiment, run, images)       # RUN/base/step_<steps>.safetensors + .json

One network (the fine-tune's network settings: ``--base-width``, ``--channel-mults``, ...) is trained with the
image audit's loss on ``--pretrain-n`` images of the public data ``--pretrain`` (``--pretrain-classes``) for
``--pretrain-steps`` steps and saved as a biasgen checkpoint, which
:func:`biasgen.images.base_model.resolve_base` reads like any ``--base``. It is trained once: a resumed
fine-tune finds it finished and reuses it bit for bit; a pretraining killed mid-way continues from its last
quarter checkpoint.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import check
from ..pipeline import Data
from ..training import checkpoint_stem, train
from ..twins import build_model
from .data import keep_classes, load_images, scale_images

BASE_FOLDER = "base"  # inside the run folder


def pretrain_images(cfg) -> torch.Tensor:
    """``(pretrain_n, C, H, W)``: the public images, drawn with the run's seed and scaled as the fine-tune scales
    its private ones. ``cfg``: a :class:`biasgen.images.finetune.FinetuneConfig` with ``pretrain`` set."""
    classes = tuple(cfg.pretrain_classes)
    check(not (str(cfg.pretrain) == str(cfg.data) and (not classes or not cfg.classes or set(classes) & set(cfg.classes))),
          f"--pretrain {cfg.pretrain} is the private data --data {cfg.data} with overlapping classes: the base would "
          "see the private images; pass disjoint --pretrain-classes and --classes, or other public data.")
    pool = keep_classes(load_images(cfg.pretrain, data_dir=cfg.data_dir, resolution=cfg.resolution,
                                    grayscale=cfg.grayscale, center_crop=cfg.center_crop), classes).images
    check(len(pool) >= cfg.pretrain_n, f"--pretrain {cfg.pretrain} holds {len(pool)} images"
          + (f" of the classes {', '.join(map(str, classes))}" if classes else "")
          + f", fewer than --pretrain-n {cfg.pretrain_n}; lower --pretrain-n to at most {len(pool)}.")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.pretrain_n]
    return scale_images(pool[order], cfg.scaling)[0]


def pretrain_base(experiment, run: Path, images: torch.Tensor, *, progress: bool = True) -> Path:
    """Train (or finish, or reuse) the base of the fine-tune ``experiment`` in ``run/base``; returns its last
    checkpoint's stem. ``images``: :func:`pretrain_images`, ``(N, C, H, W)``."""
    from .audit import ImageAudit  # the audit's network and loss, not the fine-tune's (which wrap a base)

    cfg, seed = experiment.cfg, experiment.seeds.pretrain()
    model_class, kwargs = ImageAudit.network(experiment, Data(train=[images], test=images[:0], description={}))
    steps = cfg.pretrain_steps
    checkpoints = sorted({max(1, steps * q // 4) for q in (1, 2, 3, 4)})
    pretrain = {"data": str(cfg.pretrain), "classes": list(cfg.pretrain_classes), "n": int(len(images)),
                "steps": steps, "seed": seed}
    meta = {"config": {**dataclasses.asdict(cfg), "model": cfg.model}, "model": kwargs, "pretrain": pretrain}
    model = build_model(model_class, kwargs, seed).to(cfg.device)
    train(model, ImageAudit.loss(experiment), images.to(cfg.device), steps=steps, batch_size=cfg.batch_size,
          lr=cfg.lr, checkpoints=checkpoints, seed=seed, out_dir=run / BASE_FOLDER, meta=meta,
          grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, lr_schedule=cfg.lr_schedule, resume=True,
          progress=progress, desc="pretraining the base")
    return checkpoint_stem(run / BASE_FOLDER, steps)
