"""Independent jobs (one model to train, one checkpoint to evaluate) spread over worker processes.

Small networks use a CPU core poorly through intra-op threads; one process per
core with one thread each trains two small models in about the time of one.
A job function is a picklable top-level function ``fn(job, shared)``: ``job``
is what differs between jobs (a model index, a checkpoint step), ``shared`` is
what every job needs (training sets, evaluation references). ``shared`` is sent
to each worker process once, when it starts, not with every job.

Two backends behind :func:`run_jobs`: ``"local"`` (a process pool on this
machine) and ``"ray"`` (Ray tasks with declared CPUs and GPUs, on this machine
or a cluster: biasgen.jobs.ray_tasks).
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator, Sequence

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


_SHARED = None  # the ``shared`` argument of run_jobs, set once in each worker process


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


def run_jobs(
    fn: Callable,  # top-level function fn(job, shared)
    jobs: Sequence,  # what differs between jobs
    workers: int,  # local backend: jobs at once (worker processes); the Ray backend places jobs by resources
    shared=None,  # what every job needs, sent once per worker process (local) or put into the object store once (Ray)
    *,
    backend: str = "local",  # "local" or "ray"
    ray_address: str | None = None,  # Ray: None starts a local instance, "auto" joins this machine's cluster, else HOST:PORT
    cpus_per_job: float = 1.0,  # Ray: CPUs each job reserves
    gpus_per_job: float = 0.0,  # Ray: GPUs each job reserves (fractions share a GPU)
) -> Iterator:
    """Yield ``fn(job, shared)`` for every job, in completion order; in-process when local and ``workers <= 1``."""
    if backend == "ray":
        from .ray_tasks import run_ray_jobs

        yield from run_ray_jobs(fn, jobs, shared, address=ray_address, cpus_per_job=cpus_per_job,
                                gpus_per_job=gpus_per_job)
        return
    if backend != "local":
        raise BiasgenError(f"Unknown backend {backend!r}: pick local or ray.")
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(job, shared)
        return
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid(), shared))
    try:
        futures = [pool.submit(_call, fn, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def job_session(backend: str = "local", ray_address: str | None = None):
    """Keep the backend connected for the block: one Ray session for a whole run, not one per :func:`run_jobs`."""
    if backend != "ray":
        yield
        return
    from .ray_tasks import ray_session

    with ray_session(ray_address):
        yield


def check_shared_storage(run_dir: Path, *, backend: str = "local", ray_address: str | None = None) -> None:
    """BiasgenError unless the backend's workers can write into ``run_dir`` (always true locally)."""
    if backend == "ray":
        from .ray_tasks import check_shared_storage as check_ray

        check_ray(run_dir, address=ray_address)
