"""Run folders: one folder per experiment, written atomically, refusing to mix runs.

A run folder holds ``run.json`` (the config, seeds and versions that define it),
``metrics.jsonl`` (one record per evaluated checkpoint), ``summary.json``, PNG
figures and ``models/`` with the checkpoints. Every file is written to a
temporary name first and moved into place, so a kill never leaves a half-written
result behind.
"""
from __future__ import annotations

import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import BiasgenError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def environment() -> dict:
    """Versions and machine facts recorded with every output."""
    from . import __version__

    return {
        "biasgen": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_json(path: Path | str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be read and shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_figure(fig, path: Path | str, dpi: int = 120) -> Path:
    """Write a matplotlib ``Figure`` as PNG to ``path``, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())
    return Path(path)


def read_json(path: Path | str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BiasgenError(f"Cannot read {path}: {e}. Delete the file or rerun with --force.") from e


def append_jsonl(path: Path | str, record: dict) -> None:
    """Append one JSON line (the file is rewritten atomically, so a kill cannot leave a partial line)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    write_bytes(path, old + (json.dumps(record) + "\n").encode())


def read_jsonl(path: Path | str) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BiasgenError(f"{path} is corrupt ({e}). Rerun with --force to start over.") from e


def prepare_run_dir(out: Path | str, config: dict, *, resume: bool, force: bool, kind: str,
                    runtime_keys: tuple[str, ...] = ()) -> Path:
    """Create (or reopen) the run folder ``out`` for a run of ``kind`` defined by ``config``.

    - empty or missing folder: start a new run;
    - a folder holding the same run (same kind and config): continue only with ``resume``;
    - a folder holding a different run, or anything else: refuse, unless ``force``
      (which deletes the old run) — ``resume`` never mixes two different runs.
    Settings named in ``runtime_keys`` (e.g. the device or the number of worker
    processes) do not define the run and may change on resume.
    Writes ``run.json`` with the config and versions.
    """
    out = Path(out)
    config = json.loads(json.dumps(config))  # compare as stored (tuples become lists)
    if out.exists() and not out.is_dir():
        raise BiasgenError(f"--out {out} is a file, not a folder. Choose another --out.")
    existing = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif not existing.exists():
            raise BiasgenError(
                f"--out {out} is not empty and holds no biasgen run. Choose an empty folder, or pass --force to overwrite it."
            )
        else:
            old = read_json(existing)
            old_config = old.get("config", {})
            changed = sorted(k for k in set(config) | set(old_config)
                             if k not in runtime_keys and config.get(k) != old_config.get(k))
            if old.get("kind") != kind or changed:
                raise BiasgenError(
                    f"--out {out} holds a different {old.get('kind', 'unknown')} run (differs in: {', '.join(changed) or 'kind'}). "
                    "Use another --out, or --force to delete it and start over."
                )
            if not resume:
                raise BiasgenError(
                    f"--out {out} already holds this run. Pass --resume to continue it, or --force to start over."
                )
            return out
    out.mkdir(parents=True, exist_ok=True)
    write_json(existing, {"kind": kind, "config": config, "environment": environment()})
    return out


def progress_bar(items, enabled: bool, desc: str, total: int | None = None, initial: int = 0,
                 position: int | None = None):
    """``items`` wrapped in a progress display when ``enabled``; with ``items=None``, a display to
    ``update()`` by hand (or None when not ``enabled``). On a terminal it is a tqdm bar (``position`` is
    its line when several processes show bars); off a terminal (a log file, a cluster job) it is a
    :class:`LineProgress`, one plain line per ``LineProgress.interval_s`` at most."""
    if not enabled:
        return items
    if not sys.stderr.isatty():
        return LineProgress(items, desc=desc, total=total, initial=initial)
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True, position=position)


class LineProgress:
    """Progress for logs: ``desc: n/total (elapsed, postfix)`` on stderr when ``interval_s`` has passed
    since the last line (never per step), and a last line at the end when the work took that long.
    Offers what the code uses of tqdm: iteration, ``update``, ``set_postfix``, ``close``."""

    interval_s = 30.0

    def __init__(self, items=None, *, desc: str, total: int | None = None, initial: int = 0):
        self.items, self.desc, self.n, self.postfix = items, desc, initial, ""
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.items:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval_s:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.last > self.start or time.monotonic() - self.start >= self.interval_s:
            self._line()
        self.last = self.start = time.monotonic()  # a second close writes nothing

    def _line(self) -> None:
        self.last = now = time.monotonic()
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} ({now - self.start:.0f} s{extra})", file=sys.stderr, flush=True)
