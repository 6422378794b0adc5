"""A pretrained base network to fine-tune, in full or through LoRA adapters (Hu et al. 2022, via ``peft``).

    base = resolve_base("runs/pre/models/model0/step_0003000.safetensors")   # a biasgen checkpoint (+ .json sidecar)
    base = resolve_base("ddpm-folder")                 # a diffusers UNet2DModel folder (config.json + safetensors)
    net = FinetuneNet(base=base, adapter="lora", lora_rank=4)   # forward(x_t (B,C,H,W), t (B,)) -> eps_hat
    net.state_dict()                                   # with LoRA: the adapter weights only

The base is read from safetensors only (never a pickle) and its sha256 is checked every time a network is built
from it, so a changed base file is refused instead of silently mixed with adapters trained on another one. Every
network built from one base starts bit-identical, whatever the seed: twins share their start.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_tensors
from ..errors import BiasgenError
from ..runs import read_json
from .diffusers_model import DiffusersEps, load_unet_config, unet_state_dict
from .unet import UNet

ADAPTERS = ("none", "lora")
# LoRA's default target layers (name suffixes) in biasgen's U-Net and in diffusers' UNet2DModel
LORA_TARGETS = {"unet": ("conv1", "conv2", "qkv", "proj"),
                "diffusers": ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")}
_HASHES: dict[tuple, str] = {}  # (path, size, mtime) -> sha256, so evaluation does not rehash per checkpoint


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file (hex), cached per path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def resolve_base(path: str | Path) -> dict:
    """The base network at ``path`` as JSON: ``network`` (unet | diffusers), its constructor ``kwargs``, the
    ``weights`` file (absolute), its ``sha256`` and its ``format`` (biasgen | diffusers).

    ``path``: a biasgen checkpoint (``<stem>.safetensors`` or the stem, with its ``.json`` sidecar) or a
    diffusers UNet2DModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline folder
    with them under ``unet/``).
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
        weights = folder / "diffusion_pytorch_model.safetensors"
        if not (folder / "config.json").is_file() or not weights.is_file():
            raise BiasgenError(f"--base {path} holds no diffusers UNet2DModel (config.json and "
                               "diffusion_pytorch_model.safetensors); pass such a folder or a biasgen checkpoint "
                               "(step_*.safetensors with its .json).")
        return {"format": "diffusers", "network": "diffusers",
                "kwargs": {"config": load_unet_config(folder / "config.json")},
                "weights": str(weights), "sha256": file_sha256(weights)}
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.is_file() or not sidecar.is_file():
        raise BiasgenError(f"--base {path}: no biasgen checkpoint there ({weights.name} and {sidecar.name}) and no "
                           "diffusers folder; pass a step_*.safetensors of an audit run or a UNet2DModel folder.")
    meta = read_json(sidecar)
    if "model" not in meta or "config" not in meta:
        raise BiasgenError(f"--base {sidecar} is not a biasgen checkpoint sidecar (no model or config); pass a "
                           "checkpoint of an audit run.")
    network = meta["config"].get("model", "unet")
    if network not in ("unet", "diffusers") or "base" in meta["model"]:
        raise BiasgenError(f"--base {weights} is not a plain audit checkpoint (a fine-tune's adapters?); export a "
                           "merged network first (biasgen finetune --export-merged) and pass that.")
    return {"format": "biasgen", "network": network, "kwargs": meta["model"], "weights": str(weights),
            "sha256": file_sha256(weights)}


def _load_base_weights(base: dict) -> dict[str, torch.Tensor]:
    """The base's tensors, after checking the file's sha256 against the recorded one."""
    found = file_sha256(base["weights"])
    if found != base["sha256"]:
        raise BiasgenError(f"The base {base['weights']} has changed since the run started (sha256 {found[:12]}..., "
                           f"recorded {base['sha256'][:12]}...); restore the original file, or start a new run.")
    if base["format"] == "biasgen":
        return load_tensors(Path(base["weights"]).with_suffix(""))[0]
    from safetensors.torch import load_file

    return load_file(base["weights"])


def base_network(base: dict) -> nn.Module:
    """The base network with its weights (eps-predictor ``forward(x, t)``)."""
    tensors = _load_base_weights(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the init is overwritten; fixed so nothing depends on the global RNG
        net = DiffusersEps(**base["kwargs"]) if base["network"] == "diffusers" else UNet(**base["kwargs"])
    try:
        if base["network"] == "diffusers":
            net.unet.load_state_dict(unet_state_dict(tensors))
        else:
            net.load_state_dict(tensors)
    except RuntimeError as e:
        raise BiasgenError(f"The base weights {base['weights']} do not fit their config ({str(e)[:200]}); "
                           "pass a complete checkpoint.") from e
    return net


class FinetuneNet(nn.Module):
    """The base network, fine-tuned in full (``adapter='none'``) or through LoRA adapters on ``lora_targets``.

    ``forward(x (B, C, H, W), t (B,) long in 1..T) -> eps_hat (B, C, H, W)``. With LoRA the base weights are
    frozen and :meth:`state_dict` / :meth:`load_state_dict` hold the adapter weights only.
    """

    def __init__(self, base: dict, adapter: str = "none", lora_rank: int = 4, lora_alpha: float | None = None,
                 lora_targets: tuple[str, ...] | None = None):
        super().__init__()
        if adapter not in ADAPTERS:
            raise BiasgenError(f"--adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}.")
        self.adapter, self.base = adapter, base
        self.net = base_network(base)
        if adapter == "lora":
            targets = tuple(lora_targets) if lora_targets else present(self.net, LORA_TARGETS[base["network"]])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # every twin gets the same adapter init (B = 0: the base's function)
                inject_lora(self.net, rank=lora_rank, alpha=lora_alpha or lora_rank, targets=targets)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        return full if self.adapter == "none" else type(full)((k, v) for k, v in full.items() if "lora_" in k)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.adapter == "none":
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        expected = set(self.state_dict())
        if strict and set(state_dict) != expected:
            raise RuntimeError(f"adapter weights differ: missing {sorted(expected - set(state_dict))[:3]}, "
                               f"unexpected {sorted(set(state_dict) - expected)[:3]}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def present(net: nn.Module, targets: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``targets`` that name a layer of ``net`` (a U-Net without attention has no ``qkv``)."""
    names = [name for name, _ in net.named_modules()]
    return tuple(t for t in targets if any(n == t or n.endswith("." + t) for n in names))


def check_lora_targets(net: nn.Module, targets: tuple[str, ...]) -> None:
    """A clear error when one of ``targets`` names no layer of ``net`` (or there is none)."""
    names = [name for name, _ in net.named_modules()]
    unknown = [t for t in targets if t not in present(net, (t,))]
    if unknown or not targets:
        raise BiasgenError(f"--lora-targets {','.join(unknown)} name no layer of the base network; layer names end "
                           f"in e.g. {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names if n})[:8])}.")


def inject_lora(net: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """LoRA adapters (``peft``) on the layers of ``net`` whose names end in one of ``targets``; all else frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise BiasgenError("--adapter lora needs peft: pip install 'biasgen[finetune]'.") from e
    check_lora_targets(net, targets)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), net)
    except (ValueError, TypeError) as e:
        raise BiasgenError(f"peft cannot put LoRA on --lora-targets {','.join(targets)}: {e}") from e
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)


def merged_network(net: FinetuneNet) -> nn.Module:
    """The base network with ``net``'s adapters merged into its weights (a plain network, no peft layers)."""
    if net.adapter == "none":
        return net.net
    from peft.tuners.lora import LoraLayer

    for module in net.net.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {k.replace(".base_layer.", "."): v for k, v in nn.Module.state_dict(net.net).items() if "lora_" not in k}
    with torch.random.fork_rng(devices=[]):
        plain = DiffusersEps(**net.base["kwargs"]) if net.base["network"] == "diffusers" else UNet(**net.base["kwargs"])
    plain.load_state_dict(merged)
    return plain
