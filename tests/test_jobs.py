"""Worker processes: same results as in-process, and no orphans when the main process is killed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from biasgen.jobs import LocalBackend, RayBackend, make_backend, resolve_workers


def _scaled_square(x, scale):
    return scale * x * x


def test_pool_and_in_process_give_the_same_results():
    assert sorted(LocalBackend(2).run(_scaled_square, [1, 2, 3], 10)) == [10, 40, 90]
    assert list(LocalBackend(1).run(_scaled_square, [1, 2, 3], 10)) == [10, 40, 90]
    assert resolve_workers(3, "cpu") == 3 and resolve_workers(0, "cuda") == 1 and resolve_workers(0, "cpu") >= 1



def test_a_config_gives_its_backend_object():
    """Callers hold one backend object (no tests of the backend's name): its settings come from the config."""
    from biasgen.images.audit import AuditConfig

    assert AuditConfig(workers=3).job_backend == LocalBackend(3)
    assert AuditConfig(backend="ray", ray_address="auto", cpus_per_job=2).job_backend == RayBackend("auto", 2.0, 0.0)
    assert LocalBackend(2).draws_bars and not RayBackend().draws_bars
    assert [LocalBackend(2).bar_position(m) for m in range(3)] == [0, 1, 0] and LocalBackend(1).bar_position(1) is None
    assert make_backend("local", workers=0, device="cuda") == LocalBackend(1)

def _spawned_children(parent: int) -> list[int]:
    """Pids of the multiprocessing workers whose parent is ``parent`` (read from /proc, no external tools)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(
        "import os, time\n"
        "from biasgen.jobs import LocalBackend\n"
        "def job(x, shared):\n    time.sleep(120)\n"
        "if __name__ == '__main__':\n    print(os.getpid(), flush=True)\n    list(LocalBackend(2).run(job, [1, 2]))\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = _spawned_children(pid)
    assert len(workers) == 2, "the pool never started its workers"
    os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.5)
    assert not any(_alive(w) for w in workers), "worker processes outlived the killed main process"
