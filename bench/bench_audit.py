"""Cost of the image audit's default preset: training steps/s, sampling cost, evaluation share.

    python bench/bench_audit.py              # component timings (about a minute)
    python bench/bench_audit.py --full       # also run the whole default audit and report its time split

Prints a markdown table for BENCHMARKS.md, with the machine it ran on.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from biasgen.config import build_config
from biasgen.images.audit import PRESETS, AuditConfig, ImageAudit
from biasgen.losses import EpsMSELoss
from biasgen.pipeline import Data, run_experiment
from biasgen.runs import environment
from biasgen.sampler import describe_sampler, sample, x0_from_eps_model
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


def time_sampling(cfg: AuditConfig, schedule: NoiseSchedule, **sampler) -> float:
    """Seconds to draw the preset's ``n_samples`` from one model with the ``sampler`` settings of
    :func:`biasgen.sampler.sample` (``method``, ``steps``, ``eta``, ``spacing``)."""
    model = digits_unet(cfg).eval()
    start = time.perf_counter()
    sample(x0_from_eps_model(model, schedule, clip=1.0), schedule, (1, 8, 8), list(range(cfg.n_samples)),
           **sampler, batch_size=cfg.eval_batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="also run the full default audit")
    args = parser.parse_args()
    cfg = build_config(AuditConfig, PRESETS, "default")
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {env['cpu_threads']} threads\n")
    rows = [("training", f"{time_training(cfg, schedule):.1f} steps/s (batch {cfg.batch_size})")]
    preset = time_sampling(cfg, schedule, **cfg.sampler_settings)
    name = describe_sampler(cfg.sampler, cfg.sample_steps, cfg.eta, cfg.T, cfg.sample_spacing)
    rows.append((f"sampling, the preset's {name} ({cfg.sample_step_count} denoiser calls)",
                 f"{preset:.2f} s for {cfg.n_samples} samples"))
    cheap = time_sampling(cfg, schedule, method="ddpm", steps=250, spacing="quadratic")
    rows.append(("sampling, ddpm-250-quadratic (234 calls; not validated, docs/samplers.md)",
                 f"{cheap:.2f} s for {cfg.n_samples} samples (the preset's costs {preset / cheap:.1f}x)"))
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
