"""Run folders: one folder per experiment, written atomically, refusing to mix runs, one writer at a time.

A run folder holds ``run.json`` (the config, seeds and versions that define it),
``metrics.jsonl`` (one record per evaluated checkpoint), ``summary.json``, PNG
figures and ``models/`` with the checkpoints. Every file is written to a
temporary name first and moved into place, so a kill never leaves a half-written
result behind. While a run writes, it holds an exclusive lock on
``.biasgen.lock`` in its folder (:class:`RunLock`), so a second process cannot
write into the same folder. ``--force`` deletes only a folder that holds a
biasgen run (or nothing), and never one that holds an input of the run
(docs/safety.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

from .errors import BiasgenError


_UMASK = os.umask(0o022)
os.umask(_UMASK)
LOCK_NAME = ".biasgen.lock"
STEP = ("step",)  # what a metrics.jsonl record must hold (read_jsonl(path, STEP)): a step, once per file
KEEP_MODELS = "do not use --force there, which would delete the trained models"


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


# -- writing ------------------------------------------------------------------------------------

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


def append_jsonl(path: Path | str, record: dict) -> None:
    """Append one JSON line (the file is rewritten atomically, so a kill cannot leave a partial line)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    write_bytes(path, old + (json.dumps(record) + "\n").encode())


# -- reading: one tolerant reader for every file biasgen reads -----------------------------------

def read_json(path: Path | str, *, keys: tuple[str, ...] = (), fix: str | None = None) -> dict:
    """The JSON object in ``path``, which must hold the ``keys``; a BiasgenError naming the file otherwise.

    ``fix``: what the user can safely do about a damaged file (default: restore it from a copy)."""
    path = Path(path)
    fix = f"Restore it from a copy; if it belongs to a run folder, {KEEP_MODELS}." if fix is None else fix
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BiasgenError(f"Cannot read {path}: {e.strerror or e}. Check that it exists and is readable.") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BiasgenError(f"{path} line {line} holds bytes that are not text: the file is damaged. {fix}".rstrip()) from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BiasgenError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): the file is damaged. {fix}".rstrip()) from e
    missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else list(keys)
    if not isinstance(obj, dict) or missing:
        found = f"lacks {', '.join(repr(k) for k in missing)}" if isinstance(obj, dict) else f"holds a {type(obj).__name__}"
        raise BiasgenError(f"{path} is not the JSON object biasgen wrote (it {found}). {fix}".rstrip())
    return obj


def scan_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> tuple[list[dict], list[tuple[int, str]]]:
    """The records of a JSON-lines file that read well, and ``(line number, problem)`` for every line that does not.

    A record must be a JSON object with the ``required`` keys; with ``"step"`` required, each step (an integer)
    must appear once. Lines are numbered from 1 as an editor shows them; blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        return [], []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise BiasgenError(f"Cannot read {path}: {e.strerror or e}. Check that it is readable.") from e
    records, problems, steps = [], [], {}
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        number, problem = i + 1, None
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "holds bytes that are not text (the file is damaged)"
        except json.JSONDecodeError as e:
            cut = i == last and i == len(lines) - 1  # the last line, without its newline
            problem = "is cut off mid-record" if cut else f"is not valid JSON ({e.msg})"
        else:
            if not isinstance(record, dict) or any(k not in record for k in required):
                problem = f"is not a record with {', '.join(repr(k) for k in required) or 'keys'}"
            elif "step" in required and (not isinstance(record["step"], int) or isinstance(record["step"], bool)):
                problem = f"has step {record['step']!r}, not a whole number"
            elif "step" in required and record["step"] in steps:
                problem = (f"repeats step {record['step']} of line {steps[record['step']]} "
                           "(two processes wrote into this folder)")
            else:
                steps[record.get("step")] = number
                records.append(record)
        if problem:
            problems.append((number, problem))
    return records, problems


def read_jsonl(path: Path | str, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a JSON-lines file (none if it does not exist); a BiasgenError naming the first bad line."""
    records, problems = scan_jsonl(path, required)
    if problems:
        number, problem = problems[0]
        more = f" ({len(problems) - 1} more bad lines after it)" if len(problems) > 1 else ""
        raise BiasgenError(f"{path} line {number} {problem}{more}. Keep a copy of the file, remove that line, then "
                           f"run the command again (--resume continues a run); {KEEP_MODELS}.")
    return records


# -- the run folder -----------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on ``FOLDER/.biasgen.lock`` held while one process writes the run folder.

    The operating system releases it when the process ends, however it ends, so a lock file left by a
    killed process never blocks the next run. The file names the holder (pid, host, command) for the
    message a second process gets. Use as a context manager, or call :meth:`release`.
    """

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / LOCK_NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise BiasgenError(f"Run folder {folder} is in use by {holder}. Wait for it to finish, or choose another "
                               "--out.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()} (command: {' '.join(sys.argv)})\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing the file releases the lock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_out(out: Path | str, inputs: Iterable[Path | str] = (), *, force: bool = False) -> Path:
    """Refuse an ``out`` that is a file, a symbolic link given with ``force``, or that equals, contains or lies
    inside one of the existing ``inputs`` (data, checkpoints, config files: whatever the run reads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BiasgenError(f"--out {out} is a file, not a folder. Choose another --out.")
    if force and out.is_symlink():
        raise BiasgenError(f"--out {out} is a symbolic link; --force does not delete through links. Give the folder "
                           f"it points to ({out.resolve()}), or another --out.")
    target = out.resolve()
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue
        real = path.resolve()
        if real == target or target in real.parents or real in target.parents:
            where = ("is" if real == target else "contains" if target in real.parents else "lies inside")
            raise BiasgenError(f"--out {out} {where} the input {given}; a run never writes where its inputs are. "
                               "Choose an --out outside every input.")
    return out


def prepare_run_dir(out: Path | str, config: dict, *, resume: bool, force: bool, kind: str,
                    runtime_keys: tuple[str, ...] = (), inputs: Iterable[Path | str] = (),
                    defaults: dict | None = None) -> Path:
    """Create (or reopen) the run folder ``out`` for a run of ``kind`` defined by ``config``.

    - empty or missing folder: start a new run;
    - a folder holding the same run (same kind and config): continue only with ``resume``;
    - a folder holding a different run: refuse, unless ``force`` (which deletes the old run);
    - anything else (a folder with files biasgen did not write): refuse, even with ``force``.
    ``inputs``: paths the run reads; ``out`` may not equal, contain or lie inside any (:func:`check_out`).
    Settings named in ``runtime_keys`` (e.g. the device or the number of worker
    processes) do not define the run and may change on resume. ``defaults``: the value of each setting in a run
    written before that setting existed (its default, which keeps the former behaviour), so that such a run
    resumes after an upgrade.
    Writes ``run.json`` with the config and versions. The caller holds the folder's :class:`RunLock`
    (:func:`open_run_dir` takes both steps).
    """
    out = check_out(out, inputs, force=force)
    config = json.loads(json.dumps(config))  # compare as stored (tuples become lists)
    existing = out / "run.json"
    content = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.exists() else []
    if content and not existing.exists():
        shown = ", ".join(content[:8]) + (f" and {len(content) - 8} more" if len(content) > 8 else "")
        raise BiasgenError(f"--out {out} is not empty and holds no biasgen run ({shown}); biasgen deletes only "
                           "folders it wrote, even with --force. Choose an empty or new folder.")
    if content:
        old = read_json(existing, keys=("kind", "config"),
                        fix="Choose another --out; to start over in this folder, delete it yourself.")
        old_config = old["config"] if isinstance(old["config"], dict) else {}
        old_config = with_defaults(old_config, config, json.loads(json.dumps(defaults or {})))
        if force:
            _empty(out)
        else:
            changed = sorted(k for k in set(config) | set(old_config)
                             if k not in runtime_keys and config.get(k) != old_config.get(k))
            if old["kind"] != kind or changed:
                raise BiasgenError(_different_run(out, old["kind"], old_config, config, changed,
                                                  hint=resume and old["kind"] == kind))
            if not resume:
                raise BiasgenError(
                    f"--out {out} already holds this run. Pass --resume to continue it, or --force to start over."
                )
            return out
    out.mkdir(parents=True, exist_ok=True)
    write_json(existing, {"kind": kind, "config": config, "environment": environment()})
    return out


def _different_run(out: Path, old_kind: str, old: dict, new: dict, changed: list[str], hint: bool) -> str:
    """The refusal of a folder that holds another run: each differing setting with the run's value and today's,
    and (``hint``: on --resume) the flags that continue the run as it was made."""
    stored = ", ".join(f"{k} (the run: {old.get(k)!r}; now: {new.get(k)!r})" for k in changed)
    same = " ".join(f"--{k.replace('_', '-')} {_flag_value(old[k])}" for k in changed
                    if k in old and k in new and not isinstance(old[k], dict))
    how = (f"To continue it, pass its settings: --resume {same} (a preset's defaults may have changed since it was "
           "made). " if hint and same else "")
    return (f"--out {out} holds a different {old_kind} run (differs in: {stored or 'kind'}). {how}"
            "Use another --out, or --force to delete it (with its trained models) and start over.")


def _flag_value(value) -> str:
    """A stored setting as the command line spells it: ``none``, ``1,2`` for a list, else the value."""
    if value is None:
        return "none"
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def with_defaults(old: dict, new: dict, defaults: dict) -> dict:
    """``old`` (a stored config) with each setting that ``new`` has and ``old`` lacks taken from ``defaults``, also
    inside nested settings (a sweep's ``settings``): what a run written before that setting existed used."""
    filled = dict(old)
    for key, default in defaults.items():
        if key not in new:
            continue
        if key not in filled:
            filled[key] = default
        elif isinstance(filled[key], dict) and isinstance(default, dict) and isinstance(new[key], dict):
            filled[key] = with_defaults(filled[key], new[key], default)
    return filled


def _empty(folder: Path) -> None:
    """Delete everything in the run folder ``folder`` but its lock file (links are removed, never followed)."""
    for path in folder.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def claim_run_dir(out: Path | str, config: dict, **options) -> tuple[Path, RunLock]:
    """Lock the run folder ``out`` (:class:`RunLock`), then :func:`prepare_run_dir` it with ``options``;
    returns the folder and the held lock (released again when preparing fails)."""
    check_out(out, options.get("inputs", ()), force=options.get("force", False))
    Path(out).mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        return prepare_run_dir(out, config, **options), lock
    except BaseException:
        lock.release()
        raise


@contextlib.contextmanager
def open_run_dir(out: Path | str, config: dict, **options):
    """:func:`claim_run_dir` for the length of a ``with`` block; yields the folder."""
    folder, lock = claim_run_dir(out, config, **options)
    with lock:
        yield folder


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
