"""Twin fine-tunes: one pretrained base, fine-tuned (in full or through LoRA adapters) on disjoint private splits.

    from biasgen.images.finetune import finetune
    summary = finetune("runs/ft", base="runs/pre/models/model0/step_0003000.safetensors", adapter="lora")
    export_merged("runs/ft", model=0, step=1500, out="ft-merged")   # base + adapters as one network

or from the shell: ``biasgen finetune --base PATH --out runs/ft`` and ``biasgen export-merged runs/ft --step
1500 --out ft-merged``. Everything the image audit measures, per checkpoint, plus the per-image leak list
(``leaks.csv``, :mod:`biasgen.images.leaks`). The twins start bit-identical from the base, so the twin distance starts at zero and its minimum is the first checkpoint: the
data-specific signal is the contrast with same-split controls (tau_data; docs/finetune.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_tensors, save_tensors
from ..config import check, check_at_least, opt
from ..errors import BiasgenError
from ..pipeline import Data, Shared, run_experiment
from ..runs import read_json
from ..training import checkpoint_stem
from ..twins import load_model, make_members
from .audit import PRESETS as AUDIT_PRESETS, AuditConfig, ImageAudit, noise_schedule
from .base_model import ADAPTERS, FinetuneNet, base_network, check_lora_targets, merged_network, resolve_base
from .gallery import plot_gallery
from .leak_view import VIEW
from .leaks import leak_list, leak_rows, near_copies, write_leaks_csv
from .pretrain import pretrain_base, pretrain_images
from .data import unscale_images
from .diffusers_model import export_pipeline


@dataclass
class FinetuneConfig(AuditConfig):
    """The fine-tune's settings: the image audit's (its network options do not apply: the base sets the network)
    plus these."""

    base: str | None = opt(None, "the pretrained base: a biasgen checkpoint (step_*.safetensors with its .json) or "
                                 "a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors)")
    pretrain: str | None = opt(None, "instead of --base: public data (digits, fashion-mnist, a folder, a .npz) to "
                                     "train the base on first, inside the run folder (RUN/base/; reused on --resume)")
    pretrain_classes: tuple[int, ...] = opt((), "with --pretrain: keep only these labels of the public data")
    pretrain_n: int = opt(400, "with --pretrain: public images the base is trained on")
    pretrain_steps: int = opt(2000, "with --pretrain: the base's training steps (the fine-tune's optimiser settings)")
    base_sha256: str | None = opt(None, "the base's sha256; recorded by the first run, checked on resume")
    adapter: str = opt("none", "none (full fine-tune) or lora (adapters only; the base stays frozen)")
    lora_rank: int = opt(4, "LoRA rank r")
    lora_alpha: float | None = opt(None, "LoRA scale alpha (default: the rank)")
    lora_targets: tuple[str, ...] = opt((), "layer-name suffixes that get adapters (default: the U-Net's "
                                            "convolutions and attention projections)")

    INPUT_KEYS = AuditConfig.INPUT_KEYS + ("base", "pretrain")

    def validate(self) -> None:
        super().validate()
        check(self.base is None or self.pretrain is None,
              "--base and --pretrain both give the base; pass one (a pretrained base, or public data to train one).")
        check(self.base is not None or self.pretrain is not None,
              "biasgen finetune needs a base: --base PATH (a biasgen audit checkpoint step_*.safetensors or a "
              "diffusers UNet2DModel folder) or --pretrain DATA to train one first (--preset cpu does).")
        check(self.pretrain is None or self.model == "unet", "--pretrain trains biasgen's U-Net; for a diffusers "
              "UNet2DModel base, pass it with --base.")
        check(not self.conditional, "biasgen finetune has no --conditional yet; fine-tune unconditionally.")
        check_at_least(self, 1, "pretrain_n", "pretrain_steps")
        check(self.adapter in ADAPTERS, f"--adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}.")
        check_at_least(self, 1, "lora_rank")


PRESETS: dict[str, dict] = {
    # 8x8 digits of the classes 5-9, private to the fine-tune (a base trained on 0-4: docs/finetune.md),
    # 2 splits x 2 seeds of 64 images; docs/finetune.md gives the measured result (full and LoRA). The paper's
    # sampler itself: held predictions were not measured on fine-tunes.
    "default": dict(AUDIT_PRESETS["default"], classes=(5, 6, 7, 8, 9), n=64, n_test=256, steps=1500,
                    checkpoints=16, first_checkpoint=5, hold_every=1),
    # The same, with its base pretrained first in the run folder on 400 digits of the classes 0-4: one command.
    "cpu": dict(AUDIT_PRESETS["default"], classes=(5, 6, 7, 8, 9), n=64, n_test=256, steps=1500,
                   checkpoints=16, first_checkpoint=5, pretrain="digits", pretrain_classes=(0, 1, 2, 3, 4),
                   pretrain_n=400, pretrain_steps=2000, hold_every=1),
    # A seconds-long smoke run (used by the tests); far too small to show anything.
    "tiny": dict(AUDIT_PRESETS["tiny"]),
}


class ImageFinetune(ImageAudit):
    """Twins fine-tuned from one shared base on disjoint private splits of an image data set."""

    kind = "finetune"
    config_class = FinetuneConfig
    presets = PRESETS
    report_view = VIEW
    sweep_presets = {}
    shared_start = True
    validated_samplers = ()  # held predictions were measured on audits trained from scratch only
    default_out = "runs/finetune"
    help = "twin fine-tunes of a pretrained base (full or LoRA): when do they start copying the private data?"
    cfg: FinetuneConfig

    def load(self) -> Data:
        """The private data, and the base (read, or its public data checked): before the run folder exists, so a
        bad base leaves nothing behind."""
        if self.cfg.pretrain is not None:
            self.public = pretrain_images(self.cfg)
            data = super().load()
            check(self.public.shape[1:] == data.train[0].shape[1:], f"--pretrain {self.cfg.pretrain} gives images "
                  f"of shape {tuple(self.public.shape[1:])} but the private data {tuple(data.train[0].shape[1:])}; "
                  "pass --resolution and --grayscale so that both match.")
            if self.cfg.adapter == "lora" and self.cfg.lora_targets:
                model_class, kwargs = ImageAudit.network(self, data)
                check_lora_targets(model_class(**kwargs), tuple(self.cfg.lora_targets))
            return data
        self._use_base(resolve_base(self.cfg.base))
        data = super().load()
        self._check_channels(data)
        if self.cfg.adapter == "lora" and self.cfg.lora_targets:
            check_lora_targets(base_network(self.base), tuple(self.cfg.lora_targets))
        data.description["base"] = {k: self.base[k] for k in ("weights", "sha256", "format", "network")}
        return data

    def prepare(self, run: Path, data: Data, progress: bool) -> None:
        """With ``--pretrain``: train the base in ``run/base`` (or reuse it there) and describe it in the summary."""
        if self.cfg.pretrain is None:
            return
        stem = pretrain_base(self, run, self.public, progress=progress)
        self.base = resolve_base(stem)
        data.description["base"] = {**{k: self.base[k] for k in ("weights", "sha256", "format", "network")},
                                    "pretrained": load_tensors(stem)[1]["pretrain"]}

    def _use_base(self, base: dict) -> None:
        if self.cfg.base_sha256 not in (None, base["sha256"]):
            raise BiasgenError(f"--base {base['weights']} has sha256 {base['sha256'][:12]}... but the run expects "
                               f"{self.cfg.base_sha256[:12]}...; pass the base the run started from.")
        self.cfg.base_sha256, self.base = base["sha256"], base

    def _check_channels(self, data: Data) -> None:
        have, kwargs = data.train[0].shape[1], self.base["kwargs"]
        channels = kwargs.get("channels", (kwargs.get("config") or {}).get("in_channels"))
        check(channels in (None, have), f"--base takes {channels}-channel images but the data has {have}; "
                                        "pass --grayscale or a base trained on this kind of image.")

    def network(self, data: Data) -> tuple[type, dict]:
        cfg = self.cfg
        return FinetuneNet, dict(base=self.base, adapter=cfg.adapter, lora_rank=cfg.lora_rank,
                                 lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets) or None)

    def evaluate(self, models, shared: Shared):
        record, tensors = super().evaluate(models, shared)
        record.update(near_copies(tensors["samples"], shared.members, shared.reference["train"]))
        return record, tensors

    def summarize(self, records, data, reference, judged) -> dict:
        members = make_members(self.cfg.splits, self.cfg.seeds_per_split)
        leaks = leak_list(records, members, data.extra["train_names"])
        leaked = [e for e in leaks if e["first_leak_step"] is not None]
        return {**super().summarize(records, data, reference, judged),
                "leaks": {"n_images": len(leaks), "n_leaked": len(leaked), "first_leak_step":
                          leaked[0]["first_leak_step"] if leaked else None, "rule": "d1/d2 < 1/3 (as f_mem)",
                          "images": leaks}}

    def terminal_lines(self, summary: dict) -> list[str]:
        leaks = summary["leaks"]
        first = f", the first at step {leaks['first_leak_step']}" if leaks["n_leaked"] else ""
        return [f"leaks: {leaks['n_leaked']} of {leaks['n_images']} private images copied by a sample{first} "
                "(leaks.csv)"]

    def plot(self, run: Path, records, summary, data: Data) -> None:
        super().plot(run, records, summary, data)
        write_leaks_csv(run / "leaks.csv", summary["leaks"]["images"])
        rows = leak_rows(run, summary["leaks"]["images"], data.train)
        if rows:
            shown = [(label, unscale_images(x, self.cfg.scaling, data.extra["mean"]).clamp(0, 1)) for label, x in rows]
            plot_gallery(shown, run / "fig_leaks.png", value_range=(0.0, 1.0))


def export_merged(run: str | Path, model: int, step: int, out: str | Path) -> Path:
    """Model ``model`` of the fine-tune in ``run`` at ``step``, base and adapters merged, written to ``out``: a
    diffusers ``DDPMPipeline`` folder for a diffusers base, else a biasgen checkpoint ``<out>.safetensors`` +
    ``.json`` that ``--base`` accepts."""
    info = read_json(Path(run) / "run.json", keys=("kind", "config"))
    if info["kind"] != "finetune":
        raise BiasgenError(f"{run} holds a {info['kind']!r} run; export-merged takes a biasgen finetune run (for an "
                           "audit with --model diffusers: biasgen.images.audit.export_checkpoint).")
    stem = checkpoint_stem(Path(run) / "models" / f"model{model}", step)
    _, meta = load_tensors(stem)
    net = merged_network(load_model(FinetuneNet, meta["model"], stem, "cpu"))
    if meta["model"]["base"]["network"] == "diffusers":
        cfg = info["config"]
        return export_pipeline(net, out, noise_schedule(cfg["schedule"], cfg["T"], cfg["scheduler_config"]))
    out = Path(out).with_suffix("")
    if out.with_suffix(".safetensors").exists() or out.with_suffix(".json").exists():
        raise BiasgenError(f"{out}.safetensors or {out}.json exists; choose another --out.")
    save_tensors(out, net.state_dict(), {"model": meta["model"]["base"]["kwargs"], "config": {"model": "unet"},
                                         "merged_from": {"run": str(run), "model": model, "step": step,
                                                         "base_sha256": meta["model"]["base"]["sha256"]}})
    return out.with_suffix(".safetensors")


def finetune(out: str | Path, preset: str | None = "default", config: str | Path | None = None, *,
             resume: bool = False, force: bool = False, progress: bool = True, **settings) -> dict:
    """Python API of ``biasgen finetune``: resolve the config, run, and return ``summary.json`` as a dict."""
    return run_experiment(ImageFinetune.from_settings(preset, config, **settings), out, resume=resume, force=force,
                          progress=progress)
