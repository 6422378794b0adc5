"""Batched training of several models of one architecture vs one process per model (today's job runner).

    python bench/bench_batched_training.py                   # digits U-Net and hierarchy transformer, 4 models
    python bench/bench_batched_training.py --steps 300 --repeats 2

A sweep trains many small models. Today each model is one job of
``biasgen.jobs.LocalBackend`` (one worker process per CPU core, one thread each).
The alternative is PyTorch's model-ensembling recipe: stack the weights of the
M models (``torch.func.stack_module_state``), run one ``vmap`` of
``functional_call`` over them, and step one Adam over the stacked weights
(Adam is elementwise, so that is M independent Adams). Every model draws its
batches, diffusion times and noise from its own per-step generator exactly as
``biasgen.training.train`` does, and its gradient is clipped by its own norm,
so with dropout off the batched models must match the per-process ones up to
float rounding; with dropout on, the batched path cannot reproduce the
per-model dropout masks (vmap draws them from one generator).

For each architecture (the default sweep's U-Net on 8x8 digits; the cpu
preset's transformer on grammar sequences) it times, side by side, ``--steps``
steps of M models: (a) ``train_members`` with one worker process per core,
(b) batched in one process with torch's default threads, and compares the
weights after the first step (the same computation must agree to float
rounding there) and after the last (Adam divides by the gradient's running
size, so rounding differences grow over steps; ``--gradients-only`` compares
the step-1 gradients themselves). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from biasgen.checkpoint import load_tensors
from biasgen.hierarchy.experiment import HierarchyExperiment
from biasgen.images.audit import ImageAudit
from biasgen.jobs import LocalBackend
from biasgen.losses import EpsMSELoss, X0CrossEntropyLoss
from biasgen.schedule import NoiseSchedule
from biasgen.training import checkpoint_stem, step_generator
from biasgen.twins import build_model, make_members, train_members


def setups(dropout: float) -> dict:
    """Per architecture: the experiment (at the default sweep's size 64), its loss and the batch inputs maker."""
    audit = ImageAudit.from_settings("default", n=64, splits=2, seeds_per_split=2, dropout=dropout, ema_decay=None)
    hier = HierarchyExperiment.from_settings("cpu", n=64, splits=2, seeds_per_split=2, ema_decay=None)
    images = NoiseSchedule.from_name("linear", audit.cfg.T)
    onehot = NoiseSchedule.onehot(hier.cfg.T)
    return {
        "digits U-Net": (audit, EpsMSELoss(images), lambda x0, gen: image_inputs(x0, gen, images)),
        "hierarchy transformer": (hier, X0CrossEntropyLoss(onehot, hier.cfg.q),
                                  lambda x0, gen: sequence_inputs(x0, gen, onehot, hier.cfg.q)),
    }


def image_inputs(x0, gen, schedule):
    """The draws of ``EpsMSELoss``: ``(x_t, t, target eps)``."""
    t = torch.randint(1, schedule.T, (len(x0),), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return schedule.add_noise(x0, eps, t), t, eps


def sequence_inputs(x0, gen, schedule, q):
    """The draws of ``X0CrossEntropyLoss``: ``(x_t, t, target tokens)``."""
    t = torch.randint(1, schedule.T, (len(x0),), generator=gen)
    onehot = F.one_hot(x0, q).float()
    eps = torch.randn(onehot.shape, generator=gen)
    return schedule.add_noise(onehot, eps, t), t, x0


def batched_loss(forward, params, buffers, train_sets, seeds, step: int, batch_size: int, make_inputs) -> torch.Tensor:
    """The sum over models of each model's loss at ``step``, with the draws of ``biasgen.training.train``."""
    xs, ts, targets = [], [], []
    for data, seed in zip(train_sets, seeds):
        gen = step_generator(seed, step)
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        torch.randint(2**62, (1,), generator=gen)  # the dropout seed of the per-model loop
        x, t, target = make_inputs(data[idx], gen)
        xs.append(x), ts.append(t), targets.append(target)
    out = forward(params, buffers, torch.stack(xs), torch.stack(ts))
    target = torch.stack(targets)
    if target.dtype == torch.long:  # cross-entropy per model
        return F.cross_entropy(out.flatten(0, 2), target.flatten(), reduction="none").view(len(xs), -1).mean(1).sum()
    return ((out - target) ** 2).flatten(1).mean(1).sum()


def gradient_check(experiment, loss_fn, make_inputs) -> float:
    """Largest gradient difference at step 1, batched vs each model through its biasgen loss, relative to the
    largest gradient entry of the same tensor (float32 rounding: about 1e-6)."""
    cfg = experiment.cfg
    data = experiment.load()
    members = make_members(cfg.splits, cfg.seeds_per_split)
    model_cls, kwargs = experiment.network(data)
    models = [build_model(model_cls, kwargs, experiment.seeds.model_init(m)) for m in range(len(members))]
    seeds, train_sets = [experiment.seeds.training(m) for m in range(len(members))], [data.train[s] for s, _ in members]
    per_model = []
    for model, x0, seed in zip(models, train_sets, seeds):
        model.train()
        gen = step_generator(seed, 1)
        idx = torch.randint(len(x0), (cfg.batch_size,), generator=gen)
        torch.randint(2**62, (1,), generator=gen)
        loss_fn(model, x0[idx], gen).backward()
        per_model.append({k: p.grad for k, p in model.named_parameters()})
    params, buffers = stack_module_state(models)
    base = model_cls(**kwargs).to("meta")
    forward = vmap(lambda p, b, x, t: functional_call(base, (p, b), (x, t)))
    batched_loss(forward, params, buffers, train_sets, seeds, 1, cfg.batch_size, make_inputs).backward()
    return max(float((g - params[k].grad[m]).abs().max() / g.abs().max()) for m, grads in enumerate(per_model)
               for k, g in grads.items())


def batched_train(model_cls, kwargs, inits, train_sets, seeds, *, steps, batch_size, lr, grad_clip, make_inputs,
                  dropout: bool) -> dict[int, list[dict]]:
    """Train ``len(inits)`` models as one vmapped computation; ``{1: weights after step 1, steps: final}``."""
    models = [build_model(model_cls, kwargs, s) for s in inits]
    params, buffers = stack_module_state(models)
    base = model_cls(**kwargs).to("meta")
    base.train()
    forward = vmap(lambda p, b, x, t: functional_call(base, (p, b), (x, t)), randomness="different" if dropout else "error")
    opt = torch.optim.Adam(params.values(), lr=lr)
    snapshots = {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        batched_loss(forward, params, buffers, train_sets, seeds, step, batch_size, make_inputs).backward()
        if grad_clip:  # each model by its own gradient norm, as clip_grad_norm_ does per model
            norms = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params.values()], 1).norm(dim=1)
            scale = (grad_clip / (norms + 1e-6)).clamp(max=1.0)
            for p in params.values():
                p.grad.mul_(scale.view(-1, *[1] * (p.ndim - 1)))
        opt.step()
        if step in (1, steps):
            snapshots[step] = [{k: v[m].detach().clone() for k, v in params.items()} for m in range(len(inits))]
    return snapshots


def per_model(experiment, data, members, loss_fn, steps: int, workers: int) -> tuple[float, list, list]:
    """Today's path: ``train_members`` (``workers`` processes, one model each).

    Returns ``(seconds, weights after step 1, weights after the last step)``, one state dict per model.
    """
    cfg = experiment.cfg
    model_cls, kwargs = experiment.network(data)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_members(model_cls, kwargs, loss_fn, data.train, members, Path(tmp), seeds=experiment.seeds,
                      meta={}, backend=LocalBackend(workers), device="cpu", progress=False, steps=steps, batch_size=cfg.batch_size,
                      lr=cfg.lr, checkpoints=[1, steps], grad_clip=cfg.grad_clip, ema_decay=None)
        seconds = time.perf_counter() - t0
        first, last = ([load_tensors(checkpoint_stem(Path(tmp) / f"model{m}", s))[0] for m in range(len(members))]
                       for s in (1, steps))
    return seconds, first, last


def max_diff(a: list[dict], b: list[dict]) -> float:
    """Largest |a - b| over the parameters of every model (``b``: parameters only, ``a`` may hold buffers too)."""
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b) for k in y)


def measure(name, experiment, loss_fn, make_inputs, steps: int, workers: int) -> dict:
    """Time both paths on the same models and compare their weights after step 1 and after the last step."""
    cfg = experiment.cfg
    data = experiment.load()
    members = make_members(cfg.splits, cfg.seeds_per_split)
    model_cls, kwargs = experiment.network(data)
    per_process_s, first, last = per_model(experiment, data, members, loss_fn, steps, workers)
    t0 = time.perf_counter()
    batched = batched_train(model_cls, kwargs, [experiment.seeds.model_init(m) for m in range(len(members))],
                            [data.train[s] for s, _ in members],
                            [experiment.seeds.training(m) for m in range(len(members))], steps=steps,
                            batch_size=cfg.batch_size, lr=cfg.lr, grad_clip=cfg.grad_clip, make_inputs=make_inputs,
                            dropout=cfg.dropout > 0)
    batched_s = time.perf_counter() - t0
    return {"name": name, "models": len(members), "steps": steps, "dropout": cfg.dropout, "per_process_s": per_process_s,
            "batched_s": batched_s, "diff_first": max_diff(first, batched[1]), "diff_last": max_diff(last, batched[steps]),
            "scale": max(float(v.abs().max()) for v in last[0].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="training steps of every model")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two paths this many times (best time kept)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes of the per-process path")
    ap.add_argument("--gradients-only", action="store_true", help="only compare the step-1 gradients (seconds)")
    args = ap.parse_args()
    if args.gradients_only:
        for name, (experiment, loss_fn, make_inputs) in setups(0.0).items():
            print(f"{name}: step-1 gradients, batched vs per model: max relative difference "
                  f"{gradient_check(experiment, loss_fn, make_inputs):.1e}")
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads in the batched "
          f"process, {args.workers} worker processes (1 thread each) in the per-process path\n")
    print("| model | dropout | models x steps | one process per model (s) | batched, one process (s) | ratio | "
          "max abs weight diff after step 1 | after the last step |")
    print("|---|---|---|---|---|---|---|---|")
    for dropout in (0.0, 0.1):
        for name, (experiment, loss_fn, make_inputs) in setups(dropout).items():
            if dropout and experiment.cfg.dropout == 0:
                continue  # the transformer preset trains without dropout
            runs = [measure(name, experiment, loss_fn, make_inputs, args.steps, args.workers)
                    for _ in range(args.repeats)]
            r = runs[0] | {k: min(x[k] for x in runs) for k in ("per_process_s", "batched_s")}
            print(f"| {name} | {r['dropout']} | {r['models']} x {r['steps']} | {r['per_process_s']:.1f} | "
                  f"{r['batched_s']:.1f} | {r['per_process_s'] / r['batched_s']:.2f}x | {r['diff_first']:.1e} | "
                  f"{r['diff_last']:.1e} (weights up to {r['scale']:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
