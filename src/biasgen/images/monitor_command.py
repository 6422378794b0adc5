"""``biasgen monitor``: the monitor's checks over a folder of checkpoints you already have (docs/your-model.md).

    biasgen monitor --checkpoints ddpm-run --train ./train --heldout ./val --out runs/mon
    biasgen monitor --checkpoints runs/audit/models/model0            # one model of a biasgen audit

The checkpoints are diffusers' ``checkpoint-*/unet`` folders, numbered safetensors
files of a UNet2DModel, or one model's checkpoints of a biasgen audit
(``RUN/models/model0``: ``step_*.safetensors`` with their ``.json`` sidecars, which
bring their own network, noise schedule and data). The settings are one
:class:`CheckpointMonitorConfig` (the monitor's :class:`~biasgen.images.monitor.MonitorConfig`
plus where the checkpoints and images are); its fields are the command's flags,
built by :func:`biasgen.config.add_config_flags` as for every other command.
Every input is checked before the output folder is created.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..checkpoint import check_safetensors
from ..config import add_config_flags, build_config, check, opt
from ..errors import BiasgenError
from ..runs import check_out, progress_bar, read_json
from ..schedule import NoiseSchedule
from .monitor import Monitor, MonitorConfig, summarize

HELP = ("the single-run monitor over a folder of saved checkpoints (diffusers checkpoint-*/unet, safetensors, "
        "or one model of a biasgen audit)")


@dataclasses.dataclass
class CheckpointMonitorConfig(MonitorConfig):
    """The settings of ``biasgen monitor``: what to measure (:class:`MonitorConfig`) and what to read."""

    checkpoints: str | None = opt(None, "folder of checkpoint-*/unet folders, numbered .safetensors files, or one "
                                        "model's folder of a biasgen audit (RUN/models/model0); required")
    train: str | None = opt(None, "training images: folder, .npz, .npy or digits (the checkpoints of a biasgen "
                                  "audit default to their own split)")
    heldout: str | None = opt(None, "held-out images, same forms (audit checkpoints: the audit's test set)")
    model_config: str | None = opt(None, "UNet2DModel config.json (default: the checkpoints' own)")
    scheduler_config: str | None = opt(None, "diffusers scheduler_config.json (default: linear, T=1000)")
    subfolder: str = opt("unet", "sub-folder of each checkpoint to read (unet_ema for EMA weights)")
    resolution: int | None = opt(None, "resize the images to R x R pixels")
    grayscale: bool = opt(False, "convert the images to grayscale")

    INPUT_KEYS = ("checkpoints", "train", "heldout", "model_config", "scheduler_config")

    def validate(self) -> None:
        super().validate()
        check(self.checkpoints is not None, "Pass --checkpoints DIR, the folder that holds the checkpoints.")
        check(self.resolution is None or self.resolution >= 1, "--resolution must be a positive number of pixels.")


def monitor_checkpoints(cfg: CheckpointMonitorConfig, out: str | Path, *, force: bool = False, progress: bool = True,
                        verbose: bool = True, inputs: tuple[str | Path, ...] = ()) -> list[dict]:
    """Run the monitor over every checkpoint of ``cfg.checkpoints`` in step order (resumable); returns the records.

    Everything is checked before anything is written: ``out`` against every input (also the further
    ``inputs``, e.g. a TOML file), that every checkpoint is a whole safetensors file, the model config,
    the data's channels and size, and that every checkpoint has that architecture. Images are scaled to
    [-1, 1], as diffusers' training scripts do. The figures are drawn once, after the last checkpoint.
    """
    from .diffusers_model import find_checkpoints

    inputs = (*cfg.input_paths(), *inputs)
    check_out(out, inputs, force=force)
    found = find_checkpoints(cfg.checkpoints, cfg.subfolder)
    for ck in found:
        check_safetensors(ck.weights)
    prepare = _audit_inputs if member_sidecar(found[0].weights) is not None else _diffusers_inputs
    images, load, settings = prepare(found, cfg)
    meta = {"checkpoints": str(Path(cfg.checkpoints).resolve()), "subfolder": cfg.subfolder,
            "train": cfg.train and str(cfg.train), "heldout": cfg.heldout and str(cfg.heldout),
            "resolution": cfg.resolution, "grayscale": cfg.grayscale, **settings.pop("meta")}
    measured = MonitorConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(MonitorConfig)})
    with Monitor(*images, out, measured, meta=meta, figures=False, verbose=verbose, force=force, inputs=inputs,
                 **settings) as monitor:
        done = monitor.steps
        for ck in progress_bar([c for c in found if c.step not in done], progress, "checkpoints"):
            monitor.check(ck.step, load(ck))
        monitor.plot()  # once, at the end
        return monitor.records


def _load_scaled(cfg: CheckpointMonitorConfig) -> list[torch.Tensor]:
    """The training and held-out images scaled to [-1, 1]; a BiasgenError when either is missing."""
    from .data import load_images, scale_images

    if cfg.train is None or cfg.heldout is None:
        raise BiasgenError("Pass both --train and --heldout: the images the checkpoints trained on and images they "
                           "never saw (only the checkpoints of a biasgen audit bring their own).")
    return [scale_images(load_images(d, resolution=cfg.resolution, grayscale=cfg.grayscale).images)[0]
            for d in (cfg.train, cfg.heldout)]


def _diffusers_inputs(found, cfg: CheckpointMonitorConfig):
    """Images, checkpoint loader and Monitor settings (schedule, meta) for UNet2DModel checkpoints."""
    from .diffusers_model import (check_architectures, check_unet_fits, load_checkpoint_unet, load_unet_config,
                                  schedule_from_scheduler_config)

    source = cfg.model_config or found[0].config
    if source is None:
        raise BiasgenError("The checkpoints are bare safetensors files: pass --model-config, the UNet2DModel "
                           "config.json they were trained with.")
    config = load_unet_config(source)
    images = _load_scaled(cfg)
    check_unet_fits(config, images[0].shape[1:])
    check_architectures(found, config, str(source))
    schedule = (schedule_from_scheduler_config(cfg.scheduler_config) if cfg.scheduler_config else
                NoiseSchedule.linear())
    return images, lambda ck: load_checkpoint_unet(ck, config), {"schedule": schedule, "meta": {"model_config": config}}


def _audit_inputs(found, cfg: CheckpointMonitorConfig):
    """Images, checkpoint loader and Monitor settings for one model's checkpoints of a biasgen audit: its schedule,
    and no clamp of the predicted clean image for images not in [-1, 1] (``--scaling center``), as the audit samples."""
    if cfg.model_config or cfg.scheduler_config:
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
    if cfg.train is None and cfg.heldout is None:
        data = experiment.load()
        images = [data.train[first["split"]], data.test]
    elif experiment.cfg.scaling != "minus1to1":
        raise BiasgenError(f"The audit scaled its images with --scaling {experiment.cfg.scaling}; leave out --train "
                           "and --heldout to measure against the audit's own split and test set.")
    else:
        images = _load_scaled(cfg)
    meta = {"audit": {"split": first["split"], "split_seed": first.get("split_seed"), "config": first["config"]}}
    clip = 1.0 if experiment.cfg.scaling == "minus1to1" else None
    return images, lambda ck: load_member(ck.weights, first), {"schedule": experiment.schedule(), "clip": clip, "meta": meta}


# -- one model of a biasgen audit ------------------------------------------------------------------

def member_sidecar(weights: str | Path) -> dict | None:
    """The sidecar of one audit model's checkpoint ``<stem>.safetensors`` (``<stem>.json``: the audit's
    config, the network's arguments, the model's split), or None when ``weights`` is no such checkpoint."""
    sidecar = Path(weights).with_suffix(".json")
    if Path(weights).suffix != ".safetensors" or not sidecar.is_file():
        return None
    meta = read_json(sidecar)
    keys_ok = {"config", "model", "split", "step"} <= set(meta)
    return meta if keys_ok and isinstance(meta["config"], dict) and "scaling" in meta["config"] else None


def member_experiment(sidecar: dict):
    """The audit (an :class:`~biasgen.images.audit.ImageAudit`) a model checkpoint belongs to, on the CPU."""
    from .audit import AuditConfig, ImageAudit

    return ImageAudit(build_config(AuditConfig, {}, None, None, {**sidecar["config"], "device": "cpu"}))


def load_member(weights: str | Path, sidecar: dict) -> torch.nn.Module:
    """The network of an audit model's checkpoint, in eval mode on the CPU (either kind of network)."""
    from ..twins import load_model
    from .audit import network_class

    return load_model(network_class(sidecar["config"]["model"]), sidecar["model"], Path(weights).with_suffix(""), "cpu")


# -- the command line ------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``biasgen monitor``: the run folder, and every field of :class:`CheckpointMonitorConfig`."""
    p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (flat key = value); flags win")
    p.add_argument("--out", default="runs/monitor", help="run folder (default: runs/monitor); the same command "
                   "again continues it")
    p.add_argument("--force", action="store_true", help="delete the monitor run in --out and start over "
                   "(never a folder biasgen did not write, never an input; docs/safety.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-checkpoint lines")
    add_config_flags(p, CheckpointMonitorConfig)


def main(args: argparse.Namespace) -> int:
    """Run ``biasgen monitor`` for parsed ``args``; returns the exit status (the caller reports a BiasgenError)."""
    from ..config import flags_given

    cfg = build_config(CheckpointMonitorConfig, {}, None, args.config, flags_given(args, CheckpointMonitorConfig))
    try:
        records = monitor_checkpoints(cfg, args.out, force=args.force, progress=not args.quiet,
                                      verbose=not args.quiet, inputs=(args.config,) if args.config else ())
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
