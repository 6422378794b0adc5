"""The twin-split audit on images: data -> splits -> training -> evaluation -> onset -> report.

    from biasgen.images.audit import audit
    summary = audit("runs/digits")                       # the default preset
    summary = audit("runs/fm", preset="fashion-mnist", steps=2000)

or from the shell: ``biasgen audit --out runs/digits``. The run folder holds
``run.json``, ``metrics.jsonl`` (one record per checkpoint), ``summary.json``,
the figures ``fig_*.png``, the checkpoints under ``models/`` and the shared-noise
samples of every checkpoint under ``samples/``. A killed run continues with
``--resume``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import figures
from ..checkpoint import load_tensors, save_tensors
from ..config import build_config, check, opt
from .data import describe, load_images, make_splits, scale_images, unscale_images
from ..losses import eps_mse_loss
from .metrics import (
    data_copying_z,
    frozen_noise_loss,
    loss_by_t,
    memorized_fraction,
    nearest_neighbors,
    score_similarity,
    twin_distance,
)
from ..jobs import resolve_workers, run_jobs
from ..onset import checkpoint_minimum, public_tau, recommend, score_crossing, verdict
from ..runs import append_jsonl, environment, prepare_run_dir, progress_bar, read_jsonl, write_json
from ..sampler import sample, x0_from_eps_model
from ..schedule import NoiseSchedule
from ..training import checkpoint_steps
from ..twins import init_seed, load_model, make_members, model_pairs, train_members, training_seed
from .unet import UNet


@dataclass
class AuditConfig:
    # data
    data: str = opt("digits", "digits | fashion-mnist | cifar10 | PATH (image folder, .npz or .npy)")
    data_dir: str | None = opt(None, "folder holding the data set's files (fashion-mnist, cifar10)")
    resolution: int | None = opt(None, "resize (after a centre crop) to R x R pixels")
    grayscale: bool = opt(False, "convert colour images to grayscale")
    center_crop: bool = opt(True, "centre-crop to a square before resizing")
    scaling: str = opt("minus1to1", "pixel scaling: minus1to1 (2x-1) or center (subtract the training mean, as the paper)")
    n: int = opt(256, "training images per split")
    splits: int = opt(4, "number of disjoint training splits K (>= 2)")
    seeds_per_split: int = opt(1, "models per split; >1 adds same-split pairs as a seed-variance control")
    n_test: int = opt(512, "held-out test images (the last ones of the permutation)")
    seed: int = opt(0, "master seed: permutation, model inits, training, noise")
    same_init: bool = opt(False, "start every model from the same weights (the twin-distance minimum is then meaningless)")
    # model
    base_width: int = opt(16, "U-Net base channel width")
    channel_mults: tuple[int, ...] = opt((1, 2), "U-Net width multiplier per resolution level")
    attention_levels: tuple[int, ...] = opt((), "levels (0 = full resolution) with self-attention")
    res_blocks: int = opt(1, "residual blocks per level")
    dropout: float = opt(0.1, "dropout rate")
    # diffusion
    schedule: str = opt("linear", "noise schedule: linear (SPEC) or cosine")
    T: int = opt(1000, "diffusion steps")
    # training
    steps: int = opt(1500, "optimisation steps per model")
    batch_size: int = opt(64, "batch size")
    lr: float = opt(1e-3, "Adam learning rate")
    checkpoints: int = opt(12, "number of log-spaced checkpoints (the last one is the final step)")
    first_checkpoint: int = opt(20, "first checkpoint step")
    grad_clip: float | None = opt(1.0, "gradient-norm clipping (none to disable)")
    ema_decay: float | None = opt(None, "EMA decay of the evaluated weights (off by default: EMA hides the late weights that carry the bias)")
    # evaluation
    n_samples: int = opt(128, "samples per model and checkpoint, from shared noise")
    sampler: str = opt("ddim", "ddpm (ancestral, all T steps) or ddim (deterministic)")
    sample_steps: int = opt(50, "DDIM steps (ignored by ddpm)")
    score_ts: tuple[int, ...] = opt((50, 100, 150, 200), "diffusion steps t for the score-level twin similarity")
    n_score_inputs: int = opt(128, "training and test inputs for the score-level similarity")
    n_boot: int = opt(1000, "bootstrap resamples for the uncertainty of each tau")
    eval_batch: int = opt(256, "batch size of evaluation passes")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    workers: int = opt(0, "processes that train models / evaluate checkpoints at once (0: one per CPU core on cpu, 1 on a GPU)")

    def validate(self) -> None:
        check(self.splits >= 2, f"--splits must be at least 2 (twins need two disjoint splits), got {self.splits}.")
        for name in ("n", "n_test", "seeds_per_split", "steps", "batch_size", "checkpoints", "n_samples", "T",
                     "base_width", "res_blocks", "n_score_inputs", "first_checkpoint", "eval_batch"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        check(self.n_boot >= 0, "--n-boot must be >= 0.")
        check(self.workers >= 0, "--workers must be >= 0 (0 = automatic).")
        check(self.lr > 0, f"--lr must be positive, got {self.lr}.")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}.")
        check(self.scaling in ("minus1to1", "center"), f"--scaling must be minus1to1 or center, got {self.scaling!r}.")
        check(self.sampler in ("ddpm", "ddim"), f"--sampler must be ddpm or ddim, got {self.sampler!r}.")
        check(self.schedule in ("linear", "cosine"), f"--schedule must be linear or cosine, got {self.schedule!r}.")
        check(self.resolution is None or self.resolution >= 4, "--resolution must be at least 4 pixels.")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "--ema-decay must be in (0, 1).")
        check(all(1 <= t < self.T for t in self.score_ts), f"--score-ts must lie in [1, {self.T - 1}].")
        check(1 <= self.sample_steps <= self.T, f"--sample-steps must be in [1, {self.T}].")
        check(len(self.channel_mults) >= 1, "--channel-mults needs at least one level, e.g. 1,2.")
        check(not self.device.startswith("cuda") or torch.cuda.is_available(),
              f"--device {self.device} is not available here (no CUDA GPU); pass --device cpu.")


PRESETS: dict[str, dict] = {
    # The bundled 8x8 digits, 4 splits of 256; minutes on 2 CPU cores. docs/audit.md says what it shows.
    "default": {},
    # 16x16 Fashion-MNIST (Debian's dataset-fashion-mnist, or --data-dir); about 30 minutes on 2 CPU cores.
    "fashion-mnist": dict(data="fashion-mnist", resolution=16, n=256, splits=4, n_test=1024, steps=2000,
                          checkpoints=13),
    # SPEC §8: CelebA 32x32 grayscale, 15 splits of 1024, GPU scale. Run it from the folder that holds
    # img_align_celeba/, or pass --data PATH/TO/img_align_celeba.
    "paper": dict(data="img_align_celeba", resolution=32, grayscale=True, scaling="center", n=1024, splits=15, n_test=2048,
                  base_width=32, channel_mults=(1, 2, 4), attention_levels=(1, 2), res_blocks=2, dropout=0.1,
                  lr=1e-4, batch_size=512, steps=10_000, checkpoints=50, first_checkpoint=10, n_samples=512,
                  sampler="ddpm", eval_batch=512, device="cuda"),
    # A seconds-long smoke run (used by the tests); far too small to show anything.
    "tiny": dict(n=24, splits=2, n_test=32, steps=12, checkpoints=3, first_checkpoint=4, base_width=8,
                 channel_mults=(1, 2), attention_levels=(), res_blocks=1, n_samples=8, sample_steps=5,
                 score_ts=(50,), n_score_inputs=8, n_boot=50, batch_size=16, workers=1),
}


def audit(out: str | Path, preset: str | None = "default", config: str | Path | None = None, *,
          resume: bool = False, force: bool = False, progress: bool = True, **settings) -> dict:
    """Python API of ``biasgen audit``: resolve the config, run, and return ``summary.json`` as a dict."""
    cfg = build_config(AuditConfig, PRESETS, preset, config, settings)
    return run_audit(cfg, out, resume=resume, force=force, progress=progress)


# -- the pipeline ---------------------------------------------------------------------------------

def run_audit(cfg: AuditConfig, out: str | Path, *, resume: bool = False, force: bool = False,
              progress: bool = True) -> dict:
    """Run (or resume) the twin-split audit defined by ``cfg`` in the folder ``out``."""
    started = time.time()
    data = load_images(cfg.data, data_dir=cfg.data_dir, resolution=cfg.resolution, grayscale=cfg.grayscale,
                       center_crop=cfg.center_crop)
    splits = make_splits(data.images, cfg.n, cfg.splits, cfg.n_test, cfg.seed)
    run = prepare_run_dir(out, dataclasses.asdict(cfg), resume=resume, force=force, kind="audit",
                          runtime_keys=("workers", "device", "eval_batch"))
    reference = torch.cat(splits.train)  # 'center' scaling subtracts the mean training image
    train_sets = [scale_images(x, cfg.scaling, reference)[0] for x in splits.train]
    test_set, mean = scale_images(splits.test, cfg.scaling, reference)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T)
    members = make_members(cfg.splits, cfg.seeds_per_split)
    steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)
    model_kwargs = _model_kwargs(cfg, channels=train_sets[0].shape[1])
    meta = {"config": dataclasses.asdict(cfg), "model": model_kwargs, "environment": environment()}

    workers = resolve_workers(cfg.workers, cfg.device)
    t_train = time.time()
    train_members(UNet, model_kwargs, eps_mse_loss, (schedule,), train_sets, members, run / "models", seed=cfg.seed,
                  same_init=cfg.same_init, meta=meta, workers=workers, device=cfg.device, progress=progress,
                  steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, checkpoints=steps, grad_clip=cfg.grad_clip,
                  ema_decay=cfg.ema_decay)
    training_s = time.time() - t_train

    t_eval = time.time()
    done = {r["step"] for r in read_jsonl(run / "metrics.jsonl")}
    # held-out reference of the data-copying test: test images' distances to each split (the same at every checkpoint)
    heldout_l2 = [nearest_neighbors(test_set[: cfg.n_samples], train_sets[split])["l2"] for split, _ in members]
    jobs = [dict(step=step, run=run, model_kwargs=model_kwargs, members=members, train_sets=train_sets,
                 test_set=test_set, heldout_l2=heldout_l2, schedule=schedule, cfg=cfg)
            for step in steps if step not in done]
    pending, order = {}, [job["step"] for job in jobs]
    for step, record in progress_bar(run_jobs(_evaluate_step, jobs, workers), progress, "evaluating checkpoints", len(jobs)):
        pending[step] = record
        while order and order[0] in pending:  # keep metrics.jsonl in step order
            append_jsonl(run / "metrics.jsonl", {"step": order[0], **pending.pop(order.pop(0))})
    evaluation_s = time.time() - t_eval

    records = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["step"])
    summary = summarize(records, cfg, data_description=describe(data, splits), members=members)
    summary["timing"] = {"wall_s_this_invocation": round(time.time() - started, 1),
                         "training_s_this_invocation": round(training_s, 1),
                         "evaluation_s_this_invocation": round(evaluation_s, 1)}
    write_json(run / "summary.json", summary)
    rows = [(label, unscale_images(x, cfg.scaling, mean).clamp(0, 1))
            for label, x in _gallery_rows(run, summary, train_sets, members)]
    figures.plot_all(run, records, summary, rows, value_range=(0.0, 1.0))
    return summary


def _evaluate_step(job: dict, shared=None) -> tuple[int, dict]:
    """Evaluate every model at one checkpoint and store its samples (a worker-process job)."""
    cfg, step, run = job["cfg"], job["step"], job["run"]
    models = [load_model(UNet, job["model_kwargs"], run / "models" / f"model{m}", step, cfg.device)
              for m in range(len(job["members"]))]
    record, samples = evaluate_checkpoint(models, job["members"], job["train_sets"], job["test_set"], job["heldout_l2"],
                                          job["schedule"], cfg)
    save_tensors(run / "samples" / f"step_{step:07d}", {"samples": samples}, {"step": step, "sampler": cfg.sampler})
    return step, record


def _model_kwargs(cfg: AuditConfig, channels: int) -> dict:
    return dict(channels=channels, base_width=cfg.base_width, channel_mults=tuple(cfg.channel_mults),
                attention_levels=tuple(cfg.attention_levels), res_blocks=cfg.res_blocks, dropout=cfg.dropout)


@torch.no_grad()
def evaluate_checkpoint(models, members, train_sets, test_set, heldout_l2, schedule,
                        cfg: AuditConfig) -> tuple[dict, torch.Tensor]:
    """Every metric of SPEC §2–§4 for one checkpoint of all models.

    ``models``: list of eps-predicting networks, ``members[m] = (split, seed)``;
    ``train_sets[i]``: ``(n, C, H, W)``; ``test_set``: ``(n_test, C, H, W)``;
    ``heldout_l2[m]``: ``(n_samples,)`` L2 distances of test images to model m's split (data-copying reference).
    Returns the metric record and the samples ``(M, n_samples, C, H, W)``.
    """
    device, shape = cfg.device, tuple(test_set.shape[1:])
    twins, controls = model_pairs(members)
    eval_seed = cfg.seed * 1000 + 17
    record: dict = {}

    # frozen-noise losses: the same (t, eps) per example at every checkpoint
    test_runs = [frozen_noise_loss(m, test_set.to(device), schedule, seed=eval_seed, batch_size=cfg.eval_batch)
                 for m in models]
    test_losses = torch.stack([r["per_example"] for r in test_runs])  # (M, n_test); the same t per example in every run
    train_losses = torch.stack([
        frozen_noise_loss(m, train_sets[members[i][0]].to(device), schedule, seed=eval_seed + 1,
                          batch_size=cfg.eval_batch)["per_example"] for i, m in enumerate(models)])
    per_example = test_losses.mean(0)
    record.update(test_loss=float(per_example.mean()), test_loss_sem=float(per_example.std() / len(per_example) ** 0.5),
                  test_loss_per_model=[float(v) for v in test_losses.mean(1)], train_loss=float(train_losses.mean()))
    record["test_loss_units"] = [round(float(v), 6) for v in per_example]
    record["test_loss_by_t"] = loss_by_t(per_example, test_runs[0]["t"], n_bins=10, T=schedule.T)

    # samples from shared noise
    clip = 1.0 if cfg.scaling == "minus1to1" else None
    seeds = [cfg.seed * 1_000_000 + 7919 * j for j in range(cfg.n_samples)]
    samples = torch.stack([
        sample(x0_from_eps_model(m, schedule, clip=clip), schedule, shape, seeds, method=cfg.sampler,
               steps=None if cfg.sampler == "ddpm" else cfg.sample_steps, batch_size=cfg.eval_batch, device=device)
        for m in models])

    twin = twin_distance(list(samples), twins)
    record.update(twin_distance=twin["median"], twin_distance_sem=twin["sem"], twin_distance_pairs=twin["per_pair"],
                  twin_distance_samples=[round(v, 6) for v in twin["per_sample"]])
    if controls:
        control = twin_distance(list(samples), controls)
        record.update(same_split_distance=control["median"], same_split_distance_sem=control["sem"])

    # proximity to the training data
    own, other, test_nn = [], [], []
    for m, (split, _) in enumerate(members):
        own.append(nearest_neighbors(samples[m], train_sets[split]))
        other.extend(nearest_neighbors(samples[m], train_sets[j]) for j in range(cfg.splits) if j != split)
        test_nn.append(nearest_neighbors(samples[m], test_set[: cfg.n]))  # size-matched to a split
    cat = lambda results, key: torch.cat([r[key] for r in results])
    record.update(nn_own_sim=float(cat(own, "sim").mean()), nn_other_sim=float(cat(other, "sim").mean()),
                  nn_test_sim=float(cat(test_nn, "sim").mean()), nn_own_l2=float(cat(own, "l2").mean()),
                  nn_other_l2=float(cat(other, "l2").mean()), nn_test_l2=float(cat(test_nn, "l2").mean()))
    fmem = memorized_fraction(cat(own, "l2"), cat(own, "l2_second"), n_boot=cfg.n_boot, seed=eval_seed)
    record.update(f_mem=fmem["value"], f_mem_ci=fmem["ci"])
    record["copy_z"] = float(sum(data_copying_z(o["l2"], h) for o, h in zip(own, heldout_l2)) / len(own))

    # score-level twin similarity on training vs test inputs
    x_train = [train_sets[split][: cfg.n_score_inputs].to(device) for split, _ in members]
    ordered = twins + [(b, a) for a, b in twins]
    sim = score_similarity(models, ordered, x_train, test_set[: cfg.n_score_inputs].to(device), list(cfg.score_ts),
                           schedule, seed=eval_seed + 2, batch_size=cfg.eval_batch, device=device)
    record["score_sim"] = {str(t): {"train": sim["train_mean"][i], "train_sem": sim["train_sem"][i],
                                    "test": sim["test_mean"][i], "test_sem": sim["test_sem"][i]}
                           for i, t in enumerate(sim["ts"])}
    return record, samples


def summarize(records: list[dict], cfg: AuditConfig, data_description: dict, members) -> dict:
    """Locate ``tau_loss`` and ``tau_bias`` with bootstrap uncertainty, give the verdict and the advice."""
    steps = [r["step"] for r in records]
    loss_units = torch.tensor([r["test_loss_units"] for r in records]).T  # (n_test, n_ckpt)
    tau_loss = checkpoint_minimum(steps, loss_units, n_boot=cfg.n_boot, seed=cfg.seed, reduce="mean")
    if len(records[0]["twin_distance_pairs"]) >= 2:  # bootstrap over twin pairs, median curve
        units, reduce = torch.tensor([r["twin_distance_pairs"] for r in records]).T, "median"
    else:  # a single pair: bootstrap over its shared-noise samples
        units, reduce = torch.tensor([r["twin_distance_samples"] for r in records]).T, "mean"
    tau_bias = checkpoint_minimum(steps, units, n_boot=cfg.n_boot, seed=cfg.seed + 1, reduce=reduce)
    t0 = str(cfg.score_ts[0])
    tau_score = {t: score_crossing(steps, [r["score_sim"][t]["train"] for r in records],
                                   [r["score_sim"][t]["test"] for r in records]) for t in records[0]["score_sim"]}
    judged = verdict(tau_bias, tau_loss)
    advice = recommend(judged, tau_bias, tau_loss)
    return {
        "verdict": judged["verdict"],
        "reason": judged["reason"],
        "p_bias_before_loss": judged.get("p_bias_before_loss"),
        "tau_bias": public_tau(tau_bias),
        "tau_loss": public_tau(tau_loss),
        "tau_loss_open": judged.get("tau_loss_open", False),  # test loss still falling at the last checkpoint
        "tau_score": tau_score,
        "tau_score_reference_t": t0,
        "window": [tau_bias["step"], tau_loss["step"]] if tau_bias["step"] < tau_loss["step"] else None,
        "recommended_step": advice["step"],
        "recommendation": advice["rationale"],
        "recommendation_basis": advice["basis"],
        "checkpoints": steps,
        "complete": len(steps) == len(checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)),
        "models": [{"model": m, "split": s, "split_seed": k} for m, (s, k) in enumerate(members)],
        "n_twin_pairs": len(model_pairs(members)[0]),
        "sampler": {"method": cfg.sampler, "steps": cfg.T if cfg.sampler == "ddpm" else cfg.sample_steps},
        "data": data_description,
        "config": dataclasses.asdict(cfg),
        "seeds": {"master": cfg.seed, "permutation": cfg.seed,
                  "model_init": [init_seed(cfg.seed, m, cfg.same_init) for m in range(len(members))],
                  "training": [training_seed(cfg.seed, m) for m in range(len(members))],
                  "sample_noise": f"seed*1000000 + 7919*j for sample j (seed={cfg.seed})"},
        "environment": environment(),
    }


def _gallery_rows(run: Path, summary: dict, train_sets, members, n: int = 10):
    """Rows for the gallery: twin samples at tau_bias and at the last checkpoint, with their nearest training images."""
    (a, b) = model_pairs(members)[0][0]
    rows = []
    for label, step in (("tau_bias", summary["tau_bias"]["step"]), ("final", summary["checkpoints"][-1])):
        samples = load_tensors(run / "samples" / f"step_{step:07d}")[0]["samples"]
        sa, sb = samples[a][:n], samples[b][:n]
        own = nearest_neighbors(sa, train_sets[members[a][0]])["index"]
        oth = nearest_neighbors(sa, train_sets[members[b][0]])["index"]
        rows += [(f"{label} (step {step}): model A", sa), (f"{label}: model B, same noise", sb),
                 (f"{label}: nearest to A in A's split", train_sets[members[a][0]][own]),
                 (f"{label}: nearest to A in B's split", train_sets[members[b][0]][oth])]
    return rows


def _window_text(summary: dict) -> str:
    if not summary["window"]:
        return "none"
    start, end = summary["window"]
    return f"steps {start}..{end}" + (" and beyond (the test loss was still falling at the end)" if summary["tau_loss_open"] else "")


def human_summary(summary: dict, out: Path) -> str:
    """A few lines for the terminal."""
    tb, tl = summary["tau_bias"], summary["tau_loss"]
    lines = [
        f"biasgen audit: {summary['verdict']}",
        f"  tau_bias (twins agree most)  = step {tb['step']}  (interval {tb['ci'][0]}..{tb['ci'][1]})",
        f"  tau_loss (test-loss minimum) = step {tl['step']}  (interval {tl['ci'][0]}..{tl['ci'][1]})",
        f"  biased window: {_window_text(summary)}",
        f"  recommended stopping checkpoint: step {summary['recommended_step']} — {summary['recommendation']}",
        f"  why: {summary['reason']}",
        f"  results in {out}: summary.json, metrics.jsonl, fig_*.png",
    ]
    return "\n".join(lines)
