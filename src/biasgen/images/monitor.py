"""A monitor for one training run, called from any training loop (docs/your-model.md).

    monitor = biasgen.Monitor(train_images, heldout_images, out="runs/mon")   # (N, C, H, W), as the model sees them
    for step in range(1, steps + 1):
        ...                                                                    # your optimisation step
        if step % 500 == 0:
            record = monitor.check(step, model)    # a torch eps-predictor, a diffusers UNet2DModel, or any callable

Every check measures, on fixed inputs (the same at every check):
- the frozen-noise denoising loss on held-out images (the validation loss) and on
  as many training images, overall and per band of the diffusion step t, and their
  gap per band (validation minus training);
- samples from fixed shared noise (one generator per sample; DDIM with 50 steps by default),
  their nearest-neighbour proximity to the training images vs to as many held-out
  images, the data-copying z (Meehan et al. 2020) and the memorized fraction f_mem
  with its bootstrap CI;
and raises three flags: the validation loss is at its minimum so far; samples sit
significantly closer to the training data than fresh data does (z below
``-copy_z_threshold``); f_mem is above zero (CI lower bound > 0), the first time.

The run folder holds ``run.json`` (kind ``monitor``: config, seeds, data, versions),
``metrics.jsonl`` (one record per check), ``summary.json``, ``samples/`` and the
figures ``fig_monitor.png`` and ``fig_monitor_gallery.png``. A Monitor re-created
on the same folder continues it; a check at an already-recorded step is skipped.
Checks leave the model's train/eval mode and the global random state as they were.

The settings of the measurement are one :class:`MonitorConfig` (also the flags of
``biasgen monitor``, which runs the same checks over a folder of saved checkpoints:
:mod:`biasgen.images.monitor_command`). While it lives, a Monitor holds its folder's
lock (:class:`biasgen.runs.RunLock`; :meth:`Monitor.close` releases it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import load_tensors, save_tensors
from ..config import ReadsInputs, check, check_at_least, opt
from ..errors import BiasgenError
from .metrics import data_copying_z, frozen_noise_loss, loss_by_t, memorized_fraction, nearest_neighbors
from ..runs import STEP, append_jsonl, claim_run_dir, read_json, read_jsonl, write_json
from ..sampler import sample, timesteps, x0_from_eps_model
from ..schedule import NoiseSchedule
from ..seeds import SeedPlan

RUNTIME_KEYS = ("device", "batch_size", "figures", "verbose", "value_range")  # may change when a run continues
FLAG_TEXT = {
    "val_loss_minimum": "validation loss at its minimum so far",
    "closer_to_train": "samples closer to training than to held-out data (significant)",
    "first_copies": "first copies",
}
GALLERY_SIZE = 10
MONITOR_STREAMS = ("monitor_loss", "monitor_loss_heldout", "monitor_loss_train", "monitor_reference_heldout",
                   "monitor_reference_train", "f_mem_bootstrap")  # the named seeds (biasgen.seeds) a monitor uses


@dataclasses.dataclass
class MonitorConfig(ReadsInputs):
    """What a monitor measures at each check; every field is also a flag of ``biasgen monitor``."""

    n_samples: int = opt(64, "samples per check, from fixed shared noise")
    sampler: str = opt("ddim", "ddim (deterministic) or ddpm (ancestral)")
    sample_steps: int | None = opt(50, "sampling steps, evenly spaced from T to 1 (none: all T)")
    clip: float | None = opt(1.0, "clamp of the predicted clean image while sampling (none for data not in [-1, 1])")
    n_loss: int = opt(512, "held-out and training images in the frozen-noise losses (at most)")
    loss_bands: int = opt(10, "equal-width bands of t for the loss per noise level")
    copy_z_threshold: float = opt(2.0, "flag samples as closer to the training data when the copying z < -threshold")
    n_boot: int = opt(1000, "bootstrap resamples of the f_mem interval")
    seed: int = opt(0, "seed of every fixed input: loss noise, sample noise, subsets, bootstrap")
    device: str | None = opt(None, "where the model runs (none: the model's own device)")
    batch_size: int = opt(256, "images per forward pass")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(self.sampler in ("ddim", "ddpm"), f"--sampler must be ddim or ddpm, got {self.sampler!r}.")
        check_at_least(self, 1, "n_samples", "n_loss", "loss_bands", "batch_size")
        check_at_least(self, 0, "n_boot")
        check(self.clip is None or self.clip > 0, f"--clip must be positive (or none), got {self.clip}.")


def monitor_config(config: MonitorConfig | None, settings: dict) -> MonitorConfig:
    """``config`` (default: the defaults) with the keyword ``settings`` replaced, validated."""
    config = config or MonitorConfig()
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise BiasgenError(f"Unknown monitor setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}.")
    return dataclasses.replace(config, **settings)


def _images(x, name: str) -> torch.Tensor:
    """``x`` as float32 ``(N, C, H, W)`` on the CPU, or a BiasgenError naming ``name``."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim != 4 or len(x) < 2:
        raise BiasgenError(f"{name} must be at least 2 images of shape (N, C, H, W), got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise BiasgenError(f"{name} holds NaN or infinite values; pass finite pixel values.")
    return x.contiguous()


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()


def count_overlap(train: torch.Tensor, heldout: torch.Tensor) -> int:
    """How many held-out images ``(M, ...)`` are byte-identical to some training image ``(N, ...)``."""
    seen = {row.tobytes() for row in train.reshape(len(train), -1).numpy()}
    return sum(row.tobytes() in seen for row in heldout.reshape(len(heldout), -1).numpy())


def _subset(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images of ``x`` chosen by a permutation seeded with ``seed``."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def reference_sets(train: torch.Tensor, heldout: torch.Tensor, seeds: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The monitor's size-matched nearest-neighbour references ``(ref_train, ref_heldout)``.

    ``train``: ``(N, C, H, W)``, ``heldout``: ``(M, C, H, W)``; ``seeds``: a monitor run's seeds (its ``run.json`` →
    ``seeds``). Returns two seeded subsets of ``min(N, M)`` images each, the same at every check, so a sample's
    distance to its nearest training image and to its nearest held-out image compare on equal terms.
    """
    n_ref = min(len(train), len(heldout))
    return (_subset(train, n_ref, seeds["monitor_reference_train"]),
            _subset(heldout, n_ref, seeds["monitor_reference_heldout"]))


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode for a torch module and a private global RNG state; both restored afterwards (each submodule's mode)."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if modes:
        model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, training in modes:
            m.training = training


def _eps_model(model) -> Callable:
    """``model`` as an eps-predictor ``(x_t, t in 1..T) -> eps_hat``: a diffusers UNet2DModel is wrapped."""
    from .diffusers_model import DiffusersEps, is_unet2d

    if is_unet2d(model):
        return DiffusersEps(unet=model)
    if not callable(model):
        raise BiasgenError(f"monitor.check needs a model or callable (x_t, t) -> eps_hat, got {type(model).__name__}.")
    return model


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


class Monitor:
    """Single-run signals of biased generalization and memorization; see the module docstring."""

    def __init__(
        self,
        train_images,  # (N, C, H, W) the training images, scaled as the model sees them (e.g. [-1, 1])
        heldout_images,  # (M, C, H, W) images the model never trains on, same scaling
        out: str | Path = "runs/monitor",  # run folder
        config: MonitorConfig | None = None,  # what to measure (default: MonitorConfig())
        *,
        schedule: NoiseSchedule | None = None,  # the training noise schedule (default: linear, T=1000)
        value_range: tuple[float, float] = (-1.0, 1.0),  # pixel range of the images, for the gallery
        figures: bool = True,  # redraw the figures at every check
        verbose: bool = True,  # print one line per check
        force: bool = False,  # delete the monitor run in `out` and start over
        meta: dict | None = None,  # extra JSON settings that define the run (recorded in run.json)
        inputs: Sequence[str | Path] = (),  # files and folders the run reads: `out` may not overlap them
        **settings,  # MonitorConfig fields, replacing those of `config` (e.g. n_samples=128)
    ):
        cfg = self.cfg = monitor_config(config, settings)
        self.train = _images(train_images, "train_images")
        self.heldout = _images(heldout_images, "heldout_images")
        if self.train.shape[1:] != self.heldout.shape[1:]:
            raise BiasgenError(f"Training images {tuple(self.train.shape[1:])} and held-out images "
                               f"{tuple(self.heldout.shape[1:])} differ in shape; give both the same size and channels.")
        self.schedule = schedule or NoiseSchedule.linear()
        timesteps(self.schedule, cfg.sample_steps)  # a clear error now for a step count outside [1, T]
        self.value_range, self.figures, self.verbose = value_range, figures, verbose

        overlap = count_overlap(self.train, self.heldout)
        if overlap:
            warnings.warn(f"{overlap} of the {len(self.heldout)} held-out images are exact copies of training images: "
                          "the validation loss and the data-copying test then understate the gap. Remove them from "
                          "the held-out set.", stacklevel=2)
        stored = dict(
            train={"n": len(self.train), "shape": list(self.train.shape[1:]), "sha1": _digest(self.train)},
            heldout={"n": len(self.heldout), "shape": list(self.heldout.shape[1:]), "sha1": _digest(self.heldout)},
            schedule={"name": self.schedule.name, "T": self.schedule.T,
                      "betas_sha1": _digest(self.schedule.betas.float())},
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MonitorConfig)},
            value_range=list(value_range), meta=meta or {}, figures=figures, verbose=verbose,
        )
        stored["sample_steps"] = cfg.sample_steps or self.schedule.T
        self.out, self.lock = claim_run_dir(out, stored, resume=True, force=force, kind="monitor",
                                            runtime_keys=RUNTIME_KEYS, inputs=inputs)
        plan = SeedPlan(cfg.seed)
        self.seeds = {name: plan.evaluation(name) for name in MONITOR_STREAMS}
        self.seeds["sample_noise"] = plan.describe(0)["sample_noise"]
        run = read_json(self.out / "run.json")
        if "seeds" not in run:
            data = {"overlap": overlap, "n_train": len(self.train), "n_heldout": len(self.heldout)}
            write_json(self.out / "run.json", {**run, "seeds": self.seeds, "data": data})

        # fixed inputs, the same at every check: loss subsets (paired: image i of both gets the same t and noise),
        # size-matched nearest-neighbour references, the held-out images' distances to the training set
        n = min(cfg.n_loss, len(self.train), len(self.heldout))
        self.loss_heldout = _subset(self.heldout, n, self.seeds["monitor_loss_heldout"])
        self.loss_train = _subset(self.train, n, self.seeds["monitor_loss_train"])
        self.ref_train, self.ref_heldout = reference_sets(self.train, self.heldout, self.seeds)
        self.heldout_l2 = nearest_neighbors(self.ref_heldout, self.train)["l2"]
        self.sample_seeds = plan.sample_seeds(cfg.n_samples)

    def close(self) -> None:
        """Release the run folder's lock (:class:`biasgen.runs.RunLock`), so another Monitor may continue it;
        the lock is also released when the process ends."""
        self.lock.release()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- records ---------------------------------------------------------------------------------
    @property
    def records(self) -> list[dict]:
        """Every check recorded so far, in step order."""
        return sorted(read_jsonl(self.out / "metrics.jsonl", STEP), key=lambda r: r["step"])

    @property
    def steps(self) -> set[int]:
        """The steps already recorded."""
        return {r["step"] for r in read_jsonl(self.out / "metrics.jsonl", STEP)}

    # -- one check ------------------------------------------------------------------------------
    def check(self, step: int, model) -> dict:
        """Measure ``model`` at training step ``step``; returns the record appended to ``metrics.jsonl``.

        (Long on purpose: one measurement per block, in the order of the record it writes.)

        ``model``: a ``torch.nn.Module`` or callable ``(x_t (B, C, H, W), t (B,) long in 1..T) -> eps_hat``,
        or a diffusers ``UNet2DModel`` (its timesteps ``0..T-1`` are handled). A step already recorded is
        not measured again: its stored record is returned.
        """
        step = int(step)
        done = {r["step"]: r for r in self.records}
        if step in done:
            return done[step]
        started = time.time()
        eps = _eps_model(model)
        device = self.cfg.device or _device_of(model)
        shape = tuple(self.train.shape[1:])
        with _evaluating(model):
            val = frozen_noise_loss(eps, self.loss_heldout, self.schedule, seed=self.seeds["monitor_loss"],
                                    batch_size=self.cfg.batch_size, device=device)
            tr = frozen_noise_loss(eps, self.loss_train, self.schedule, seed=self.seeds["monitor_loss"],
                                   batch_size=self.cfg.batch_size, device=device)
            samples = sample(x0_from_eps_model(eps, self.schedule, clip=self.cfg.clip), self.schedule, shape,
                             self.sample_seeds, method=self.cfg.sampler, steps=self.cfg.sample_steps,
                             batch_size=self.cfg.batch_size, device=device)
        if not bool(torch.isfinite(samples).all()) or not torch.isfinite(val["per_example"]).all():
            raise BiasgenError(f"The model gives NaN or infinite outputs at step {step}: training has diverged.")

        nn_full = nearest_neighbors(samples, self.train)
        nn_train, nn_heldout = nearest_neighbors(samples, self.ref_train), nearest_neighbors(samples, self.ref_heldout)
        f_mem = memorized_fraction(nn_full["l2"], nn_full["l2_second"], n_boot=self.cfg.n_boot,
                                   seed=self.seeds["f_mem_bootstrap"])
        val_t = loss_by_t(val["per_example"], val["t"], n_bins=self.cfg.loss_bands, T=self.schedule.T)
        train_t = loss_by_t(tr["per_example"], tr["t"], n_bins=self.cfg.loss_bands, T=self.schedule.T)
        record = {
            "step": step,
            "val_loss": val["mean"],
            "val_loss_sem": float(val["per_example"].std() / len(val["per_example"]) ** 0.5),
            "train_loss": tr["mean"],
            "train_loss_sem": float(tr["per_example"].std() / len(tr["per_example"]) ** 0.5),
            "gap_by_t": {"t_lo": val_t["t_lo"], "t_hi": val_t["t_hi"], "val": val_t["mean"], "train": train_t["mean"],
                         "gap": [None if v is None or t is None else v - t for v, t in zip(val_t["mean"], train_t["mean"])],
                         "count": val_t["count"]},
            "nn_train_l2": float(nn_train["l2"].mean()),
            "nn_heldout_l2": float(nn_heldout["l2"].mean()),
            "nn_train_sim": float(nn_train["sim"].mean()),
            "nn_heldout_sim": float(nn_heldout["sim"].mean()),
            "copy_z": data_copying_z(nn_full["l2"], self.heldout_l2),
            "f_mem": f_mem["value"],
            "f_mem_ci": f_mem["ci"],
        }
        record["flags"] = self._flags(record, [r for s, r in done.items() if s < step])
        record["wall_s"] = round(time.time() - started, 2)

        # the samples first, then the record: a record on disk means the check is complete
        save_tensors(self.out / "samples" / f"step_{step:07d}", {"samples": samples},
                     {"step": step, "sampler": self.cfg.sampler, "seeds": self.seeds["sample_noise"]})
        append_jsonl(self.out / "metrics.jsonl", record)
        write_json(self.out / "summary.json", summarize(self.records))
        if self.figures:
            self.plot()
        if self.verbose:
            print(describe(record), file=sys.stderr)
        return record

    def _flags(self, record: dict, earlier: Sequence[dict]) -> dict:
        """The flags of ``record`` given the records of earlier steps."""
        copies = record["f_mem_ci"][0] > 0
        return {
            "val_loss_minimum": all(record["val_loss"] <= r["val_loss"] for r in earlier),
            "closer_to_train": record["copy_z"] < -self.cfg.copy_z_threshold,
            "copies": copies,
            "first_copies": copies and not any(r["flags"]["copies"] for r in earlier),
        }

    def plot(self) -> None:
        """Draw ``fig_monitor.png`` from every record and ``fig_monitor_gallery.png`` from the last step's samples."""
        from .figures import plot_monitor
        from .gallery import plot_gallery

        records = self.records
        if not records:
            return
        plot_monitor(records, self.out / "fig_monitor.png", z_threshold=self.cfg.copy_z_threshold)
        step = records[-1]["step"]
        samples = load_tensors(self.out / "samples" / f"step_{step:07d}")[0]["samples"][:GALLERY_SIZE]
        rows = [(f"step {step}: samples", samples),
                ("nearest training image", self.train[nearest_neighbors(samples, self.train)["index"]]),
                ("nearest held-out image (size-matched set)",
                 self.ref_heldout[nearest_neighbors(samples, self.ref_heldout)["index"]])]
        plot_gallery(rows, self.out / "fig_monitor_gallery.png", value_range=self.value_range)


def describe(record: dict) -> str:
    """One line for the terminal: the step, the main numbers and the raised flags."""
    lo, hi = record["f_mem_ci"]
    flags = [FLAG_TEXT[k] for k in FLAG_TEXT if record["flags"].get(k)]
    return (f"monitor step {record['step']}: val loss {record['val_loss']:.4f} (train {record['train_loss']:.4f}), "
            f"copy z {record['copy_z']:+.2f}, f_mem {record['f_mem']:.3f} [{lo:.3f}, {hi:.3f}]"
            + (f" | {'; '.join(flags)}" if flags else ""))


def summarize(records: Sequence[dict]) -> dict:
    """``summary.json`` of a monitor run: the checked steps and the first step each signal fired."""
    def first(flag):
        return next((r["step"] for r in records if r["flags"].get(flag)), None)

    best = min(records, key=lambda r: r["val_loss"]) if records else None
    return {
        "steps": [r["step"] for r in records],
        "val_loss_min_step": best and best["step"],
        "val_loss_min": best and best["val_loss"],
        "first_closer_to_train_step": first("closer_to_train"),
        "first_copies_step": first("copies"),
    }
