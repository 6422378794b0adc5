"""The Ray backend of the job runner: jobs as Ray tasks, on one machine's GPUs or on a cluster.

Each job is one Ray task that declares the CPUs and GPUs it needs (fractions
allowed, so several small models share one GPU); Ray places it on a node with
those resources free. What every job needs (``shared``) goes into Ray's object
store once and every task receives the reference. The run folder stays the only
source of truth: tasks read from and write to it, so on a cluster it must be a
path every node sees (see :func:`check_shared_storage` and docs/scale-out.md)::

    ray start --head                          # on the first machine
    ray start --address HEAD_IP:6379          # on every other machine
    biasgen audit --backend ray --ray-address auto --device cuda --gpus-per-job 0.25 --out /shared/runs/audit

A task whose worker process dies is run again (``MAX_RETRIES``): training
resumes from the model's last checkpoint and every write is atomic, so a retry
neither loses nor duplicates a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import BiasgenError

MAX_RETRIES = 3  # runs of a task after its worker process died
CANCEL_GRACE_S = 3.0  # seconds a cancelled task gets to unwind before its worker is killed
CONNECT_TIMEOUT_S = 5.0  # how long to wait for a --ray-address to answer


def import_ray():
    """The ``ray`` module, or a BiasgenError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise BiasgenError('--backend ray needs Ray, which is not installed here: pip install "biasgen[ray]".') from e
    return ray


def check_reachable(address: str) -> None:
    """BiasgenError unless something answers at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) within seconds.

    Ray itself waits minutes for an address that does not answer; this fails fast instead.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BiasgenError(f"--ray-address {address!r} is not HOST:PORT. Give the head node's address "
                           "(e.g. 10.0.0.5:6379), 'auto' to join the cluster started on this machine, "
                           "or leave it out to start a local Ray instance.")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BiasgenError(f"No Ray cluster answers at --ray-address {address} ({e}). Start one there with "
                           "`ray start --head`, check the host and port, or leave --ray-address out to start "
                           "a local Ray instance.") from e


@contextlib.contextmanager
def ray_session(address: str | None = None):
    """Ray, connected for the duration of the block; yields the ``ray`` module.

    ``address``: None starts a local instance on this machine's cores (and shuts
    it down at the end); ``"auto"`` joins the cluster started on this machine
    with ``ray start``; anything else is a head node's ``HOST:PORT``. If this
    process is already connected to Ray, that connection is used and left open.
    """
    ray = import_ray()
    if address not in (None, "auto"):
        check_reachable(address)
    if ray.is_initialized():
        yield ray
        return
    try:
        if address is None:
            # Ray raises its workers' niceness by 15, so on a busy machine they would yield the cores to every other
            # job; a local instance's workers keep the caller's priority instead, as the local backend's do
            # (a RAY_worker_niceness the user set wins). docs/scale-out.md
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        else:
            ray.init(address=address, logging_level="ERROR")
    except ConnectionError as e:
        raise BiasgenError(f"Cannot join a Ray cluster at --ray-address {address}: {e} "
                           "Start one with `ray start --head`, or leave --ray-address out to start a local "
                           "Ray instance.") from e
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_resources(ray, cpus_per_job: float, gpus_per_job: float) -> None:
    """BiasgenError if no node of the cluster has the resources one job asks for (its tasks would wait forever)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(r.get("CPU", 0) >= cpus_per_job and r.get("GPU", 0) >= gpus_per_job for r in nodes):
        largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
        raise BiasgenError(f"No node of the Ray cluster has {cpus_per_job:g} CPUs and {gpus_per_job:g} GPUs for one job "
                           f"(the largest has {largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs). "
                           "Lower --cpus-per-job / --gpus-per-job, or add such a node.")


def _run_task(fn: Callable, job, shared, threads: int):
    """One job in a Ray worker (Ray hands ``shared`` over from its object store)."""
    import torch

    torch.set_num_threads(threads)
    return fn(job, shared)


def run_ray_jobs(
    fn: Callable,  # top-level function fn(job, shared)
    jobs: Sequence,  # one Ray task per job
    shared=None,  # what every job needs: put into the object store once
    *,
    address: str | None = None,  # see ray_session
    cpus_per_job: float = 1.0,  # CPUs each task reserves (also its torch threads, at least 1)
    gpus_per_job: float = 0.0,  # GPUs each task reserves; 0.25 lets four tasks share a GPU
) -> Iterator:
    """Yield ``fn(job, shared)`` for every job, in completion order, each job run as a Ray task.

    Ctrl-C (or closing the generator) cancels the tasks still pending or running.
    A task that raises a BiasgenError re-raises it here as it is.
    """
    with ray_session(address) as ray:
        _check_resources(ray, cpus_per_job, gpus_per_job)
        task = ray.remote(_run_task).options(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=MAX_RETRIES)
        shared_ref = ray.put(shared)
        threads = max(1, int(cpus_per_job))
        pending = [task.remote(fn, job, shared_ref, threads) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield _result(ray, done[0])
        finally:
            cancel(ray, pending)


def cancel(ray, refs: list) -> None:
    """Cancel the tasks ``refs``: first by interrupting them (they unwind and remove their temporary files), then,
    for any still running after ``CANCEL_GRACE_S``, by killing their worker (every write is atomic, so a killed task
    leaves at most a temporary file). Ray sometimes misses the interrupt of a task whose worker is just starting."""
    for ref in refs:
        ray.cancel(ref)
    if refs:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        for ref in running:
            ray.cancel(ref, force=True)
        if running:
            ray.wait(running, num_returns=len(running), timeout=CANCEL_GRACE_S)


def _result(ray, ref):
    """The task's return value; its BiasgenError as it is; a worker that kept dying as a BiasgenError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BiasgenError):
            raise e.cause from None
        raise
    except ray.exceptions.WorkerCrashedError as e:
        raise BiasgenError(f"A Ray worker died {MAX_RETRIES + 1} time(s) running one job (out of memory? see "
                           "`ray logs` on its node). Rerun with --resume to continue from the checkpoints on disk.") from e


def _write_probe(folder: str, name: str) -> str:
    """Write ``folder/name`` from a Ray worker; returns an error message, or "" on success."""
    if not Path(folder).is_dir():
        return "the folder does not exist there"
    try:
        (Path(folder) / name).write_text(name)
    except OSError as e:
        return f"cannot write there ({e})"
    return ""


def check_shared_storage(run_dir: Path, *, address: str | None = None) -> None:
    """BiasgenError unless a worker on every node of the cluster can write into ``run_dir`` and this process sees it.

    One probe task per node writes a file in ``run_dir``; this process reads and removes it.
    """
    with ray_session(address) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(_write_probe)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        names = [f".biasgen-probe-{uuid.uuid4().hex}" for _ in nodes]
        refs = [probe.options(num_cpus=0, max_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(run_dir), name) for n, name in zip(nodes, names)]
        problems = []
        for node, name, error in zip(nodes, names, ray.get(refs)):
            path = Path(run_dir) / name
            if not error and not path.exists():
                error = "it wrote the file on a disk this process does not see"
            path.unlink(missing_ok=True)
            if error:
                problems.append(f"node {node['NodeManagerAddress']}: {error}")
    if problems:
        raise BiasgenError(f"Ray workers cannot use the run folder {run_dir}: {'; '.join(problems)}. "
                           "The run folder must be on a path every node can see (a shared file system "
                           "mounted at the same path on every node); pass such a path as --out.")
