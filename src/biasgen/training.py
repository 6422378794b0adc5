"""The training loop shared by the image audit and the hierarchical experiments.

One model, one training set, Adam, checkpoints at given steps. Everything random
in step ``s`` (batch indices, diffusion times, noise, dropout) is derived from
``(seed, s)``, so a run resumed after a kill is bit-identical to one that never
stopped. Layout of ``out_dir``::

    step_0000120.safetensors / .json   weights at each checkpoint (+ sidecar)
    state.safetensors / state.json     resume state: raw weights, Adam, EMA, step
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import load_tensors, optimizer_from_tensors, optimizer_to_tensors, save_tensors
from .errors import BiasgenError
from .runs import progress_bar
from .seeds import step_seed

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


def checkpoint_steps(total_steps: int, n_checkpoints: int, first: int = 1) -> list[int]:
    """About ``n_checkpoints`` log-spaced steps in ``[first, total_steps]``, unique, ending at ``total_steps``."""
    if total_steps < 1 or n_checkpoints < 1:
        raise BiasgenError("steps and checkpoints must both be at least 1.")
    first = min(max(1, first), total_steps)
    if n_checkpoints == 1:
        return [total_steps]
    grid = torch.logspace(math.log10(first), math.log10(total_steps), n_checkpoints, dtype=torch.float64)
    steps = sorted({int(round(float(s))) for s in grid} | {total_steps})
    return steps


def checkpoint_stem(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator that drives every random draw of training step ``step``."""
    return torch.Generator().manual_seed(step_seed(seed, step))


def completed_step(out_dir: Path) -> int:
    """The last step whose resume state is on disk in ``out_dir`` (0 if none)."""
    state = Path(out_dir) / "state.json"
    if not state.exists():
        return 0
    _, meta = load_tensors(Path(out_dir) / "state")
    return int(meta["step"])


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,  # loss_fn(model, x0_batch, generator) -> scalar loss
    data: torch.Tensor,  # (N, ...) this model's training set
    *,
    steps: int,  # optimisation steps in total
    batch_size: int,  # examples per step, drawn with replacement
    lr: float,  # Adam learning rate (the peak, with a schedule)
    checkpoints: Sequence[int],  # steps at which weights are saved (and the run can resume)
    seed: int,  # drives batches, times, noise and dropout
    out_dir: Path,  # this model's checkpoint folder
    meta: dict,  # recorded in every checkpoint's sidecar
    grad_clip: float | None = 1.0,  # max gradient norm, None for no clipping
    ema_decay: float | None = None,  # if set, checkpoints hold bias-corrected EMA weights (see below)
    lr_schedule: str = "constant",  # "constant" or "halve-cosine" (see lr_factor)
    resume: bool = True,  # continue from the state in out_dir if there is one
    progress: bool = True,  # show a tqdm bar
    desc: str = "",  # the bar's label
    position: int | None = None,  # the bar's line, when several processes train at once
) -> None:
    """Train ``model`` in place and write its checkpoints to ``out_dir``.

    (One loop, readable top to bottom; resume and saving are the helpers ``_resume`` and ``_save``.)

    Raises :class:`BiasgenError` on a non-finite loss; the last good checkpoint
    stays on disk and the message names it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = sorted(set(int(c) for c in checkpoints))
    if not checkpoints or checkpoints[-1] != steps:
        raise BiasgenError("The last checkpoint must be the final step.")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ema = ExponentialAverage(model, ema_decay) if ema_decay else None

    start = _resume(out_dir, model, opt, ema) if resume else 0
    if start >= steps:
        return

    bar = progress_bar(None, progress, desc or "training", total=steps, initial=start, position=position)
    model.train()
    last_good = max([c for c in checkpoints if c <= start], default=None)
    for step in range(start + 1, steps + 1):
        gen = step_generator(seed, step)
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # dropout
            loss = loss_fn(model, data[idx], gen)
        if not torch.isfinite(loss):
            where = f"checkpoint step {last_good} in {out_dir}" if last_good else "no checkpoint yet"
            raise BiasgenError(
                f"Training diverged: non-finite loss at step {step} ({desc or out_dir}). Last good: {where}. "
                "Lower --lr (or enable gradient clipping) and rerun into a new --out (this run's checkpoints stay); "
                "--force in this folder would delete them."
            )
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(lr_schedule, step, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if step in checkpoints:
            _save(out_dir, step, model, ema, opt, meta, loss.item())
            last_good = step
    if bar is not None:
        bar.close()


LR_SCHEDULES = ("constant", "halve-cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (1-based) of ``steps``.

    ``constant``: 1. ``halve-cosine``: 1 for the first half of training, 0.5 for the next quarter, then a
    cosine decay from 0.5 to 0.1 over the last quarter: the shape of the hierarchical experiments' schedule in
    the paper's code (constant, halved, cosine decay to 0.1x); the breakpoints at 1/2 and 3/4 are biasgen's.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "halve-cosine":
        raise BiasgenError(f"Unknown learning-rate schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}.")
    x = step / steps
    if x <= 0.5:
        return 1.0
    if x <= 0.75:
        return 0.5
    return 0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi * (x - 0.75) / 0.25))


class ExponentialAverage:
    """Bias-corrected exponential moving average of a model's parameters, as Adam corrects its moments.

    After ``s`` updates with weights ``w_1..w_s`` the average is
    ``sum_i (1 - d) d^(s - i) w_i / (1 - d^s)``: a weighted mean of the weights
    seen so far. Without the correction the initial weights would keep the
    share ``d^s`` (82% at step 20 for ``d = 0.99``), so early checkpoints
    would mostly show the random init. Buffers are taken from the live model.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.step = float(decay), 0
        self.sums = {k: torch.zeros_like(v) for k, v in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        for k, v in model.named_parameters():
            self.sums[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its corrected average."""
        correction = 1 - self.decay ** self.step
        return {k: self.sums[k] / correction if k in self.sums else v for k, v in model.state_dict().items()}

    def load(self, sums: dict[str, torch.Tensor], step: int) -> None:
        if set(sums) != set(self.sums):
            raise KeyError(f"EMA state holds {sorted(set(sums) ^ set(self.sums))[:3]} ...")
        self.sums, self.step = {k: v.clone() for k, v in sums.items()}, step


def _resume(out_dir: Path, model, opt, ema) -> int:
    """Load the resume state in ``out_dir`` into ``model``, ``opt`` and ``ema``; returns its step (0 if none)."""
    start = completed_step(out_dir)
    if start:
        tensors, state = load_tensors(out_dir / "state")
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            optimizer_from_tensors(opt, tensors, state["optimizer"])
            if ema is not None:
                ema.load({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, start)
        except (RuntimeError, ValueError, KeyError) as e:
            raise BiasgenError(
                f"Cannot resume from {out_dir / 'state'}: it does not match this model or optimizer ({str(e)[:200]}). "
                "Resume with the config recorded in its run.json, or start over in a new --out; --force here would "
                "delete the trained models."
            ) from e
    return start


def _save(out_dir: Path, step: int, model, ema, opt, meta: dict, loss: float) -> None:
    """Write the checkpoint at ``step``, then the resume state (in that order, so the state never runs ahead)."""
    weights = ema.weights(model) if ema is not None else model.state_dict()
    save_tensors(checkpoint_stem(out_dir, step), weights, {**meta, "step": step, "batch_loss": loss, "ema": ema is not None})
    opt_tensors, opt_info = optimizer_to_tensors(opt)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.sums.items()})
    save_tensors(out_dir / "state", tensors, {"step": step, "optimizer": opt_info})
