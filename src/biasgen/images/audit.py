"""The twin-split audit on images: the image definition of the twin pipeline.

    from biasgen.images.audit import audit
    summary = audit("runs/digits")                       # the default preset
    summary = audit("runs/fm", preset="fashion-mnist", steps=2000)
    summary = audit("runs/ddpm", model="diffusers", model_config="ddpm/unet")   # a diffusers UNet2DModel
    export_checkpoint("runs/ddpm", model=0, step=1500, out="ddpm-twin0")        # -> DDPMPipeline.from_pretrained

or from the shell: ``biasgen audit --out runs/digits``. The run folder holds
``run.json``, ``metrics.jsonl`` (one record per checkpoint), ``summary.json``,
the figures ``fig_*.png``, the checkpoints under ``models/`` and the shared-noise
samples of every checkpoint under ``samples/``. A killed run continues with
``--resume``. What each metric means: docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..compiling import COMPILE_HELP, COMPILE_SETTINGS
from ..config import TwinConfig, check, check_at_least, opt
from ..errors import BiasgenError
from ..losses import EpsMSEConditionalLoss, EpsMSELoss, Labelled
from ..onset import score_crossing
from ..pipeline import Curve, Data, Shared, TwinExperiment, metric_table, run_experiment
from ..runs import read_json
from ..schedule import NoiseSchedule
from ..training import checkpoint_stem
from . import conditional, figures, guidance_figures
from .data import describe, keep_classes, load_images, make_class_splits, scale_images, unscale_images
from .gallery import gallery_rows
from .groups import image_names, split_images
from .diffusers_model import (DiffusersEps, check_unet_fits, export_pipeline, load_unet_config,
                              schedule_from_scheduler_config)
from .evaluation import evaluate_checkpoint, loss_bands
from .metrics import nearest_neighbors
from .report_view import VIEW
from .unet import UNet


# Noise levels t (of T = 1000) of the score-level twin similarity (docs/method.md §4): 50..200, and 200, 500 and
# 800, the levels at which the authors' code draws the paper's Fig. 2.
SCORE_TS = (50, 100, 150, 200, 500, 800)


@dataclass
class AuditConfig(TwinConfig):
    """The image audit's settings: the shared twin settings (:class:`~biasgen.config.TwinConfig`) plus these."""

    splits: int = opt(4, "number of disjoint training splits K (>= 2)")
    # data
    data: str = opt("digits", "digits | fashion-mnist | cifar10 | PATH (image folder, .npz or .npy)")
    data_dir: str | None = opt(None, "folder holding the data set's files (fashion-mnist, cifar10)")
    resolution: int | None = opt(None, "resize (after a centre crop) to R x R pixels")
    grayscale: bool = opt(False, "convert colour images to grayscale")
    center_crop: bool = opt(True, "centre-crop to a square before resizing")
    scaling: str = opt("minus1to1", "pixel scaling: minus1to1 (2x-1) or center (subtract the training mean, as the paper)")
    classes: tuple[int, ...] = opt((), "keep only images with these labels (a labelled data set, e.g. digits)")
    groups: str | None = opt(None, "CSV of 'file name,group id' rows: splits and test set disjoint at group level")
    group_by_regex: str | None = opt(None, "group images by this regex's first capture group in their file names")
    # model
    model: str = opt("unet", "network: unet (biasgen's U-Net, set by the options below) or diffusers (a UNet2DModel "
                             "built from --model-config; the U-Net options and --dropout then do not apply)")
    model_config: str | None = opt(None, "with --model diffusers: the UNet2DModel config.json (as diffusers writes it, "
                                         "or its folder)")
    base_width: int = opt(16, "U-Net base channel width")
    channel_mults: tuple[int, ...] = opt((1, 2), "U-Net width multiplier per resolution level")
    attention_levels: tuple[int, ...] = opt((), "levels (0 = full resolution) with self-attention")
    res_blocks: int = opt(1, "residual blocks per level")
    schedule: str = opt("linear", "noise schedule: linear (the paper's) or cosine")
    scheduler_config: str | None = opt(None, "a diffusers scheduler_config.json as the noise schedule, instead of "
                                             "--schedule (its num_train_timesteps must equal --T)")
    # evaluation
    score_ts: tuple[int, ...] = opt(SCORE_TS, "diffusion steps t for the score-level twin similarity")
    n_score_inputs: int = opt(128, "training and test inputs for the score-level similarity")
    eval_batch: int = opt(256, "batch size of evaluation passes")
    compile: str = opt("auto", COMPILE_HELP)
    # class-conditional twins and guidance (docs/guidance.md)
    conditional: bool = opt(False, "train class-conditional twins on the data's labels (digits, fashion-mnist, a "
                                   "folder with one sub-folder per class, a .npz with 'labels')")
    label_dropout: float = opt(0.1, "with --conditional: probability of training on the null label instead")
    guidance: tuple[float, ...] = opt((), "with --conditional: guidance scales w to sample with, e.g. 0,1,3 (0: "
                                          "unconditional, 1: conditional, >1: guided); none given: 1")
    guidance_start: int | None = opt(None, "with --conditional: apply scales w > 1 only at steps t <= this (delayed "
                                           "guidance; earlier steps sample conditionally)")
    use_guidance: float | None = opt(None, "with --conditional: the scale you sample with, which the top-level verdict "
                                           "and recommended step use (default: the largest of --guidance)")

    RUNTIME_KEYS = TwinConfig.RUNTIME_KEYS + ("eval_batch", "compile")
    INPUT_KEYS = ("data", "data_dir", "model_config", "scheduler_config", "groups")

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 1, "base_width", "res_blocks", "n_score_inputs", "eval_batch")
        check(self.groups is None or self.group_by_regex is None, "pass --groups FILE or --group-by-regex, not both.")
        check(not self.conditional or (self.groups is None and self.group_by_regex is None),
              "--conditional splits keep the class balance and do not take --groups or --group-by-regex; drop one.")
        check(self.compile in COMPILE_SETTINGS, f"--compile must be auto, on or off, got {self.compile!r}.")
        check(self.scaling in ("minus1to1", "center"), f"--scaling must be minus1to1 or center, got {self.scaling!r}.")
        check(self.schedule in ("linear", "cosine"), f"--schedule must be linear or cosine, got {self.schedule!r}.")
        check(self.resolution is None or self.resolution >= 4, "--resolution must be at least 4 pixels.")
        scaled = ",".join(str(max(1, t * self.T // 1000)) for t in SCORE_TS)
        check(len(self.score_ts) >= 1, f"--score-ts needs at least one diffusion step, e.g. --score-ts {scaled}.")
        check(all(1 <= t < self.T for t in self.score_ts),
              f"--score-ts must lie in [1, {self.T - 1}], got {self.score_ts} (the default is meant for T = 1000); "
              f"pass steps below --T, e.g. the default rescaled: --score-ts {scaled}.")
        check(len(self.channel_mults) >= 1, "--channel-mults needs at least one level, e.g. 1,2.")
        check(self.model in ("unet", "diffusers"), f"--model must be unet or diffusers, got {self.model!r}.")
        check((self.model == "diffusers") == (self.model_config is not None),
              "--model diffusers needs --model-config (a UNet2DModel config.json), and --model-config needs "
              "--model diffusers.")
        if self.model == "diffusers":
            load_unet_config(self.model_config)  # a clear error now for a config that is not a UNet2DModel's
        T = noise_schedule(self.schedule, self.T, self.scheduler_config).T
        check(T == self.T, f"--scheduler-config has num_train_timesteps={T} but --T is {self.T}; pass --T {T}.")
        conditional.check_guidance(self)

    @property
    def guidance_scales(self) -> tuple[float, ...]:
        """The guidance scales evaluated: ``--guidance``, or 1 (conditional sampling) when none is given."""
        return tuple(self.guidance) or (1.0,)

    @property
    def use_scale(self) -> float:
        """The scale of the top-level verdict: ``--use-guidance``, or the largest evaluated scale."""
        return max(self.guidance_scales) if self.use_guidance is None else self.use_guidance


HELD = dict(hold_above=300, hold_every=4)  # the sampler's held predictions (docs/samplers.md), where validated
PRESETS: dict[str, dict] = {
    # The bundled 8x8 digits, 2 splits x 2 seeds (4 twin pairs, 2 same-split controls) of 128 images, 3000 steps:
    # both minima inside the run; docs/audit.md gives the measured result. The paper's chain (all T steps, the
    # same noise) on 48 samples per model, its prediction held for 4 steps above t = 300 (475 network calls
    # instead of 1000; validated on these models, docs/samplers.md).
    "default": dict(n=128, splits=2, seeds_per_split=2, steps=3000, checkpoints=14, n_samples=48, **HELD),
    # All three phases in one run: generalization, biased generalization, memorization (docs/audit.md).
    "phases": dict(n=32, splits=2, seeds_per_split=2, steps=4000, checkpoints=16, n_samples=48, **HELD),
    # 16x16 Fashion-MNIST (Debian's dataset-fashion-mnist, or --data-dir), 48 samples per model with held
    # predictions as the default preset (validated on these models too); docs/audit.md gives the result and time.
    "fashion-mnist": dict(data="fashion-mnist", resolution=16, n=256, splits=4, n_test=1024, steps=2000,
                          checkpoints=13, n_samples=48, **HELD),
    # The paper's image setting (docs/method.md §8): CelebA 32x32 grayscale, 15 splits of 1024, GPU scale. Run it from the folder that holds
    # img_align_celeba/, or pass --data PATH/TO/img_align_celeba.
    "paper": dict(data="img_align_celeba", resolution=32, grayscale=True, scaling="center", n=1024, splits=15, n_test=2048,
                  base_width=32, channel_mults=(1, 2, 4), attention_levels=(1, 2), res_blocks=2, dropout=0.1,
                  lr=1e-4, batch_size=512, steps=10_000, checkpoints=50, first_checkpoint=10, n_samples=512,
                  sampler="ddpm", sample_steps=None, eval_batch=512, device="cuda"),
    # Class-conditional twins on the bundled digits (labels dropped 10% of the time) sampled at w = 0, 1 and 3 with
    # the paper's sampler: 64 images per split (6-7 per class) so that copies can appear within the run;
    # docs/guidance.md gives the measured result and time.
    "guidance": dict(conditional=True, guidance=(0.0, 1.0, 3.0), n=64, splits=2, seeds_per_split=2, steps=3000,
                     checkpoints=10, n_samples=40),
    # The base of biasgen finetune's default preset: the digits 0-4 only (the fine-tunes get 5-9), one model per
    # split, cheap evaluation (only the last checkpoint is the base); about 2 minutes on 2 CPU cores.
    "finetune-base": dict(classes=(0, 1, 2, 3, 4), n=400, splits=2, seeds_per_split=1, n_test=64, steps=2000,
                          checkpoints=2, first_checkpoint=1000, n_samples=16, sample_steps=20),
    # A seconds-long smoke run (used by the tests); far too small to show anything.
    "tiny": dict(n=24, splits=2, n_test=32, steps=12, checkpoints=3, first_checkpoint=4, base_width=8,
                 channel_mults=(1, 2), attention_levels=(), res_blocks=1, n_samples=8, sampler="ddim",
                 sample_steps=5, score_ts=(50,), n_score_inputs=8, n_boot=50, batch_size=16, workers=1),
}

SWEEP_PRESETS: dict[str, dict] = {  # biasgen sweep's presets of the audit (biasgen.sweep; docs/sweep.md)
    # Bundled 8x8 digits, 2 splits x 2 seeds per size (so tau_data is measured), 25 steps per image (the same
    # epochs at every size), the paper's sampler on 48 samples per model as the default audit; docs/sweep.md gives
    # what it shows and its time (about 20 minutes on 2 CPU cores).
    "default": dict(experiment_preset="default", sizes=(16, 32, 64, 128), steps_per_image=25.0,
                    settings=dict(splits=2, seeds_per_split=2, n_test=512, checkpoints=14, first_checkpoint=20)),
    # Seconds-long smoke sweeps (used by the tests); far too small to show anything.
    "tiny": dict(experiment_preset="tiny", sizes=(8, 12, 16), steps_per_image=1.0, settings=dict(threads=1, n_boot=30)),
}


class ImageAudit(TwinExperiment):
    """Twins on disjoint splits of an image data set, each an eps-predicting U-Net."""

    kind = "audit"
    memorization_rule = ("f_mem: samples whose L2 distances to the nearest and second-nearest image of their own split "
                         "have d1/d2 < 1/3; bootstrap 95% interval")
    validated_samplers = ("ddpm-1000-hold300x4",)  # measured against the paper's sampler (docs/samplers.md)
    sampler_caveat = ("the cheaper samplers understate the twin distance and the memorized fraction once the models "
                      "copy, and tau_bias may sit a checkpoint or more away from the paper's answer")
    config_class = AuditConfig
    presets = PRESETS
    report_view = VIEW
    sweep_presets = SWEEP_PRESETS
    default_out = "runs/audit"
    help = "twin-split audit of an image data set: when does training start favouring the training data?"
    cfg: AuditConfig

    def load(self) -> Data:
        cfg = self.cfg
        images = load_images(cfg.data, data_dir=cfg.data_dir, resolution=cfg.resolution, grayscale=cfg.grayscale,
                             center_crop=cfg.center_crop)
        images = keep_classes(images, cfg.classes)
        if cfg.conditional:  # class-balanced splits of labelled images
            labels, classes = conditional.class_labels(images.labels, cfg.data)
            self.num_classes = len(classes)  # the null label of the loss
            splits = make_class_splits(images.images, labels, cfg.n, cfg.splits, cfg.n_test,
                                       self.seeds.image_permutation())
        else:
            splits = split_images(images, n=cfg.n, k=cfg.splits, n_test=cfg.n_test,
                                  seed=self.seeds.image_permutation(), groups_file=cfg.groups,
                                  regex=cfg.group_by_regex)
        reference = torch.cat(splits.train)  # 'center' scaling subtracts the mean training image
        train = [scale_images(x, cfg.scaling, reference)[0] for x in splits.train]
        test, mean = scale_images(splits.test, cfg.scaling, reference)
        if cfg.model == "diffusers":  # checked before the run folder is created
            check_unet_fits(load_unet_config(cfg.model_config), train[0].shape[1:])
        names = image_names(images.names, len(images.images))
        train_names = [[names[i] for i in index.tolist()] for index in splits.train_index]
        description, extra = describe(images, splits), {"mean": mean, "train_names": train_names}
        if not cfg.conditional:
            return Data(train=train, test=test, description=description, extra=extra)
        return Data(train=train, test=test, description={**description, "classes": classes},
                    extra={**extra, "num_classes": len(classes), "train_labels": splits.train_labels,
                           "test_labels": splits.test_labels})

    def largest_size(self) -> int:
        cfg = self.cfg
        pool = keep_classes(load_images(cfg.data, data_dir=cfg.data_dir, resolution=cfg.resolution,
                                        grayscale=cfg.grayscale, center_crop=cfg.center_crop), cfg.classes).images
        return (len(pool) - cfg.n_test) // cfg.splits

    def schedule(self) -> NoiseSchedule:
        return noise_schedule(self.cfg.schedule, self.cfg.T, self.cfg.scheduler_config)

    def network(self, data: Data) -> tuple[type, dict]:
        cfg = self.cfg
        if cfg.model == "diffusers":
            kwargs = {"config": load_unet_config(cfg.model_config)}
        else:
            kwargs = dict(channels=data.train[0].shape[1], base_width=cfg.base_width,
                          channel_mults=tuple(cfg.channel_mults), attention_levels=tuple(cfg.attention_levels),
                          res_blocks=cfg.res_blocks, dropout=cfg.dropout)
        if cfg.conditional:  # the class embedding: one row per class and one for "no label"
            classes = data.extra["num_classes"]
            kwargs.update({"config": {**kwargs["config"], "num_class_embeds": classes + 1}} if cfg.model == "diffusers"
                          else {"num_classes": classes})
        return network_class(cfg.model), kwargs

    def training_data(self, data: Data) -> list:
        if not self.cfg.conditional:
            return data.train
        return [Labelled(x, y) for x, y in zip(data.train, data.extra["train_labels"])]

    def loss(self):
        if self.cfg.conditional:
            return EpsMSEConditionalLoss(self.schedule(), self.cfg.label_dropout, null_label=self.num_classes)
        return EpsMSELoss(self.schedule())

    def reference(self, data: Data, members) -> dict:
        """The data, and the held-out reference of the data-copying test: the test images' nearest-neighbour
        distances to each model's split (the same at every checkpoint)."""
        ref = {"train": data.train, "test": data.test, "schedule": self.schedule()}
        if self.cfg.conditional:  # labelled sets; copies are counted within the sample's class
            return {**ref, "num_classes": data.extra["num_classes"], **conditional.labelled_reference(
                data.train, data.test, data.extra["train_labels"], data.extra["test_labels"], members,
                self.cfg.n_samples, data.extra["num_classes"])}
        heldout_l2 = [nearest_neighbors(data.test[: self.cfg.n_samples], data.train[split])["l2"] for split, _ in members]
        return {**ref, "heldout_l2": heldout_l2}

    def evaluate(self, models, shared: Shared):
        evaluate = conditional.evaluate_guided if self.cfg.conditional else evaluate_checkpoint
        return evaluate(models, shared.members, shared.reference, self.cfg, self.seeds)

    def curves(self, records: list[dict]) -> dict[str, Curve]:
        curves = {"tau_bias": Curve(metric_table(records, "twin_distance_pairs"), "mean", "twin pairs"),
                  "tau_loss": Curve(metric_table(records, "test_loss_units"), "mean", "test images")}
        if records[0].get("same_split_distance_pairs"):
            curves["control"] = Curve(metric_table(records, "same_split_distance_pairs"), "mean", "control pairs")
        return curves

    def memorized_share(self, records: list[dict]) -> list[dict]:
        """``f_mem`` (d1/d2 < 1/3 to the own split, pooled over models) with its bootstrap 95% interval."""
        return [{"step": r["step"], "share": r["f_mem"], "ci": r["f_mem_ci"], "key": "f_mem"} for r in records]

    def summarize(self, records, data, reference, judged) -> dict:
        steps = [r["step"] for r in records]
        tau_score = {t: score_crossing(steps, [r["score_sim"][t]["train"] for r in records],
                                       [r["score_sim"][t]["test"] for r in records]) for t in records[0]["score_sim"]}
        return {"tau_score": tau_score, "tau_score_reference_t": str(self.cfg.score_ts[0]),
                "loss_by_band": loss_bands(records, n_boot=self.cfg.n_boot, seed=self.seeds.bootstrap())}

    def sampler_validated(self, name: str) -> bool:
        """As declared (``validated_samplers``), for unconditional sampling only: guided sampling was not measured."""
        return super().sampler_validated(name) and not self.cfg.conditional

    def further_verdicts(self, records, members) -> dict:
        """A conditional audit's ``"guidance"`` block: one verdict per guidance scale."""
        return {"guidance": conditional.judge_per_scale(self, records, members)} if self.cfg.conditional else {}

    def terminal_lines(self, summary: dict) -> list[str]:
        return conditional.terminal_lines(summary) if "guidance" in summary else []

    def plot(self, run: Path, records, summary, data: Data) -> None:
        cfg = self.cfg
        members = [(m["split"], m["split_seed"]) for m in summary["models"]]
        rows = [(label, unscale_images(x, cfg.scaling, data.extra["mean"]).clamp(0, 1))
                for label, x in gallery_rows(run, summary, data.train, members)]
        figures.plot_all(run, records, summary, rows, value_range=(0.0, 1.0))
        if cfg.conditional:
            guidance_figures.plot_guidance(run, records, summary)


def network_class(model: str) -> type:
    """The audit's network for ``--model``: diffusers' UNet2DModel (``'diffusers'``) or biasgen's U-Net."""
    return DiffusersEps if model == "diffusers" else UNet


def noise_schedule(name: str, T: int, scheduler_config: str | None) -> NoiseSchedule:
    """An audit's noise schedule: the diffusers scheduler config when one is given, else biasgen's ``name`` with ``T`` steps."""
    return schedule_from_scheduler_config(scheduler_config) if scheduler_config else NoiseSchedule.from_name(name, T)


def export_checkpoint(run: str | Path, model: int, step: int, out: str | Path) -> Path:
    """Model ``model`` of the audit in ``run`` at checkpoint ``step`` as a diffusers ``DDPMPipeline`` folder ``out``.

    Only for runs with ``--model diffusers`` and ``--scaling minus1to1`` (the [-1, 1] images a DDPMPipeline
    assumes); the exported scheduler is the run's noise schedule.
    """
    cfg = read_json(Path(run) / "run.json")["config"]
    if cfg.get("model") != "diffusers":
        raise BiasgenError(f"The audit in {run} trained biasgen's U-Net; only runs with --model diffusers export "
                           "to diffusers.")
    if cfg["scaling"] != "minus1to1":
        raise BiasgenError(f"The audit in {run} used --scaling {cfg['scaling']}; a DDPMPipeline assumes images in "
                           "[-1, 1] (--scaling minus1to1).")
    stem = checkpoint_stem(Path(run) / "models" / f"model{model}", step)
    return export_pipeline(stem, out, noise_schedule(cfg["schedule"], cfg["T"], cfg["scheduler_config"]))


def audit(out: str | Path, preset: str | None = "default", config: str | Path | None = None, *,
          resume: bool = False, force: bool = False, progress: bool = True, **settings) -> dict:
    """Python API of ``biasgen audit``: resolve the config, run, and return ``summary.json`` as a dict."""
    return run_experiment(ImageAudit.from_settings(preset, config, **settings), out, resume=resume, force=force,
                          progress=progress)
