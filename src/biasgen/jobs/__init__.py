"""Independent jobs (one model to train, one checkpoint to evaluate) spread over worker processes.

Small networks use a CPU core poorly through intra-op threads; one process per
core with one thread each trains two small models in about the time of one.
A job function is a picklable top-level function ``fn(job, shared)``: ``job``
is what differs between jobs (a model index, a checkpoint step), ``shared`` is
what every job needs (training sets, evaluation references). ``shared`` is sent
to each worker process once, when it starts, not with every job.

A backend runs the jobs: :class:`LocalBackend` (a process pool on this
machine) or :class:`RayBackend` (Ray tasks with declared CPUs and GPUs, on this
machine or a cluster: biasgen.jobs.ray_tasks). Both offer the same four things,
so callers never test which one they hold::

    backend = make_backend("local", workers=0, device="cpu")   # or a config's job_backend
    with backend.session():                                   # one Ray connection for a whole run
        backend.check_shared_storage(run_dir)                 # can every worker write there?
        for result in backend.run(fn, jobs, shared): ...      # in completion order
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from ..errors import BiasgenError


def resolve_workers(requested: int, device: str) -> int:
    """``requested`` if positive; 0 means one worker per CPU core on a CPU device, a single worker on an accelerator."""
    if requested > 0:
        return requested
    return max(1, os.cpu_count() or 1) if str(device) == "cpu" else 1


@contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch CPU threads (0: leave torch's setting), then restore the caller's."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_SHARED = None  # the ``shared`` argument of LocalBackend.run, set once in each worker process


def _init_worker(threads: int, parent: int, shared) -> None:
    """Set the worker's thread count and its shared inputs, and make it exit when the main process dies
    (a killed run must not leave workers writing into its folder while it is resumed)."""
    global _SHARED
    _SHARED = shared
    torch.set_num_threads(threads)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _call(fn: Callable, job):
    return fn(job, _SHARED)


BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class LocalBackend:
    """Worker processes on this machine, ``workers`` jobs at once (in-process when ``workers <= 1``)."""

    workers: int
    draws_bars: bool = True  # jobs may draw their own progress bars (they share this terminal)

    def run(self, fn: Callable, jobs: Sequence, shared=None) -> Iterator:
        """Yield ``fn(job, shared)`` for every job, in completion order; ``shared`` goes to each worker once."""
        if self.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job, shared)
            return
        workers = min(self.workers, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, os.getpid(), shared))
        try:
            futures = [pool.submit(_call, fn, job) for job in jobs]
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def bar_position(self, index: int) -> int | None:
        """The terminal line of job ``index``'s progress bar among those running at once."""
        return index % self.workers if self.workers > 1 else None

    def session(self) -> ContextManager:
        return nullcontext()

    def check_shared_storage(self, run_dir: Path) -> None:
        """Local workers see this machine's files: nothing to check."""


@dataclass(frozen=True)
class RayBackend:
    """Ray tasks that each reserve ``cpus_per_job`` CPUs and ``gpus_per_job`` GPUs, placed by Ray (biasgen.jobs.ray_tasks).

    ``address``: None starts a local Ray instance, ``"auto"`` joins this machine's cluster, else ``HOST:PORT``.
    """

    address: str | None = None
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0  # fractions share a GPU
    draws_bars: bool = False  # Ray workers cannot draw a bar: the caller shows one bar of finished jobs

    def run(self, fn: Callable, jobs: Sequence, shared=None) -> Iterator:
        """Yield ``fn(job, shared)`` for every job, in completion order; ``shared`` enters the object store once."""
        from .ray_tasks import run_ray_jobs

        yield from run_ray_jobs(fn, jobs, shared, address=self.address, cpus_per_job=self.cpus_per_job,
                                gpus_per_job=self.gpus_per_job)

    def bar_position(self, index: int) -> None:
        return None

    def session(self) -> ContextManager:
        """Keep Ray connected for the block: one session for a whole run, not one per :meth:`run`."""
        from .ray_tasks import ray_session

        return ray_session(self.address)

    def check_shared_storage(self, run_dir: Path) -> None:
        """BiasgenError unless Ray's workers can write into ``run_dir`` (on a cluster: storage every node sees)."""
        from .ray_tasks import check_shared_storage

        check_shared_storage(run_dir, address=self.address)


Backend = LocalBackend | RayBackend


def make_backend(name: str, *, workers: int = 0, device: str = "cpu", ray_address: str | None = None,
                 cpus_per_job: float = 1.0, gpus_per_job: float = 0.0) -> Backend:
    """The backend called ``name`` (``BACKENDS``) with its settings; ``workers`` and ``device``: the local backend's
    worker count (:func:`resolve_workers`), the others: the Ray backend's."""
    if name == "local":
        return LocalBackend(resolve_workers(workers, device))
    if name == "ray":
        return RayBackend(ray_address, cpus_per_job, gpus_per_job)
    raise BiasgenError(f"Unknown backend {name!r}: pick {' or '.join(BACKENDS)}.")
