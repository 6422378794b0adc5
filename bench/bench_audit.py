"""Cost of the image audit's default preset: training steps/s, sampling cost, evaluation share.

    python bench/bench_audit.py              # component timings (about a minute)
    python bench/bench_audit.py --full       # also run the whole default audit and report its time split
    python bench/bench_audit.py --network    # where one checkpoint's evaluation goes, and what was tried on the
                                             # network calls (batch size, inference mode, channels-last, compile,
                                             # one grouped convolution for 4 models); one thread, a few minutes

Prints a markdown table for BENCHMARKS.md, with the machine it ran on.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable

import torch

from biasgen.config import build_config
from biasgen.images.audit import PRESETS, AuditConfig, ImageAudit
from biasgen.images.evaluation import sampling_networks
from biasgen.losses import EpsMSELoss
from biasgen.pipeline import Data, run_experiment
from biasgen.runs import environment
from biasgen.sampler import sample, x0_from_eps_model
from biasgen.schedule import NoiseSchedule
from biasgen.training import step_generator
from biasgen.twins import build_model


def digits_unet(cfg: AuditConfig) -> torch.nn.Module:
    """The preset's U-Net for one-channel 8x8 images, from init seed 0."""
    digits_like = Data(train=[torch.zeros(1, 1, 8, 8)], test=torch.zeros(0, 1, 8, 8), description={})
    return build_model(*ImageAudit(cfg).network(digits_like), seed=0)


def time_training(cfg: AuditConfig, schedule: NoiseSchedule, steps: int = 40) -> float:
    """Optimisation steps per second for one model of the preset."""
    model = digits_unet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = EpsMSELoss(schedule)
    data = torch.rand(cfg.n, 1, 8, 8) * 2 - 1
    for step in range(steps + 5):
        if step == 5:  # warm-up done
            start = time.perf_counter()
        gen = step_generator(0, step)
        loss = loss_fn(model, data[torch.randint(len(data), (cfg.batch_size,), generator=gen)], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def time_sampling(cfg: AuditConfig, schedule: NoiseSchedule, network: Callable | None = None, **sampler) -> float:
    """Seconds to draw the preset's ``n_samples`` from one model (``network``: the preset's U-Net from init, or
    a compiled one) with the ``sampler`` settings of :func:`biasgen.sampler.sample` (``method``, ``steps``,
    ``eta``, ``spacing``)."""
    model = network if network is not None else digits_unet(cfg).eval()
    start = time.perf_counter()
    sample(x0_from_eps_model(model, schedule, clip=1.0), schedule, (1, 8, 8), list(range(cfg.n_samples)),
           **sampler, batch_size=cfg.eval_batch)
    return time.perf_counter() - start


def compiled_unet(cfg: AuditConfig) -> tuple[Callable, float]:
    """The preset's U-Net compiled as the audit's evaluation compiles it, and the seconds that took."""
    start = time.perf_counter()
    net = sampling_networks([digits_unet(cfg).eval()], cfg, (1, 8, 8))[0]
    return net, time.perf_counter() - start


def best_us(fn, calls: int = 200) -> float:
    """Microseconds per call of ``fn()``, the best of 2 rounds of ``calls`` after 20 warm-up calls."""
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return min(rounds)


def evaluation_split(cfg: AuditConfig) -> list[tuple[str, str]]:
    """Seconds of each part of one checkpoint's evaluation (4 models of the preset, from init) and the sampler's
    own cost per step with a network that costs nothing."""
    from biasgen.images import evaluation
    from biasgen.pipeline import Shared
    from biasgen.twins import make_members

    experiment = ImageAudit(cfg)
    data, members = experiment.load(), make_members(cfg.splits, cfg.seeds_per_split)
    model_class, model_kwargs = experiment.network(data)
    models = [build_model(model_class, model_kwargs, seed=m).eval() for m in range(len(members))]
    shared = Shared(experiment, None, members, model_class, model_kwargs, experiment.reference(data, members))
    spent: dict[str, float] = {}
    originals = {name: getattr(evaluation, name) for name in ("loss_record", "sample", "sample_record", "score_record")}

    def timed(name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = originals[name](*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out
        return call

    try:
        for name in originals:
            setattr(evaluation, name, timed(name))
        start = time.perf_counter()
        with torch.no_grad():
            experiment.evaluate(models, shared)
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(evaluation, name, fn)
    schedule = experiment.schedule()
    free = time.perf_counter()
    sample(x0_from_eps_model(lambda x, t: torch.zeros_like(x), schedule, clip=1.0), schedule, (1, 8, 8),
           list(range(cfg.n_samples)))
    free = (time.perf_counter() - free) / schedule.T
    parts = ", ".join(f"{name} {spent.get(name, 0):.2f} s" for name in originals)
    return [("one checkpoint's evaluation, 4 models (compile per --compile)", f"{total:.1f} s: {parts}"),
            ("sampler loop per step, a network that costs nothing", f"{free * 1e3:.2f} ms for {cfg.n_samples} samples")]


def network_study(cfg: AuditConfig) -> list[tuple[str, str]]:
    """Per-call costs of the preset's U-Net: batch sizes, inference mode, channels-last, compiled; and 4
    separate 3x3 convolutions against one grouped convolution for 4 models."""
    from biasgen.compiling import compiled

    net = digits_unet(cfg).eval()
    n = cfg.n_samples
    x, t = torch.randn(n, 1, 8, 8), torch.full((n,), 500)
    rows = []
    with torch.no_grad():
        per_sample = []
        for b in (12, 24, 48, 96, 192):
            xb, tb = torch.randn(b, 1, 8, 8), torch.full((b,), 500)
            per_sample.append(f"{best_us(lambda: net(xb, tb), 50) / b:.0f} µs at {b}")
        rows.append(("one call, per sample, by batch size", ", ".join(per_sample)))
        eager = best_us(lambda: net(x, t))
        with torch.inference_mode():
            inference = best_us(lambda: net(x, t))
        last = digits_unet(cfg).eval().to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        channels_last = best_us(lambda: last(x_last, t))
        start = time.perf_counter()
        fast = compiled(net, (x, t))
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(digits_unet(cfg).eval(), (x, t))
        second = time.perf_counter() - start
        fast_us = best_us(lambda: fast(x, t))
        rows.append((f"one call on {n} samples: no_grad / inference_mode / channels-last / compiled",
                     f"{eager / 1e3:.2f} / {inference / 1e3:.2f} / {channels_last / 1e3:.2f} / {fast_us / 1e3:.2f} ms "
                     f"(compiled {eager / fast_us:.2f}x; compiling {first:.1f} s, then {second:.1f} s for new weights)"))
        for channels, side in ((16, 8), (32, 4), (32, 8)):
            xs = [torch.randn(n, channels, side, side) for _ in range(4)]
            ws = [torch.randn(channels, channels, 3, 3) for _ in range(4)]
            x_all, w_all = torch.cat(xs, 1), torch.cat(ws, 0)
            separate = best_us(lambda: [torch.conv2d(a, w, padding=1) for a, w in zip(xs, ws)])
            grouped = best_us(lambda: torch.conv2d(x_all, w_all, padding=1, groups=4))
            rows.append((f"3x3 convolution, {channels} channels {side}x{side}, {n} samples, 4 models",
                         f"4 separate {separate:.0f} µs, one grouped {grouped:.0f} µs"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="also run the full default audit")
    parser.add_argument("--network", action="store_true", help="only the evaluation split and the network-call study")
    args = parser.parse_args()
    cfg = build_config(AuditConfig, PRESETS, "default")
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {env['cpu_threads']} threads\n")
    if args.network:
        torch.set_num_threads(1)  # as in the audit's worker processes
        rows = network_study(cfg) + evaluation_split(cfg)  # the study first: its compile timing is the process's first
        print("| measure (one thread) | result |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        return
    rows = [("training", f"{time_training(cfg, schedule):.1f} steps/s (batch {cfg.batch_size})")]
    preset = time_sampling(cfg, schedule, **cfg.sampler_settings)
    rows.append((f"sampling, the preset's {cfg.sampler_name} ({cfg.sample_step_count} network calls), eager",
                 f"{preset:.2f} s for {cfg.n_samples} samples"))
    network, compile_s = compiled_unet(cfg)
    first = time_sampling(cfg, schedule, network, **cfg.sampler_settings)  # the compiler's helpers are still busy
    fast = time_sampling(cfg, schedule, network, **cfg.sampler_settings)
    rows.append((f"sampling, the preset's {cfg.sampler_name}, compiled as the audit does (`--compile {cfg.compile}`)",
                 f"{fast:.2f} s for {cfg.n_samples} samples ({preset / fast:.2f}x faster than eager; compiling took "
                 f"{compile_s:.1f} s and the first draw after it {first:.2f} s, neither counted)"))
    paper = dict(cfg.sampler_settings, hold_above=0, hold_every=1)
    full = time_sampling(cfg, schedule, network, **paper)
    rows.append(("sampling, the paper's ddpm-1000 (1000 network calls), compiled",
                 f"{full:.2f} s for {cfg.n_samples} samples (the preset's is {full / fast:.2f}x cheaper)"))
    if args.full:
        with tempfile.TemporaryDirectory() as out:
            summary = run_experiment(ImageAudit(cfg), out, progress=False)
        t = summary["timing"]
        rows.append(("full default audit", f"{t['wall_s_this_invocation']:.0f} s wall"))
        rows.append(("  of which training", f"{t['training_s_this_invocation']:.0f} s"))
        rows.append(("  of which evaluation", f"{t['evaluation_s_this_invocation']:.0f} s "
                     f"({100 * t['evaluation_s_this_invocation'] / t['wall_s_this_invocation']:.0f}% of wall time)"))
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
