"""Benchmark of `biasgen hierarchy`: training steps/s and the evaluation share of a preset.

    python bench/bench_hierarchy_experiment.py                  # the cpu preset, with the preset's threads
    python bench/bench_hierarchy_experiment.py --preset paper --device cuda

Times a short stretch of training of one model, the one-off reference
computation (BP on every evaluation input) and the evaluation of one checkpoint
of all models, then extrapolates to the whole preset. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from biasgen.config import build_config
from biasgen.hierarchy.experiment import PRESETS, HierarchyConfig, HierarchyExperiment, evaluate_checkpoint
from biasgen.jobs import resolve_workers, torch_threads
from biasgen.losses import X0CrossEntropyLoss
from biasgen.schedule import NoiseSchedule
from biasgen.training import checkpoint_steps, train
from biasgen.twins import build_model, make_members


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--train-steps", type=int, default=200, help="steps timed (of one model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="override the preset's torch threads (0: torch default)")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("device", args.device), ("threads", args.threads)) if v is not None}
    cfg = build_config(HierarchyConfig, PRESETS, args.preset, None, overrides)
    with torch_threads(cfg.threads):
        measure(cfg, args)


def measure(cfg: HierarchyConfig, args) -> None:
    experiment = HierarchyExperiment(cfg)
    schedule = NoiseSchedule.onehot(cfg.T)
    data = experiment.load()
    members = make_members(cfg.splits, cfg.seeds_per_split)
    models = [build_model(*experiment.network(data), seed=m + 1).to(cfg.device) for m in range(len(members))]

    with tempfile.TemporaryDirectory() as tmp:
        n = args.train_steps
        t0 = time.perf_counter()
        train(models[0], X0CrossEntropyLoss(schedule, cfg.q), data.train[0].to(cfg.device), steps=n,
              batch_size=cfg.batch_size, lr=cfg.lr, checkpoints=[n], seed=0, out_dir=Path(tmp), meta={}, progress=False)
        train_s = time.perf_counter() - t0
    steps_per_s = n / train_s

    t0 = time.perf_counter()
    ref = experiment.reference(data, members)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        evaluate_checkpoint([m.eval() for m in models], members, ref, cfg, experiment.seeds)
    ckpt_s = time.perf_counter() - t0

    n_ckpt = len(checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint))
    workers = min(resolve_workers(cfg.workers, cfg.device), len(members))  # models trained at once, one per core
    total_train = cfg.steps * len(members) / steps_per_s / workers
    total_eval = ref_s + n_ckpt * ckpt_s
    print(f"## biasgen hierarchy --preset {args.preset}  (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {cfg.device})\n")
    print("| quantity | value |\n|---|---|")
    print(f"| models x steps | {len(members)} x {cfg.steps} (batch {cfg.batch_size}, {cfg.layers} layers x {cfg.width}) |")
    print(f"| training steps/s (one model) | {steps_per_s:.1f} |")
    print(f"| reference (BP on all evaluation inputs, once) | {ref_s:.1f} s |")
    print(f"| evaluation of one checkpoint, all models | {ckpt_s:.1f} s |")
    print(f"| projected training ({workers} worker processes) | {total_train / 60:.1f} min |")
    print(f"| projected evaluation ({n_ckpt} checkpoints) | {total_eval / 60:.1f} min |")
    print(f"| evaluation share | {total_eval / (total_eval + total_train):.0%} |")
    print(f"| projected total | {(total_train + total_eval) / 60:.1f} min |")


if __name__ == "__main__":
    main()
