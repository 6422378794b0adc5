"""Hugging Face diffusers networks in biasgen: build, adapt, export, and read their checkpoints and schedulers.

    config = load_unet_config("ddpm-digits/unet")         # the config.json diffusers writes (or its folder)
    check_unet_fits(config, train.shape[1:])              # channels and sample size match the data
    net = DiffusersEps(config)                            # a new UNet2DModel as an nn.Module: eps_hat = net(x_t, t), t in 1..T
    net = DiffusersEps(unet=model)                        # the same view of a UNet2DModel you already have
    schedule = schedule_from_scheduler_config("ddpm-digits/scheduler")
    export_pipeline(net, "exported", schedule)            # DDPMPipeline.from_pretrained("exported") loads it

Time steps. biasgen counts ``t = 1..T`` with ``alpha_bar[t]`` the product of the
first ``t`` factors ``(1 - beta)``; diffusers counts ``k = 0..T-1`` with
``alphas_cumprod[k]`` the product of the first ``k + 1``. So biasgen's step ``t``
is diffusers' timestep ``t - 1``, and :class:`DiffusersEps` shifts it: a network
trained through it sees exactly the timesteps a ``DDPMScheduler`` gives it.

Nothing is ever downloaded: networks are built from config files, weights come
from local safetensors files (pickled ``.bin`` weights are refused).
``diffusers`` is an optional dependency: ``pip install "biasgen[diffusers]"``.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_tensors
from ..errors import BiasgenError
from ..schedule import NoiseSchedule

INSTALL_HINT = 'pip install "biasgen[diffusers]"'
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULE_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")
IGNORED_CONFIG_KEYS = {"dropout"}  # settings that do not change the architecture


def require_diffusers():
    """The ``diffusers`` module, or a BiasgenError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise BiasgenError(f"This needs the Hugging Face diffusers library, which is not installed: {INSTALL_HINT}") from e
    return diffusers


def _read_config(source, file_name: str, what: str) -> dict:
    """A config dict from a dict, a JSON file, or a folder holding ``file_name``."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise BiasgenError(f"{what} {path} not found; pass the {file_name} that diffusers wrote (or its folder).")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BiasgenError(f"Cannot read {what} {path} ({e}); pass a valid JSON file.") from e
    if not isinstance(config, dict):
        raise BiasgenError(f"{what} {path} is not a JSON object of settings.")
    return config


# -- UNet2DModel configs ---------------------------------------------------------------------------

def unet_defaults() -> dict:
    """Every UNet2DModel constructor argument with its default value."""
    diffusers = require_diffusers()
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def load_unet_config(source) -> dict:
    """The constructor arguments of a ``UNet2DModel`` (plain JSON types) from a dict, ``config.json`` or its folder.

    A config written by diffusers (``_class_name: UNet2DModel``) is accepted as is:
    private keys and extra keys (an EMA model's ``decay``, ...) are dropped. A
    hand-written config without ``_class_name`` may only use UNet2DModel's arguments.
    """
    config = _read_config(source, "config.json", "UNet config")
    name = config.get("_class_name")
    known = unet_defaults()
    if name is not None and name != "UNet2DModel":
        raise BiasgenError(
            f"The model config is for a {name}, not a UNet2DModel: biasgen audits unconditional image models; "
            "pass the config.json of a UNet2DModel (e.g. the unet/ folder of a DDPMPipeline).")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if name is None and unknown:
        raise BiasgenError(
            f"The model config has settings UNet2DModel does not take: {unknown}; it is not a UNet2DModel config. "
            "Pass the config.json diffusers writes next to a trained UNet2DModel.")
    config = {k: v for k, v in config.items() if k in known}
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise BiasgenError("The model config is class-conditional (class_embed_type / num_class_embeds); "
                           "set both to null: with --conditional biasgen adds the class embedding itself.")
    return json.loads(json.dumps(config))  # tuples become lists


def architecture(config: dict) -> dict:
    """``config`` with every default filled in, minus settings that do not change the weights' layout."""
    full = {**unet_defaults(), **config}
    return {k: v for k, v in json.loads(json.dumps(full)).items() if k not in IGNORED_CONFIG_KEYS}


def check_unet_fits(config: dict, shape) -> None:
    """Raise a BiasgenError unless the UNet maps images of per-image ``shape`` ``(C, H, W)`` to eps of that shape."""
    c, h, w = (int(s) for s in shape)
    full = {**unet_defaults(), **config}
    if full["in_channels"] != c or full["out_channels"] != c:
        raise BiasgenError(
            f"The model config has in_channels={full['in_channels']} and out_channels={full['out_channels']} but the "
            f"images have {c} channel(s); set both to {c} in the config, or load the images "
            f"{'in colour' if c == 1 else 'in grayscale (--grayscale)'} to match.")
    size = full["sample_size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if size != (None, None) and size != (h, w):
        raise BiasgenError(
            f"The model config has sample_size={full['sample_size']} but the images are {h}x{w}; "
            f"resize the images (--resolution {size[0]}) or set sample_size to {h} in the config.")
    f = 2 ** (len(full["block_out_channels"]) - 1)
    if h % f or w % f:
        raise BiasgenError(f"Images of {h}x{w} pixels cannot pass the {len(full['block_out_channels'])} levels of "
                           f"this UNet (size must be divisible by {f}); resize them or use fewer levels.")


def build_unet(config: dict):
    """A freshly initialised ``UNet2DModel(**config)`` (the global RNG draws its weights)."""
    diffusers = require_diffusers()
    try:
        return diffusers.UNet2DModel(**config)
    except (ValueError, TypeError, KeyError) as e:
        raise BiasgenError(f"diffusers cannot build a UNet2DModel from this config: {e}. Fix the config.") from e


class DiffusersEps(nn.Module):
    """A ``UNet2DModel`` seen as biasgen's eps-predictor: ``forward(x_t (B, C, H, W), t (B,) long in 1..T) -> eps_hat``.

    Built from a config (``DiffusersEps(config)``, a fresh network: what the twin
    audit trains) or around a network you have (``DiffusersEps(unet=model)``).
    Shifts ``t`` to diffusers' timestep ``t - 1`` (see the module docstring). The
    state dict holds the UNet's under the prefix ``unet.``.
    """

    def __init__(self, config: dict | None = None, *, unet=None):
        super().__init__()
        if (config is None) == (unet is None):
            raise BiasgenError("DiffusersEps takes either a UNet2DModel config or a built unet=..., not both or neither.")
        self.unet = unet if unet is not None else build_unet(config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``y``: ``(B,)`` class labels of a network built with ``num_class_embeds`` (its last class is "no
        label", used when ``y`` is None)."""
        classes = self.unet.config.num_class_embeds
        if classes is None:
            if y is not None:
                raise BiasgenError("This UNet2DModel has no class embedding (num_class_embeds is null) and takes "
                                   "no class labels.")
            return self.unet(x, t - 1, return_dict=False)[0]
        y = torch.full((len(x),), classes - 1, dtype=torch.long, device=x.device) if y is None else y
        return self.unet(x, t - 1, class_labels=y, return_dict=False)[0]


def is_unet2d(model) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DModel`` (without importing diffusers when nobody did)."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(model, diffusers.UNet2DModel)


def unet_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict from weights saved bare or through :class:`DiffusersEps` (prefix ``unet.``)."""
    if tensors and all(k.startswith("unet.") for k in tensors):
        return {k[len("unet."):]: v for k, v in tensors.items()}
    return tensors


def load_unet_weights(unet, tensors: dict[str, torch.Tensor], source) -> None:
    """Load ``tensors`` (bare or prefixed) into ``unet`` in place; a BiasgenError names ``source`` on mismatch."""
    try:
        unet.load_state_dict(unet_state_dict(tensors))
    except RuntimeError as e:
        raise BiasgenError(f"The weights in {source} do not fit the model config (another architecture?): "
                           f"{str(e)[:300]}. Pass the config.json the weights were trained with.") from e


# -- noise schedules <-> diffusers scheduler configs -------------------------------------------

def schedule_from_scheduler_config(source) -> NoiseSchedule:
    """biasgen's NoiseSchedule from a diffusers ``scheduler_config.json`` (a dict, the file, or its folder).

    Supports ``beta_schedule`` linear, scaled_linear and squaredcos_cap_v2, and
    ``trained_betas``; the model must predict eps (``prediction_type: epsilon``).
    """
    config = _read_config(source, "scheduler_config.json", "scheduler config")
    name = config.get("_class_name", "")
    if name and not name.endswith("Scheduler"):
        raise BiasgenError(f"The scheduler config is for a {name}, not a diffusers scheduler; "
                           "pass scheduler/scheduler_config.json.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise BiasgenError(f"The scheduler predicts {prediction!r}; biasgen measures eps-prediction models "
                           "(prediction_type 'epsilon').")
    if config.get("rescale_betas_zero_snr"):
        raise BiasgenError("rescale_betas_zero_snr makes the last step pure noise (alpha_bar = 0), which biasgen's "
                           "schedules do not allow; train without it.")
    T = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return NoiseSchedule(torch.tensor(config["trained_betas"], dtype=torch.float64), name=f"trained_betas(T={T})")
    if kind == "linear":
        return NoiseSchedule.linear(T, start, end)
    if kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        return NoiseSchedule(betas, name=f"scaled_linear(T={T})")
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T)
    raise BiasgenError(f"beta_schedule {kind!r} is not supported; use one of {', '.join(SCHEDULE_KINDS)} "
                       "or give trained_betas.")


def scheduler_config(schedule: NoiseSchedule, clip: float | None = 1.0) -> dict:
    """``DDPMScheduler`` arguments reproducing ``schedule`` (linear, cosine, or any betas as ``trained_betas``).

    ``clip``: the sampler's clamp of ``x0_hat`` (1.0 for images in [-1, 1]; None for none).
    """
    T, betas = schedule.T, schedule.betas
    config = dict(num_train_timesteps=T, prediction_type="epsilon", variance_type="fixed_small",
                  clip_sample=clip is not None, clip_sample_range=float(clip or 1.0))
    linear = torch.linspace(float(betas[0]), float(betas[-1]), T, dtype=torch.float64)
    if torch.allclose(betas, linear, rtol=1e-9, atol=1e-12):
        return dict(config, beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]))
    if torch.allclose(betas, NoiseSchedule.cosine(T).betas, rtol=1e-9, atol=1e-12):
        return dict(config, beta_schedule="squaredcos_cap_v2")
    return dict(config, trained_betas=betas.tolist())


# -- export ---------------------------------------------------------------------------------------

def export_pipeline(model, out: str | Path, schedule: NoiseSchedule, *, unet_config: dict | None = None,
                    clip: float | None = 1.0, overwrite: bool = False) -> Path:
    """Write ``model`` as a diffusers ``DDPMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``).

    ``model``: a UNet2DModel, a :class:`DiffusersEps`, or the stem of a biasgen
    checkpoint (``<stem>.safetensors`` + ``<stem>.json``) whose sidecar holds the
    UNet config under ``model.config`` (or pass ``unet_config``). The folder is
    written to a temporary name and moved into place, so it is complete or absent.
    ``overwrite`` replaces only a folder that holds an exported pipeline (``model_index.json``).
    """
    diffusers = require_diffusers()
    out = Path(out)
    if isinstance(model, DiffusersEps):
        unet = model.unet
    elif is_unet2d(model):
        unet = model
    else:
        tensors, meta = load_tensors(model)
        config = unet_config or (meta.get("model") or {}).get("config")
        if config is None:
            raise BiasgenError(f"Checkpoint {model} does not record a UNet2DModel config; pass unet_config.")
        unet = build_unet(load_unet_config(config))
        load_unet_weights(unet, tensors, model)
    if out.exists() and not out.is_dir():
        raise BiasgenError(f"{out} is a file; choose a folder to export to.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BiasgenError(f"{out} is not empty; choose another folder or pass overwrite=True.")
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise BiasgenError(f"{out} holds files but no exported pipeline (model_index.json); overwrite replaces only "
                           "a pipeline folder. Choose another folder.")
    scheduler = diffusers.DDPMScheduler(**scheduler_config(schedule, clip))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- folders of checkpoints ------------------------------------------------------------------------

@dataclass(frozen=True)
class FoundCheckpoint:
    """One checkpoint of a training run: its step, its safetensors weights and (diffusers folders) its config.json."""

    step: int
    weights: Path
    config: Path | None


def _step_of(name: str) -> int | None:
    """The last number in a file or folder name (``checkpoint-1500`` -> 1500, ``step_0000120.safetensors`` -> 120)."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def find_checkpoints(folder: str | Path, subfolder: str = "unet") -> list[FoundCheckpoint]:
    """The checkpoints in ``folder``, in step order.

    A checkpoint is a numbered sub-folder holding ``<subfolder>/`` with diffusers'
    ``config.json`` and ``diffusion_pytorch_model.safetensors`` (the
    ``checkpoint-*/unet`` folders of diffusers' training scripts; ``unet_ema`` for
    their EMA weights), or a numbered ``.safetensors`` file (a bare or biasgen
    state dict). The step is the last number in the name; names without one are skipped.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BiasgenError(f"--checkpoints {folder} is not a folder; pass the folder that holds the checkpoints.")
    found = []
    for entry in sorted(folder.iterdir()):
        step = _step_of(entry.stem)
        if entry.name.startswith(".") or step is None:
            continue
        if entry.is_dir() and (entry / subfolder).is_dir():
            weights = entry / subfolder / WEIGHTS_NAME
            if not weights.is_file():
                bins = list((entry / subfolder).glob("*.bin"))
                fix = ("it holds pickled .bin weights, which biasgen does not load (they can run code); re-save them "
                       "with UNet2DModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)"
                       if bins else f"{WEIGHTS_NAME} is missing")
                raise BiasgenError(f"Checkpoint {entry / subfolder}: {fix}.")
            found.append(FoundCheckpoint(step, weights, entry / subfolder / "config.json"))
        elif entry.is_file() and entry.suffix == ".safetensors":
            found.append(FoundCheckpoint(step, entry, None))
    if not found:
        raise BiasgenError(f"No checkpoints in {folder}: expected numbered folders with a {subfolder}/ sub-folder "
                           "(checkpoint-500/unet) or numbered .safetensors files (step_500.safetensors).")
    steps = [c.step for c in found]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    if twice:
        raise BiasgenError(f"{folder} holds several checkpoints for step(s) {twice}; keep one per step.")
    return sorted(found, key=lambda c: c.step)


def _layout(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header (no weights loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BiasgenError(f"Cannot read {path} ({e}); it is not a complete safetensors file.") from e


def check_architectures(checkpoints: list[FoundCheckpoint], config: dict, config_source: str) -> None:
    """Raise a BiasgenError unless every checkpoint has the architecture of ``config`` (config.json and tensor shapes)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_unet(config).state_dict().items()}
    reference = architecture(config)
    bad = []
    for c in checkpoints:
        if c.config is not None:
            differs = sorted(k for k, v in architecture(load_unet_config(c.config)).items() if reference.get(k) != v)
            if differs:
                bad.append(f"{c.config} differs in {', '.join(differs)}")
                continue
        layout = _layout(c.weights)
        layout = {k[len("unet."):]: v for k, v in layout.items()} if all(k.startswith("unet.") for k in layout) else layout
        if layout != expected:
            wrong = sorted(set(layout) ^ set(expected)) or sorted(k for k in layout if layout[k] != expected[k])
            bad.append(f"{c.weights} has other tensors ({len(wrong)} differ, e.g. {wrong[0]})")
    if bad:
        raise BiasgenError(
            f"The checkpoints are not all of the architecture of {config_source}: " + "; ".join(bad[:5])
            + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ". Point --checkpoints at a folder holding one run's checkpoints, with that run's --model-config.")


def load_checkpoint_unet(checkpoint: FoundCheckpoint, config: dict) -> DiffusersEps:
    """The UNet2DModel of ``checkpoint`` (built from ``config``), wrapped as an eps-predictor, in eval mode."""
    from safetensors.torch import load_file

    net = DiffusersEps(config)
    load_unet_weights(net.unet, load_file(str(checkpoint.weights)), checkpoint.weights)
    return net.eval()
