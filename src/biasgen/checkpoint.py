"""Checkpoints: safetensors weights with a JSON sidecar (loading never executes code).

A checkpoint ``<stem>`` is two files: ``<stem>.safetensors`` (tensors only) and
``<stem>.json`` (the step, the model's constructor arguments, the config,
seeds and versions). Both are written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import BiasgenError
from .runs import KEEP_MODELS, read_json, write_bytes, write_json


def save_tensors(stem: Path | str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` to ``<stem>.safetensors`` and ``meta`` to ``<stem>.json``."""
    stem = Path(stem)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes(stem.with_suffix(".safetensors"), st_save(data))
    write_json(stem.with_suffix(".json"), meta)


def load_tensors(stem: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``<stem>.safetensors`` and its sidecar; BiasgenError if missing or corrupt."""
    stem = Path(stem)
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not weights.exists() or not sidecar.exists():
        raise BiasgenError(f"Checkpoint {stem} is missing ({weights.name} or {sidecar.name}). Restore it from a copy; "
                           f"{KEEP_MODELS}.")
    try:
        tensors = st_load(weights.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise BiasgenError(f"Checkpoint {weights} is corrupt ({e}). Restore it from a copy; "
                           f"{KEEP_MODELS}.") from e
    return tensors, read_json(sidecar)


def check_safetensors(path: Path | str) -> None:
    """A BiasgenError unless ``path`` is a whole safetensors file: its header parses and its tensors fill the rest
    of the file exactly (a truncated or overwritten file fails; no weights are loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
        whole = ends is not None and 8 + size + max(ends, default=0) == path.stat().st_size
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        whole = False
    if not whole:
        raise BiasgenError(f"{path} is not a whole safetensors file (damaged, truncated or another format); replace "
                           "it or move it out of the checkpoint folder. Nothing was written.")


def save_checkpoint(stem: Path | str, model: torch.nn.Module, meta: dict) -> None:
    """Save ``model``'s weights (state dict) with ``meta`` as sidecar."""
    save_tensors(stem, model.state_dict(), meta)


def load_checkpoint(stem: Path | str, model: torch.nn.Module) -> dict:
    """Load weights saved by :func:`save_checkpoint` into ``model`` in place; returns the sidecar."""
    tensors, meta = load_tensors(stem)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise BiasgenError(
            f"Checkpoint {stem} does not fit this model (different architecture?): {str(e)[:300]}. "
            "Rerun with the checkpoint's config (its run.json), or start over in a new --out."
        ) from e
    return meta


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into named tensors plus a JSON-serialisable remainder."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors`: restore ``opt`` in place."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(json.dumps(info["param_groups"]))})
