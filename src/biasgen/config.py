"""One config object per experiment: presets, TOML files and command-line flags.

Every twin experiment's config extends :class:`TwinConfig`, which holds the
settings all of them share (splits, seeds, training, sampling, runtime) and
their checks; an experiment adds its own fields and checks in ``validate``.
A config validates itself when it is built, so an invalid one never exists.
Each experiment also has a ``PRESETS`` dict of partial overrides. Values are
resolved in this order (later wins): dataclass defaults < preset <
``--config FILE.toml`` < command-line flags. Every field becomes a flag
``--field-name`` automatically.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from .errors import BiasgenError
from .jobs import BACKENDS, Backend, make_backend
from .sampler import (DEFAULT_HOLD_ABOVE, DEFAULT_HOLD_EVERY, DEFAULT_SAMPLE_SPACING, DEFAULT_SAMPLE_STEPS,
                      DEFAULT_SAMPLER, HOLD_EVERY_HELP, HOLD_HELP, SAMPLE_STEPS_HELP, SAMPLER_HELP, SAMPLERS,
                      SPACING_HELP, SPACINGS, describe_sampler, network_call_count)

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


def coerce(cls, name: str, value, strict: bool = False):
    """Convert ``value`` (from TOML or a flag string) to the type of field ``name`` of ``cls``.

    A bool is never taken for a number. ``strict`` (a TOML file's values, which have types): a number,
    bool or list must be written as one, not as a string; ``"none"`` is the only string an optional
    setting that is not a string accepts.
    """
    hints = typing.get_type_hints(cls)
    base, optional = _base_type(hints[name])
    try:
        if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
            if not optional:
                raise ValueError("this setting cannot be empty")
            return None
        if typing.get_origin(base) is tuple:
            if strict and not isinstance(value, list):
                raise ValueError("write a list, e.g. [1, 2]")
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(_scalar(typing.get_args(base)[0], v, strict) for v in value)
        return _scalar(base, value, strict)
    except (TypeError, ValueError) as e:
        raise BiasgenError(f"Bad value {value!r} for '{name}': {e}. Expected {hints[name]}.") from e


def _scalar(base: type, value, strict: bool):
    """``value`` as a ``base`` (bool, int, float or str); ValueError when it is not one."""
    if base is bool:
        if isinstance(value, bool):
            return value
        if not strict and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if not strict and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(value, bool):
        raise ValueError(f"a bool is not {'a number' if base in (int, float) else 'text'}")
    if strict and base in (int, float) and not isinstance(value, (int, float)):
        raise ValueError("write a number without quotes")
    if strict and base is str and not isinstance(value, str):
        raise ValueError("write text in quotes")
    if base is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    return base(value)


def load_toml(path: str | Path) -> dict:
    """Read a TOML config file (flat ``key = value`` pairs; keys with '-' or '_')."""
    path = Path(path)
    if not path.exists():
        raise BiasgenError(f"Config file {path} does not exist. Check the path given to --config.")
    if not path.is_file():
        raise BiasgenError(f"--config {path} is a folder, not a TOML file. Give the file itself.")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BiasgenError(f"Config file {path} is not valid TOML: {e}. Fix the syntax (flat 'key = value' lines).") from e
    return {k.replace("-", "_"): v for k, v in raw.items()}


def build_config(cls, presets: dict, preset: str | None = None, toml: str | Path | None = None, overrides: dict | None = None):
    """Resolve a config of dataclass ``cls``: defaults < preset < TOML file < overrides (validated when built)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if preset is not None:
        if preset not in presets:
            raise BiasgenError(f"Unknown preset {preset!r}. Available presets: {', '.join(presets)}.")
        values.update(presets[preset])
    values = {k: coerce(cls, k, v) for k, v in values.items()}
    layers = [("config file", load_toml(toml) if toml else {}), ("override", overrides or {})]
    for source, layer in layers:
        unknown = sorted(set(layer) - names)
        if unknown:
            raise BiasgenError(
                f"Unknown setting(s) {', '.join(unknown)} in {source}. Valid settings: {', '.join(sorted(names))}."
            )
        values.update({k: coerce(cls, k, v, strict=source == "config file") for k, v in layer.items()})
    return cls(**values)


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


def config_defaults(cfg) -> dict:
    """Every field of the config dataclass (or instance) ``cfg`` that has a default, with that default."""
    return {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}


def check(condition: bool, message: str) -> None:
    """Raise :class:`BiasgenError` with ``message`` unless ``condition``."""
    if not condition:
        raise BiasgenError(message)


def check_at_least(cfg, minimum: int, *names: str) -> None:
    """Each setting in ``names`` must be at least ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        check(value >= minimum, f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")


class ReadsInputs:
    """A config whose settings named in ``INPUT_KEYS`` are files or folders the run reads: the run's ``--out``
    may never equal, contain or lie inside one (:func:`biasgen.runs.check_out`), so ``--force`` cannot delete it."""

    INPUT_KEYS: typing.ClassVar[tuple[str, ...]] = ()

    def input_paths(self) -> list[Path]:
        """The existing files and folders the settings in ``INPUT_KEYS`` name (a data set's name is not one)."""
        values = [getattr(self, key) for key in self.INPUT_KEYS]
        return [Path(v).expanduser() for v in values if isinstance(v, str) and Path(v).expanduser().exists()]


@dataclasses.dataclass
class TwinConfig(ReadsInputs):
    """The settings every twin experiment shares. Subclasses add theirs and extend :meth:`validate`."""

    # splits and models
    n: int = opt(256, "training examples per split")
    splits: int = opt(2, "number of disjoint training splits K (>= 2)")
    seeds_per_split: int = opt(1, "models per split; >1 adds same-split pairs as a seed-variance control")
    n_test: int = opt(512, "held-out test examples")
    seed: int = opt(0, "master seed: permutation, model inits, training, evaluation noise")
    same_init: bool = opt(False, "start every model from the same weights (the twin-distance minimum is then meaningless)")
    # diffusion and model
    T: int = opt(1000, "diffusion steps")
    dropout: float = opt(0.1, "dropout rate")
    # training
    steps: int = opt(1500, "optimisation steps per model")
    batch_size: int = opt(64, "batch size")
    lr: float = opt(1e-3, "Adam learning rate")
    checkpoints: int = opt(12, "number of log-spaced checkpoints (the last one is the final step)")
    first_checkpoint: int = opt(20, "first checkpoint step")
    grad_clip: float | None = opt(1.0, "gradient-norm clipping (none to disable)")
    ema_decay: float | None = opt(None, "EMA decay of the evaluated weights, bias-corrected (none: raw weights)")
    lr_schedule: str = opt("constant", "learning-rate schedule: constant, or halve-cosine (1x, then 0.5x, then cosine to 0.1x)")
    # evaluation
    n_samples: int = opt(128, "samples per model and checkpoint, from shared noise")
    sampler: str = opt(DEFAULT_SAMPLER, SAMPLER_HELP)
    sample_steps: int | None = opt(DEFAULT_SAMPLE_STEPS, SAMPLE_STEPS_HELP)
    sample_spacing: str = opt(DEFAULT_SAMPLE_SPACING, SPACING_HELP)
    hold_above: int = opt(DEFAULT_HOLD_ABOVE, HOLD_HELP)
    hold_every: int = opt(DEFAULT_HOLD_EVERY, HOLD_EVERY_HELP)
    eta: float = opt(0.0, "DDIM noise in [0, 1]: 0 deterministic, 1 the DDPM posterior noise (ddim only)")
    n_boot: int = opt(1000, "bootstrap resamples for the uncertainty of each tau")
    # runtime (may change when a run is resumed)
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    workers: int = opt(0, "local backend: processes that train models / evaluate checkpoints at once (0: one per CPU core on cpu, 1 on a GPU)")
    threads: int = opt(0, "torch CPU threads in the main process during the run (0: torch's default)")
    backend: str = opt("local", "where jobs run: local (worker processes here) or ray (Ray tasks on several GPUs "
                                "or machines; docs/scale-out.md)")
    ray_address: str | None = opt(None, "ray backend: none starts Ray on this machine for the run, auto joins the "
                                        "cluster started here with `ray start`, HOST:PORT joins that head node")
    cpus_per_job: float = opt(1.0, "ray backend: CPUs each job reserves (also its torch threads)")
    gpus_per_job: float = opt(0.0, "ray backend: GPUs each job reserves (0.25: four jobs share one GPU)")

    RUNTIME_KEYS = ("device", "workers", "threads", "backend", "ray_address", "cpus_per_job",
                    "gpus_per_job")  # settings that do not define the run

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check(self.splits >= 2, f"--splits must be at least 2 (twins need two disjoint splits), got {self.splits}.")
        check_at_least(self, 1, "n", "n_test", "seeds_per_split", "steps", "batch_size", "checkpoints",
                       "first_checkpoint", "n_samples")
        check_at_least(self, 0, "n_boot", "workers", "threads")
        check(self.first_checkpoint <= self.steps, f"--first-checkpoint {self.first_checkpoint} lies past the last "
              f"step (--steps {self.steps}); give a first checkpoint at or before it.")
        check(self.T >= 10, f"--T must be at least 10, got {self.T}.")
        check(self.lr > 0, f"--lr must be positive, got {self.lr}.")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}.")
        check(self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be positive (or none).")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "--ema-decay must be in (0, 1) (or none).")
        check(self.lr_schedule in ("constant", "halve-cosine"),
              f"--lr-schedule must be constant or halve-cosine, got {self.lr_schedule!r}.")
        check(self.sampler in SAMPLERS, f"--sampler must be {' or '.join(SAMPLERS)}, got {self.sampler!r}.")
        check(self.sample_steps is None or 1 <= self.sample_steps <= self.T,
              f"--sample-steps must be in [1, {self.T}] (or none for all T), got {self.sample_steps}.")
        check(self.sample_spacing in SPACINGS,
              f"--sample-spacing must be {' or '.join(SPACINGS)}, got {self.sample_spacing!r}.")
        check(0 <= self.hold_above < self.T and self.hold_every >= 1, f"--hold-above must be in [0, {self.T}) and "
              f"--hold-every at least 1, got {self.hold_above} and {self.hold_every}.")
        check(0 <= self.eta <= 1, f"--eta must be in [0, 1], got {self.eta}.")
        check(self.eta == 0 or self.sampler == "ddim",
              f"--eta is a DDIM setting; the ddpm sampler always draws the full posterior noise (got --eta {self.eta}).")
        check(self.backend in BACKENDS, f"--backend must be {' or '.join(BACKENDS)}, got {self.backend!r}.")
        check(self.ray_address is None or self.backend == "ray", "--ray-address is used only with --backend ray: add --backend ray.")
        check(self.cpus_per_job > 0 and self.gpus_per_job >= 0,
              "--cpus-per-job must be positive and --gpus-per-job at least 0.")
        check(self.backend != "ray" or not self.device.startswith("cuda") or self.gpus_per_job > 0,
              f"--device {self.device} with --backend ray needs --gpus-per-job (e.g. 1, or 0.25 to share a GPU): "
              "Ray hides the GPUs from jobs that reserve none.")
        check(not self.device.startswith("cuda") or self.backend == "ray" or _cuda_available(),
              f"--device {self.device} is not available here (no CUDA GPU); pass --device cpu.")

    @property
    def sample_step_count(self) -> int:
        """Denoiser calls per sample (:func:`biasgen.sampler.network_call_count`)."""
        return network_call_count(self.T, self.sample_steps, self.sample_spacing, self.hold_above, self.hold_every)

    @property
    def sampler_settings(self) -> dict:
        """The keyword arguments of :func:`biasgen.sampler.sample` that choose the sampler."""
        return dict(method=self.sampler, steps=self.sample_steps, eta=self.eta, spacing=self.sample_spacing,
                    hold_above=self.hold_above, hold_every=self.hold_every)

    @property
    def sampler_name(self) -> str:
        """The sampler's short name (:func:`biasgen.sampler.describe_sampler`), e.g. ``'ddpm-1000-hold300x4'``."""
        return describe_sampler(self.sampler, self.sample_steps, self.eta, self.T, self.sample_spacing,
                                self.hold_above, self.hold_every)

    @property
    def job_backend(self) -> Backend:
        """Where the run's jobs (models to train, checkpoints to evaluate) run: :func:`biasgen.jobs.make_backend`."""
        return make_backend(self.backend, workers=self.workers, device=self.device, ray_address=self.ray_address,
                            cpus_per_job=self.cpus_per_job, gpus_per_job=self.gpus_per_job)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
