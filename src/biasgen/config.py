"""One config object per experiment: presets, TOML files and command-line flags.

An experiment defines a dataclass whose fields carry a ``help`` in their
metadata, and a ``PRESETS`` dict of partial overrides. Values are resolved in
this order (later wins): dataclass defaults < preset < ``--config FILE.toml`` <
command-line flags. Every field becomes a flag ``--field-name`` automatically.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from .errors import BiasgenError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default, help: str):
    """A dataclass field with a help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _base_type(annotation):
    """``(base, optional)`` for an annotation like ``int``, ``float | None`` or ``tuple[int, ...]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])[0], True
    return annotation, False


def coerce(cls, name: str, value):
    """Convert ``value`` (from TOML or a flag string) to the type of field ``name`` of ``cls``."""
    hints = typing.get_type_hints(cls)
    base, optional = _base_type(hints[name])
    try:
        if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
            if not optional:
                raise ValueError("this setting cannot be empty")
            return None
        if typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(item(v) for v in value)
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return base(value)
    except (TypeError, ValueError) as e:
        raise BiasgenError(f"Bad value {value!r} for '{name}': {e}. Expected {hints[name]}.") from e


def load_toml(path: str | Path) -> dict:
    """Read a TOML config file (flat ``key = value`` pairs; keys with '-' or '_')."""
    path = Path(path)
    if not path.exists():
        raise BiasgenError(f"Config file {path} does not exist. Check the path given to --config.")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BiasgenError(f"Config file {path} is not valid TOML: {e}. Fix the syntax (flat 'key = value' lines).") from e
    return {k.replace("-", "_"): v for k, v in raw.items()}


def build_config(cls, presets: dict, preset: str | None = None, toml: str | Path | None = None, overrides: dict | None = None):
    """Resolve a config of dataclass ``cls``: defaults < preset < TOML file < overrides; then ``validate()``."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if preset is not None:
        if preset not in presets:
            raise BiasgenError(f"Unknown preset {preset!r}. Available presets: {', '.join(presets)}.")
        values.update(presets[preset])
    layers = [("config file", load_toml(toml) if toml else {}), ("override", overrides or {})]
    for source, layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            raise BiasgenError(
                f"Unknown setting(s) {', '.join(unknown)} in {source}. Valid settings: {', '.join(sorted(names))}."
            )
        values.update(layer)
    cfg = cls(**{k: coerce(cls, k, v) for k, v in values.items()})
    cfg.validate()
    return cfg


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--field-name`` for every field of ``cls`` (default ``None`` = not given)."""
    group = parser.add_argument_group(f"settings (override the preset and --config; see {cls.__name__})")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        is_bool = _base_type(hints[f.name])[0] is bool
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            nargs="?" if is_bool else None,
            const="true" if is_bool else None,
            metavar="BOOL" if is_bool else f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )


def flags_given(args: argparse.Namespace, cls) -> dict:
    """The settings of ``cls`` given on the command line, as raw strings."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def check(condition: bool, message: str) -> None:
    """Raise :class:`BiasgenError` with ``message`` unless ``condition``."""
    if not condition:
        raise BiasgenError(message)
