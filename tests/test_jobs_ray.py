"""The Ray backend: the job runner and the whole pipeline, on one local Ray instance (2 CPUs) for the module."""
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from biasgen.jobs import ray_tasks as jobs_ray
from biasgen.cli import main
from biasgen.errors import BiasgenError
from biasgen.images.audit import ImageAudit, audit
from biasgen.jobs import LocalBackend, RayBackend, make_backend
from biasgen.runs import read_jsonl
from biasgen.sweep import sweep
from biasgen.training import completed_step, train

try:
    import ray
except ImportError:  # CI installs biasgen[ray]: there these tests must run, not skip
    ray = None
needs_ray = pytest.mark.skipif(ray is None and not os.environ.get("CI"), reason='needs pip install "biasgen[ray]"')


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance whose workers can import this test module."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), old]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


def _scaled_square(x, scale):
    return scale * x * x


@needs_ray
def test_ray_gives_the_local_results_and_puts_shared_data_once(local_ray, monkeypatch):
    puts = []
    real_put = local_ray.put
    monkeypatch.setattr(local_ray, "put", lambda value: puts.append(value) or real_put(value))
    shared = torch.tensor(10.0)
    jobs = [1.0, 2.0, 3.0, 4.0]
    on_ray = list(RayBackend(cpus_per_job=0.5).run(_scaled_square, jobs, shared))
    local = list(LocalBackend(1).run(_scaled_square, jobs, shared))
    assert sorted(float(r) for r in on_ray) == [float(r) for r in local] == [10.0, 40.0, 90.0, 160.0]
    assert len(puts) == 1 and puts[0] is shared


def _noisy_regression_loss(model, x0, gen):
    return ((model(x0 + torch.randn(x0.shape, generator=gen)) - x0) ** 2).mean()


class _DieOnceAfterFirstCheckpoints:
    """A loss that kills its own worker process once, as soon as the checkpoint at ``after`` is on disk."""

    def __init__(self, out_dir: Path, marker: Path, after: int):
        self.out_dir, self.marker, self.after = out_dir, marker, after

    def __call__(self, model, x0, gen):
        if not self.marker.exists() and completed_step(self.out_dir) >= self.after:
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return _noisy_regression_loss(model, x0, gen)


TRAINING = dict(steps=8, batch_size=8, lr=0.05, checkpoints=[2, 4, 8], seed=3, meta={}, progress=False)


def _train_linear(job, data):
    """Train a 4->4 linear model on ``data`` into ``job["out_dir"]``; returns its final weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    loss = job.get("loss") or _noisy_regression_loss
    train(model, loss, data, out_dir=job["out_dir"], **TRAINING)
    return {k: v.clone() for k, v in model.state_dict().items()}


@needs_ray
def test_a_worker_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(local_ray, tmp_path):
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    marker = tmp_path / "killed"
    killed_run = tmp_path / "ray"
    [weights] = RayBackend().run(_train_linear, [dict(out_dir=killed_run, loss=_DieOnceAfterFirstCheckpoints(killed_run, marker, 4))],
                                 data)
    assert marker.exists() and int(marker.read_text()) != os.getpid(), "the first attempt was never killed"
    uninterrupted = _train_linear(dict(out_dir=tmp_path / "local"), data)
    assert weights.keys() == uninterrupted.keys()
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in weights)
    assert sorted(p.name for p in killed_run.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())


def _write_after(seconds, folder):
    time.sleep(seconds)
    (Path(folder) / f"done{seconds}").write_text("")
    return seconds


@needs_ray
def test_closing_the_results_cancels_the_outstanding_tasks(local_ray, tmp_path):
    # the other jobs sleep longer than a cold worker takes to start (importing torch) even on a loaded machine
    results = RayBackend().run(_write_after, [0, 8, 9], str(tmp_path))
    assert next(results) == 0
    results.close()  # what Ctrl-C in the driver does: the generator unwinds and cancels what is left
    time.sleep(10)  # without the cancel, done8 and done9 would be written by now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done0"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ray
def test_an_unreachable_ray_address_fails_fast(monkeypatch):
    monkeypatch.setattr(jobs_ray, "CONNECT_TIMEOUT_S", 1.0)
    for address in (f"127.0.0.1:{_closed_port()}", "192.0.2.1:6379"):  # refused; a non-routable test address
        start = time.monotonic()
        with pytest.raises(BiasgenError, match="No Ray cluster answers"):
            list(RayBackend(address).run(_scaled_square, [1]))
        assert time.monotonic() - start < 10
    with pytest.raises(BiasgenError, match="HOST:PORT"):
        list(RayBackend("headnode").run(_scaled_square, [1]))


@needs_ray
def test_a_job_asking_for_more_than_any_node_has_is_refused(local_ray):
    with pytest.raises(BiasgenError, match="No node of the Ray cluster has 1 CPUs and 1 GPUs"):
        list(RayBackend(gpus_per_job=1.0).run(_scaled_square, [1]))


@needs_ray
def test_the_run_folder_must_be_writable_by_every_worker(local_ray, tmp_path):
    RayBackend().check_shared_storage(tmp_path)
    assert list(tmp_path.iterdir()) == [], "the probe file was left behind"
    with pytest.raises(BiasgenError, match="every node can see"):
        RayBackend().check_shared_storage(Path("/proc"))  # not writable, even by root
    with pytest.raises(BiasgenError, match="does not exist"):
        RayBackend().check_shared_storage(tmp_path / "missing")


def test_backend_ray_without_ray_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(BiasgenError, match=r'pip install "biasgen\[ray\]"'):
        list(RayBackend().run(_scaled_square, [1]))
    assert main(["audit", "--preset", "tiny", "--quiet", "--backend", "ray", "--out", str(tmp_path / "run")]) == 2
    assert 'pip install "biasgen[ray]"' in capsys.readouterr().err
    with pytest.raises(BiasgenError, match="Unknown backend"):
        make_backend("dask")


@pytest.mark.parametrize("settings, message", [
    (dict(backend="dask"), "--backend must be local or ray"),
    (dict(ray_address="auto"), "--ray-address is used only with --backend ray"),
    (dict(backend="ray", cpus_per_job=0), "--cpus-per-job must be positive"),
    (dict(backend="ray", device="cuda"), "needs --gpus-per-job"),
])
def test_bad_backend_settings_are_refused(settings, message):
    with pytest.raises(BiasgenError, match=message):
        ImageAudit.from_settings("tiny", **settings)


# -- the whole pipeline on the Ray backend ----------------------------------------------------------------------


def _assert_close(a, b, where="record"):
    """Equal JSON values, numbers up to float rounding."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{where}: {a} != {b}"
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def local_tiny_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "tiny"
    audit(out, preset="tiny", progress=False)
    return out


@needs_ray
def test_tiny_audit_on_ray_gives_the_local_metrics_and_resumes_on_either_backend(local_ray, local_tiny_audit, tmp_path):
    out = tmp_path / "ray"
    summary = audit(out, preset="tiny", progress=False, backend="ray")
    _assert_close(read_jsonl(out / "metrics.jsonl"), read_jsonl(local_tiny_audit / "metrics.jsonl"))
    assert summary["config"]["backend"] == "ray"
    again = audit(out, preset="tiny", progress=False, resume=True)  # the backend does not define the run
    assert again["tau_bias"] == summary["tau_bias"]


@needs_ray
def test_a_killed_ray_driver_resumes_with_resume(local_ray, local_tiny_audit, tmp_path):
    out = tmp_path / "killed"
    argv = ["audit", "--preset", "tiny", "--quiet", "--backend", "ray", "--out", str(out)]
    driver = subprocess.Popen([sys.executable, "-m", "biasgen", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while driver.poll() is None and time.monotonic() < deadline and not list(out.glob("models/*/step_*.json")):
        time.sleep(0.05)
    driver.kill()
    assert driver.wait() == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    assert list(out.glob("models/*/step_*.json")) and not (out / "summary.json").exists()
    assert main(argv + ["--resume"]) == 0
    _assert_close(read_jsonl(out / "metrics.jsonl"), read_jsonl(local_tiny_audit / "metrics.jsonl"))


@needs_ray
def test_a_local_ray_instance_runs_its_workers_at_the_callers_priority():
    # Ray's own default is niceness 15: on a busy machine the workers would yield the cores to every other job
    probe = ("import os, ray\nfrom biasgen.jobs.ray_tasks import ray_session\n"
             "with ray_session(None) as r:\n    print(r.get(ray.remote(lambda: os.nice(0)).remote()))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    out = subprocess.run(["nice", "-n", "3", sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == os.nice(0) + 3


@needs_ray
def test_tiny_sweep_on_ray_gives_the_local_results(local_ray, tmp_path):
    local = sweep(tmp_path / "local", preset="tiny", target_n=100, progress=False)
    on_ray = sweep(tmp_path / "ray", preset="tiny", target_n=100, progress=False, backend="ray")
    assert on_ray["config"]["runtime"]["backend"] == "ray" and local["config"]["runtime"]["backend"] == "local"
    _assert_close(read_jsonl(tmp_path / "ray" / "sweep.jsonl"), read_jsonl(tmp_path / "local" / "sweep.jsonl"))
    _assert_close(on_ray["fits"], local["fits"], "fits")
    for row in local["rows"]:
        _assert_close(read_jsonl(tmp_path / "ray" / row["folder"] / "metrics.jsonl"),
                      read_jsonl(tmp_path / "local" / row["folder"] / "metrics.jsonl"), row["folder"])
