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

``biasgen monitor --checkpoints DIR`` runs the same checks over a folder of saved
checkpoints (:func:`monitor_checkpoints`): diffusers' checkpoint folders, safetensors
files of a UNet2DModel, or one model's checkpoints of a biasgen audit (``RUN/models/model0``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import load_tensors, save_tensors
from ..errors import BiasgenError
from .metrics import data_copying_z, frozen_noise_loss, loss_by_t, memorized_fraction, nearest_neighbors
from ..runs import append_jsonl, prepare_run_dir, progress_bar, read_json, read_jsonl, write_json
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
        *,
        schedule: NoiseSchedule | None = None,  # the training noise schedule (default: linear, T=1000)
        n_samples: int = 64,  # samples per check, from fixed shared noise
        sampler: str = "ddim",  # "ddim" (deterministic) or "ddpm" (ancestral)
        sample_steps: int | None = 50,  # sampling steps, evenly spaced from T to 1 (None: all T)
        clip: float | None = 1.0,  # clamp of x0_hat while sampling (1.0 for images in [-1, 1], None for none)
        n_loss: int = 512,  # held-out and training images in the frozen-noise losses (at most)
        loss_bands: int = 10,  # equal-width bands of t for the loss per noise level
        copy_z_threshold: float = 2.0,  # flag samples as closer to training data when z < -threshold
        n_boot: int = 1000,  # bootstrap resamples of the f_mem CI
        seed: int = 0,  # fixes the loss noise, the sample noise, the subsets and the bootstrap
        value_range: tuple[float, float] = (-1.0, 1.0),  # pixel range of the images, for the gallery
        device: str | None = None,  # where the model runs (default: the model's own device)
        batch_size: int = 256,  # images per forward pass
        figures: bool = True,  # redraw the figures at every check
        verbose: bool = True,  # print one line per check
        force: bool = False,  # delete whatever is in `out` and start over
        meta: dict | None = None,  # extra JSON settings that define the run (recorded in run.json)
    ):
        self.train = _images(train_images, "train_images")
        self.heldout = _images(heldout_images, "heldout_images")
        if self.train.shape[1:] != self.heldout.shape[1:]:
            raise BiasgenError(f"Training images {tuple(self.train.shape[1:])} and held-out images "
                               f"{tuple(self.heldout.shape[1:])} differ in shape; give both the same size and channels.")
        if sampler not in ("ddim", "ddpm"):
            raise BiasgenError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}.")
        for name, value in (("n_samples", n_samples), ("n_loss", n_loss),
                            ("loss_bands", loss_bands), ("batch_size", batch_size)):
            if value < 1:
                raise BiasgenError(f"{name} must be at least 1, got {value}.")
        self.schedule = schedule or NoiseSchedule.linear()
        timesteps(self.schedule, sample_steps)  # a clear error now for a step count outside [1, T]
        self.n_samples, self.sampler, self.sample_steps, self.clip = n_samples, sampler, sample_steps, clip
        self.loss_bands, self.copy_z_threshold, self.n_boot = loss_bands, copy_z_threshold, n_boot
        self.value_range, self.device, self.batch_size = value_range, device, batch_size
        self.figures, self.verbose = figures, verbose

        overlap = count_overlap(self.train, self.heldout)
        if overlap:
            warnings.warn(f"{overlap} of the {len(self.heldout)} held-out images are exact copies of training images: "
                          "the validation loss and the data-copying test then understate the gap. Remove them from "
                          "the held-out set.", stacklevel=2)
        config = dict(
            train={"n": len(self.train), "shape": list(self.train.shape[1:]), "sha1": _digest(self.train)},
            heldout={"n": len(self.heldout), "shape": list(self.heldout.shape[1:]), "sha1": _digest(self.heldout)},
            schedule={"name": self.schedule.name, "T": self.schedule.T,
                      "betas_sha1": _digest(self.schedule.betas.float())},
            n_samples=n_samples, sampler=sampler, sample_steps=sample_steps or self.schedule.T,
            clip=clip, n_loss=n_loss, loss_bands=loss_bands, copy_z_threshold=copy_z_threshold, n_boot=n_boot,
            seed=seed, value_range=list(value_range), meta=meta or {},
            device=device, batch_size=batch_size, figures=figures, verbose=verbose,
        )
        self.out = prepare_run_dir(out, config, resume=True, force=force, kind="monitor", runtime_keys=RUNTIME_KEYS)
        plan = SeedPlan(seed)
        self.seeds = {name: plan.evaluation(name) for name in MONITOR_STREAMS}
        self.seeds["sample_noise"] = plan.describe(0)["sample_noise"]
        run = read_json(self.out / "run.json")
        if "seeds" not in run:
            data = {"overlap": overlap, "n_train": len(self.train), "n_heldout": len(self.heldout)}
            write_json(self.out / "run.json", {**run, "seeds": self.seeds, "data": data})

        # fixed inputs, the same at every check: loss subsets (paired: image i of both gets the same t and noise),
        # size-matched nearest-neighbour references, the held-out images' distances to the training set
        n = min(n_loss, len(self.train), len(self.heldout))
        self.loss_heldout = _subset(self.heldout, n, self.seeds["monitor_loss_heldout"])
        self.loss_train = _subset(self.train, n, self.seeds["monitor_loss_train"])
        self.ref_train, self.ref_heldout = reference_sets(self.train, self.heldout, self.seeds)
        self.heldout_l2 = nearest_neighbors(self.ref_heldout, self.train)["l2"]
        self.sample_seeds = plan.sample_seeds(n_samples)

    # -- records ---------------------------------------------------------------------------------
    @property
    def records(self) -> list[dict]:
        """Every check recorded so far, in step order."""
        return sorted(read_jsonl(self.out / "metrics.jsonl"), key=lambda r: r["step"])

    @property
    def steps(self) -> set[int]:
        """The steps already recorded."""
        return {r["step"] for r in read_jsonl(self.out / "metrics.jsonl")}

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
        device = self.device or _device_of(model)
        shape = tuple(self.train.shape[1:])
        with _evaluating(model):
            val = frozen_noise_loss(eps, self.loss_heldout, self.schedule, seed=self.seeds["monitor_loss"],
                                    batch_size=self.batch_size, device=device)
            tr = frozen_noise_loss(eps, self.loss_train, self.schedule, seed=self.seeds["monitor_loss"],
                                   batch_size=self.batch_size, device=device)
            samples = sample(x0_from_eps_model(eps, self.schedule, clip=self.clip), self.schedule, shape,
                             self.sample_seeds, method=self.sampler, steps=self.sample_steps,
                             batch_size=self.batch_size, device=device)
        if not bool(torch.isfinite(samples).all()) or not torch.isfinite(val["per_example"]).all():
            raise BiasgenError(f"The model gives NaN or infinite outputs at step {step}: training has diverged.")

        nn_full = nearest_neighbors(samples, self.train)
        nn_train, nn_heldout = nearest_neighbors(samples, self.ref_train), nearest_neighbors(samples, self.ref_heldout)
        f_mem = memorized_fraction(nn_full["l2"], nn_full["l2_second"], n_boot=self.n_boot,
                                   seed=self.seeds["f_mem_bootstrap"])
        val_t = loss_by_t(val["per_example"], val["t"], n_bins=self.loss_bands, T=self.schedule.T)
        train_t = loss_by_t(tr["per_example"], tr["t"], n_bins=self.loss_bands, T=self.schedule.T)
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
                     {"step": step, "sampler": self.sampler, "seeds": self.seeds["sample_noise"]})
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
            "closer_to_train": record["copy_z"] < -self.copy_z_threshold,
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
        plot_monitor(records, self.out / "fig_monitor.png", z_threshold=self.copy_z_threshold)
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


# -- a folder of saved checkpoints (``biasgen monitor``) ---------------------------------------------

def monitor_checkpoints(
    checkpoints: str | Path,  # folder of checkpoint-*/unet folders or numbered .safetensors files
    train: str | None,  # training images: anything biasgen.images.data.load_images reads (audit models: optional)
    heldout: str | None,  # held-out images, same
    out: str | Path,  # run folder
    *,
    model_config: str | Path | None = None,  # UNet2DModel config.json (default: the first checkpoint's own)
    scheduler_config: str | Path | None = None,  # diffusers scheduler_config.json (default: linear, T=1000)
    subfolder: str = "unet",  # the sub-folder of each checkpoint folder to read ("unet_ema" for EMA weights)
    resolution: int | None = None,  # resize the images to R x R
    grayscale: bool = False,  # convert the images to one channel
    progress: bool = True,  # a progress bar over checkpoints
    **monitor_kwargs,  # n_samples, sampler, seed, device, force, ...: see Monitor
) -> list[dict]:
    """Run the monitor over every checkpoint in ``checkpoints`` in step order (resumable); returns the records.

    Everything is checked before anything is written: the model config, the
    data's channels and size, and that every checkpoint has that architecture.
    Images are scaled to [-1, 1], as diffusers' training scripts do. The figures
    are drawn once, after the last checkpoint.

    The checkpoints of one model of a biasgen audit (``RUN/models/model0``: ``step_*.safetensors``
    with their ``.json`` sidecars) bring their own network, noise schedule and data: without
    ``train`` and ``heldout``, the monitor measures against the model's own split and the audit's
    test set, which no model trained on.
    """
    from .audit import member_sidecar
    from .diffusers_model import find_checkpoints

    found = find_checkpoints(checkpoints, subfolder)
    prepare = _audit_inputs if member_sidecar(found[0].weights) is not None else _diffusers_inputs
    images, load, settings = prepare(found, train, heldout, model_config=model_config,
                                     scheduler_config=scheduler_config, resolution=resolution, grayscale=grayscale)
    meta = {"checkpoints": str(Path(checkpoints).resolve()), "subfolder": subfolder, "train": train and str(train),
            "heldout": heldout and str(heldout), "resolution": resolution, "grayscale": grayscale,
            **settings.pop("meta")}
    monitor = Monitor(*images, out, meta=meta, figures=False, **{**settings, **monitor_kwargs})
    done = monitor.steps
    for ck in progress_bar([c for c in found if c.step not in done], progress, "checkpoints"):
        monitor.check(ck.step, load(ck))
    monitor.plot()  # once, at the end
    return monitor.records


def _load_scaled(train: str | None, heldout: str | None, resolution: int | None, grayscale: bool) -> list[torch.Tensor]:
    """The training and held-out images scaled to [-1, 1]; a BiasgenError when either is missing."""
    from .data import load_images, scale_images

    if train is None or heldout is None:
        raise BiasgenError("Pass both --train and --heldout: the images the checkpoints trained on and images they "
                           "never saw (only the checkpoints of a biasgen audit bring their own).")
    return [scale_images(load_images(d, resolution=resolution, grayscale=grayscale).images)[0] for d in (train, heldout)]


def _diffusers_inputs(found, train, heldout, *, model_config, scheduler_config, resolution, grayscale):
    """Images, checkpoint loader and Monitor settings (schedule, meta) for UNet2DModel checkpoints."""
    from .diffusers_model import (check_architectures, check_unet_fits, load_checkpoint_unet, load_unet_config,
                                         schedule_from_scheduler_config)

    source = model_config or found[0].config
    if source is None:
        raise BiasgenError("The checkpoints are bare safetensors files: pass --model-config, the UNet2DModel "
                           "config.json they were trained with.")
    config = load_unet_config(source)
    images = _load_scaled(train, heldout, resolution, grayscale)
    check_unet_fits(config, images[0].shape[1:])
    check_architectures(found, config, str(source))
    schedule = schedule_from_scheduler_config(scheduler_config) if scheduler_config else NoiseSchedule.linear()
    return images, lambda ck: load_checkpoint_unet(ck, config), {"schedule": schedule, "meta": {"model_config": config}}


def _audit_inputs(found, train, heldout, *, model_config, scheduler_config, resolution, grayscale):
    """Images, checkpoint loader and Monitor settings for one model's checkpoints of a biasgen audit: its schedule,
    and no clamp of the predicted clean image for images not in [-1, 1] (``--scaling center``), as the audit samples."""
    from .audit import load_member, member_experiment, member_sidecar

    if model_config or scheduler_config:
        raise BiasgenError("These are a biasgen audit's checkpoints: their sidecars hold the network and the noise "
                           "schedule; leave out --model-config and --scheduler-config.")
    sidecars = [member_sidecar(ck.weights) for ck in found]
    first = sidecars[0]
    strays = [str(ck.weights) for ck, sc in zip(found, sidecars)
              if sc is None or (sc["config"], sc["model"], sc["split"], sc.get("split_seed"))
              != (first["config"], first["model"], first["split"], first.get("split_seed"))]
    if strays:
        raise BiasgenError(f"{', '.join(strays[:3])} {'is' if len(strays) == 1 else 'are'} not checkpoints of the "
                           f"same audit model as {found[0].weights}; point --checkpoints at one model's folder "
                           "(RUN/models/model0).")
    experiment = member_experiment(first)
    if train is None and heldout is None:
        data = experiment.load()
        images = [data.train[first["split"]], data.test]
    elif experiment.cfg.scaling != "minus1to1":
        raise BiasgenError(f"The audit scaled its images with --scaling {experiment.cfg.scaling}; leave out --train "
                           "and --heldout to measure against the audit's own split and test set.")
    else:
        images = _load_scaled(train, heldout, resolution, grayscale)
    meta = {"audit": {"split": first["split"], "split_seed": first.get("split_seed"), "config": first["config"]}}
    clip = 1.0 if experiment.cfg.scaling == "minus1to1" else None
    return images, lambda ck: load_member(ck.weights, first), {"schedule": experiment.schedule(), "clip": clip, "meta": meta}


HELP = ("the single-run monitor over a folder of saved checkpoints (diffusers checkpoint-*/unet, safetensors, "
        "or one model of a biasgen audit)")


def _step_count(text: str) -> int | None:
    """``--sample-steps``: a number, or ``none`` for every step of the schedule (as ``biasgen audit`` spells it)."""
    return None if text.lower() == "none" else int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``biasgen monitor``."""
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="folder of checkpoint-*/unet folders, numbered .safetensors files, or one model's folder "
                        "of a biasgen audit (RUN/models/model0)")
    p.add_argument("--model-config", metavar="FILE", help="UNet2DModel config.json (default: the checkpoints' own)")
    p.add_argument("--scheduler-config", metavar="FILE", help="diffusers scheduler_config.json (default: linear, T=1000)")
    p.add_argument("--subfolder", default="unet", help="sub-folder of each checkpoint to read (unet_ema for EMA weights)")
    p.add_argument("--train", metavar="DATA", help="training images: folder, .npz, .npy or digits (the "
                   "checkpoints of a biasgen audit default to their own split)")
    p.add_argument("--heldout", metavar="DATA", help="held-out images, same forms (audit checkpoints: the audit's "
                   "test set)")
    p.add_argument("--out", default="runs/monitor", help="run folder (default: runs/monitor)")
    p.add_argument("--resolution", type=int, help="resize the images to R x R pixels")
    p.add_argument("--grayscale", action="store_true", help="convert the images to grayscale")
    p.add_argument("--n-samples", type=int, default=64, help="samples per checkpoint (default 64)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"), help="ddim (default) or ddpm (ancestral)")
    p.add_argument("--sample-steps", type=_step_count, default=50, help="sampling steps (default 50; none: all T)")
    p.add_argument("--n-loss", type=int, default=512, help="images in each frozen-noise loss (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of every fixed input (default 0)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--force", action="store_true", help="delete whatever is in --out and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-checkpoint lines")


def main(args: argparse.Namespace) -> int:
    """Run ``biasgen monitor`` for parsed ``args``; returns the exit status (the caller reports a BiasgenError)."""
    try:
        records = monitor_checkpoints(
            args.checkpoints, args.train, args.heldout, args.out, model_config=args.model_config,
            scheduler_config=args.scheduler_config, subfolder=args.subfolder, resolution=args.resolution,
            grayscale=args.grayscale, progress=not args.quiet, n_samples=args.n_samples, sampler=args.sampler,
            sample_steps=args.sample_steps, n_loss=args.n_loss, seed=args.seed, device=args.device or "cpu",
            force=args.force, verbose=not args.quiet)
    except KeyboardInterrupt:
        print(f"\nbiasgen monitor: interrupted; run the same command again to continue in {args.out}", file=sys.stderr)
        return 130
    summary = summarize(records)
    print(f"biasgen monitor: {len(records)} checkpoints measured in {args.out}\n"
          f"  validation-loss minimum: step {summary['val_loss_min_step']}\n"
          f"  first significant closeness to training data: step {summary['first_closer_to_train_step']}\n"
          f"  first copies: step {summary['first_copies_step']}\n"
          f"  results: metrics.jsonl, summary.json, fig_monitor.png, fig_monitor_gallery.png")
    return 0
