"""Twins on the hierarchical data model: pool -> blocks -> training -> diagnostics -> onset -> report (SPEC §2, §5–§8).

    from biasgen.hierarchy.experiment import hierarchy
    summary = hierarchy("runs/hierarchy")                   # the 'cpu' preset, minutes on a laptop
    summary = hierarchy("runs/paper", preset="paper")        # SPEC §8, for a GPU

or from the shell: ``biasgen hierarchy --preset cpu --out runs/hierarchy``. The run
folder holds ``run.json``, ``metrics.jsonl`` (one record per evaluated
checkpoint), ``summary.json``, the figures ``fig_*.png`` and the checkpoints under
``models/``. A killed run continues with ``--resume``: finished models and
evaluated checkpoints are skipped.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import build_config, check, opt
from ..losses import x0_cross_entropy_loss
from ..jobs import resolve_workers
from ..onset import checkpoint_minimum, public_tau, recommend, verdict
from ..runs import append_jsonl, environment, prepare_run_dir, progress_bar, read_jsonl, write_json
from ..schedule import NoiseSchedule
from ..training import checkpoint_steps
from ..twins import init_seed, load_model, make_members, model_pairs, train_members, training_seed
from .grammar import Grammar
from .metrics import (kl_per_input, loss_decomposition, nearest_hamming, nn_divergence, noised_inputs, symmetric_kl,
                          uturn_overlap)
from .model import SequenceDenoiser, as_denoiser
from .denoisers import bp_denoise_fn, sample_sequences


@dataclass
class HierarchyConfig:
    # grammar (SPEC §5)
    q: int = opt(6, "vocabulary size")
    depth: int = opt(4, "tree depth l (sequences have 2**l symbols)")
    q_eff: int = opt(4, "child pairs owned by each parent symbol")
    sigma: float = opt(1.0, "spread of the rule log-probabilities")
    grammar_seed: int = opt(0, "seed of the random grammar")
    # data (SPEC §2)
    pool: int = opt(20_000, "sequences in the seeded pool the blocks and the test set are cut from")
    n: int = opt(64, "training sequences per block")
    blocks: int = opt(2, "disjoint training blocks K (>= 2)")
    seeds_per_block: int = opt(2, "models per block; >1 adds same-block pairs as a seed-variance control")
    n_test: int = opt(1000, "held-out test sequences")
    test_disjoint: bool = opt(True, "drop test sequences that also occur in a training block (content-disjoint test set)")
    seed: int = opt(0, "master seed: pool, model inits, training, evaluation noise")
    same_init: bool = opt(False, "start every model from the same weights (the twin-KL minimum is then meaningless)")
    # model (SPEC §8: 8 layers, width 512, 4 heads, FFN 1024)
    layers: int = opt(2, "transformer layers")
    width: int = opt(64, "transformer width")
    heads: int = opt(4, "attention heads")
    ffn: int = opt(128, "feed-forward width")
    dropout: float = opt(0.0, "dropout rate")
    T: int = opt(500, "diffusion steps (betas rescaled by 1000/T, SPEC §1)")
    # training
    steps: int = opt(1500, "optimisation steps per model")
    batch_size: int = opt(128, "batch size")
    lr: float = opt(1e-3, "Adam learning rate")
    checkpoints: int = opt(12, "number of log-spaced checkpoints (the last one is the final step)")
    first_checkpoint: int = opt(20, "first checkpoint step")
    grad_clip: float | None = opt(1.0, "gradient-norm clipping (none to disable)")
    ema_decay: float | None = opt(0.99, "EMA decay of the evaluated weights (none: raw weights; EMA smooths Adam noise but lags)")
    # evaluation (SPEC §7)
    t_frac: float = opt(0.15, "critical time t/T of the sample-split and model-oracle KLs")
    n_eval: int = opt(300, "test inputs (and training inputs per block) for the KLs at t/T = t_frac")
    n_loss: int = opt(1000, "test and training inputs for the frozen-noise cross-entropy and its decomposition")
    n_gen: int = opt(128, "generated sequences per model and checkpoint (shared noise) for D_NN")
    sampler: str = opt("ddim", "ddpm (ancestral, all T steps) or ddim (deterministic) for generation")
    sample_steps: int = opt(25, "DDIM steps (ignored by ddpm)")
    uturn_fracs: tuple[float, ...] = opt((0.02, 0.06, 0.12), "U-turn depths t/T")
    n_uturn: int = opt(32, "training and test sequences per model for the U-turn overlap")
    uturn_reps: int = opt(2, "U-turns per sequence")
    kl_t_fracs: tuple[float, ...] = opt((0.02, 0.05, 0.1, 0.15, 0.3, 0.6), "t/T grid of the KL-along-t curves")
    n_boot: int = opt(1000, "bootstrap resamples for the uncertainty of each tau")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    threads: int = opt(1, "CPU threads for torch during the run (0: torch's default); small models run fastest on 1")
    workers: int = opt(0, "processes that train models at once (0: one per CPU core on cpu, 1 on a GPU)")

    def validate(self) -> None:
        for name in ("q", "depth", "q_eff", "pool", "n", "n_test", "seeds_per_block", "layers", "width", "heads", "ffn",
                     "steps", "batch_size", "checkpoints", "first_checkpoint", "n_eval", "n_loss", "n_gen",
                     "sample_steps", "n_uturn", "uturn_reps"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        check(self.blocks >= 2, f"--blocks must be at least 2 (twins need two disjoint blocks), got {self.blocks}.")
        check(self.q_eff <= self.q, f"--q-eff must be at most q={self.q}, got {self.q_eff}.")
        check(self.sigma >= 0, f"--sigma must be >= 0, got {self.sigma}.")
        check(self.T >= 10, f"--T must be at least 10, got {self.T}.")
        check(self.width % self.heads == 0, f"--width ({self.width}) must be divisible by --heads ({self.heads}).")
        check(self.lr > 0, f"--lr must be positive, got {self.lr}.")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}.")
        check(self.grad_clip is None or self.grad_clip > 0, "--grad-clip must be positive (or none).")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, "--ema-decay must be in (0, 1) (or none).")
        check(self.n_boot >= 0, "--n-boot must be >= 0.")
        check(self.threads >= 0, f"--threads must be >= 0, got {self.threads}.")
        check(self.workers >= 0, f"--workers must be >= 0 (0 = automatic), got {self.workers}.")
        check(self.sampler in ("ddpm", "ddim"), f"--sampler must be ddpm or ddim, got {self.sampler!r}.")
        check(1 <= self.sample_steps <= self.T, f"--sample-steps must be in [1, {self.T}].")
        for name in ("t_frac", "uturn_fracs", "kl_t_fracs"):
            fracs = getattr(self, name)
            fracs = fracs if isinstance(fracs, tuple) else (fracs,)
            check(len(fracs) >= 1 and all(1 <= round(f * self.T) <= self.T for f in fracs),
                  f"--{name.replace('_', '-')} must hold fractions t/T with 1 <= t <= T (e.g. 0.15), got {fracs}.")
        need = self.blocks * self.n + self.n_test
        check(need <= self.pool, f"{self.blocks} blocks of {self.n} plus {self.n_test} test sequences need {need} "
                                 f"sequences but the pool has {self.pool}; raise --pool or lower --n / --n-test.")
        check(self.device == "cpu" or torch.cuda.is_available() or self.device == "mps",
              f"--device {self.device} is not available here; use --device cpu.")


PRESETS: dict[str, dict] = {
    # n = 64 per block, 2 x 2 models, 1500 steps: about 7 min on 2 shared CPU cores; docs/hierarchy-experiments.md gives what it shows.
    "cpu": {},
    # SPEC §8 at n = 12k, for a GPU (hours).
    "paper": dict(pool=1_000_000, n=12_000, blocks=3, seeds_per_block=5, n_test=10_000, layers=8, width=512, heads=4,
                  ffn=1024, steps=100_000, batch_size=512, lr=3e-4, ema_decay=None, checkpoints=25, first_checkpoint=10, n_eval=2000,
                  n_loss=10_000, n_gen=2048, sampler="ddpm", n_uturn=512, uturn_reps=8, device="cuda", threads=0),
    # A seconds-long smoke run (used by the tests); far too small to show anything.
    "tiny": dict(pool=400, n=48, blocks=2, seeds_per_block=1, n_test=64, depth=3, layers=1, width=16, heads=2, ffn=32,
                 steps=12, batch_size=16, checkpoints=3, first_checkpoint=4, n_eval=32, n_loss=32, n_gen=16,
                 sample_steps=5, uturn_fracs=(0.04,), n_uturn=8, uturn_reps=1, kl_t_fracs=(0.1, 0.5), n_boot=50, workers=1),
}


def hierarchy(out: str | Path, preset: str | None = "cpu", config: str | Path | None = None, *,
              resume: bool = False, force: bool = False, progress: bool = True, **settings) -> dict:
    """Python API of ``biasgen hierarchy``: resolve the config, run, and return ``summary.json`` as a dict."""
    cfg = build_config(HierarchyConfig, PRESETS, preset, config, settings)
    return run_hierarchy(cfg, out, resume=resume, force=force, progress=progress)


# -- data ---------------------------------------------------------------------------------------

@dataclass
class Data:
    grammar: Grammar
    blocks: list[torch.Tensor]  # K blocks, LongTensor (n, L) each
    test: torch.Tensor  # LongTensor (n_test, L)
    dropped_test: int  # test candidates skipped because they occur in a training block
    cross_block_duplicates: int  # block sequences that also occur in another block (exact copies)


def make_data(cfg: HierarchyConfig) -> Data:
    """Sample the seeded pool, permute it once, and cut K disjoint blocks and a test set from it."""
    grammar = Grammar.random(q=cfg.q, depth=cfg.depth, q_eff=cfg.q_eff, sigma=cfg.sigma, seed=cfg.grammar_seed)
    pool = grammar.sample(cfg.pool, k=0, seed=cfg.seed * 1000 + 1)
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed * 1000 + 2))]
    train_ids, rest_ids = _ids(pool[: cfg.blocks * cfg.n], pool[cfg.blocks * cfg.n:])
    blocks = [pool[i * cfg.n:(i + 1) * cfg.n] for i in range(cfg.blocks)]
    block_ids = train_ids.reshape(cfg.blocks, cfg.n)
    cross = sum(int(torch.isin(block_ids[i], torch.cat([block_ids[:i], block_ids[i + 1:]]).flatten()).sum())
                for i in range(cfg.blocks))
    keep = ~torch.isin(rest_ids, train_ids) if cfg.test_disjoint else torch.ones(len(rest_ids), dtype=torch.bool)
    test = pool[cfg.blocks * cfg.n:][keep][: cfg.n_test]
    check(len(test) == cfg.n_test, f"Only {len(test)} pool sequences outside the training blocks are left for "
                                   f"--n-test {cfg.n_test}; raise --pool.")
    last_used = int(torch.nonzero(keep)[cfg.n_test - 1])
    return Data(grammar, blocks, test, dropped_test=last_used + 1 - cfg.n_test, cross_block_duplicates=cross)


def _ids(*parts: torch.Tensor) -> list[torch.Tensor]:
    """One integer per distinct sequence, consistent across ``parts`` (each ``(N_i, L)``): ``[(N_i,), ...]``."""
    _, ids = torch.unique(torch.cat(parts), dim=0, return_inverse=True)
    return list(ids.split([len(p) for p in parts]))


# -- the pipeline -------------------------------------------------------------------------------

def run_hierarchy(cfg: HierarchyConfig, out: str | Path, *, resume: bool = False, force: bool = False,
                  progress: bool = True) -> dict:
    """Run (or resume) the twin experiment defined by ``cfg`` in the folder ``out``; returns the summary."""
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _run(cfg, Path(out), resume=resume, force=force, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: HierarchyConfig, out: Path, *, resume: bool, force: bool, progress: bool) -> dict:
    started = time.time()
    data = make_data(cfg)
    run = prepare_run_dir(out, dataclasses.asdict(cfg), resume=resume, force=force, kind="hierarchy",
                          runtime_keys=("workers", "threads", "device"))
    schedule = NoiseSchedule.onehot(cfg.T)
    members = make_members(cfg.blocks, cfg.seeds_per_block)
    steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)
    kwargs = model_kwargs(cfg)
    meta = {"config": dataclasses.asdict(cfg), "model": kwargs, "environment": environment()}

    t0 = time.time()
    workers = resolve_workers(cfg.workers, cfg.device)
    train_members(SequenceDenoiser, kwargs, x0_cross_entropy_loss, (schedule, cfg.q), data.blocks, members,
                  run / "models", seed=cfg.seed, same_init=cfg.same_init, meta=meta, workers=workers, device=cfg.device,
                  progress=progress, group="block", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                  checkpoints=steps, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay)
    training_s = time.time() - t0

    t0 = time.time()
    done = {r["step"] for r in read_jsonl(run / "metrics.jsonl")}
    todo = [s for s in steps if s not in done]
    reference = make_reference(data, schedule, cfg)
    for step in progress_bar(todo, progress, "evaluating checkpoints"):
        models = [load_model(SequenceDenoiser, kwargs, run / "models" / f"model{m}", step, cfg.device)
                  for m in range(len(members))]
        append_jsonl(run / "metrics.jsonl", {"step": step, **evaluate_checkpoint(models, members, data, reference,
                                                                                 schedule, cfg)})
    evaluation_s = time.time() - t0

    records = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["step"])
    summary = summarize(records, cfg, members, data)
    summary["bp_reference"] = {"kl_bp_along_t": reference.kl_bp, "kl_t_steps": reference.kl_steps,
                               "test_ce": reference.bp_test_l, "uturn_steps": reference.uturn_steps,
                               "uturn_overlap_bp_test": torch.stack(reference.uturn_bp)[:, :, cfg.n_uturn:].mean((0, 2)).tolist()}
    summary["timing"] = {"wall_s_this_invocation": round(time.time() - started, 1),
                         "training_s_this_invocation": round(training_s, 1),
                         "evaluation_s_this_invocation": round(evaluation_s, 1)}
    write_json(run / "summary.json", summary)
    plot_all(run, records, summary)
    return summary


def model_kwargs(cfg: HierarchyConfig) -> dict:
    return dict(q=cfg.q, length=2 ** cfg.depth, T=cfg.T, layers=cfg.layers, width=cfg.width, heads=cfg.heads,
                ffn=cfg.ffn, dropout=cfg.dropout)


# -- evaluation ---------------------------------------------------------------------------------

@dataclass
class Reference:
    """Evaluation inputs noised once (frozen noise) and everything the exact denoisers say about them."""

    t_c: int  # the critical step round(t_frac * T)
    test_c: tuple[torch.Tensor, torch.Tensor]  # test inputs at t_c: x_t (n_eval, L, q), t (n_eval,)
    train_c: list[tuple[torch.Tensor, torch.Tensor]]  # per block, the same for its first n_eval sequences
    bp_c: torch.Tensor  # BP_k predictions on test_c: (depth + 1, n_eval, L, q)
    test_l: tuple[torch.Tensor, torch.Tensor]  # frozen-noise (random t) test inputs for the cross-entropy
    train_l: list[tuple[torch.Tensor, torch.Tensor]]  # per block
    bp_test_l: float  # cross-entropy of the exact denoiser on test_l: the floor of the test loss
    test_nn: list[torch.Tensor]  # per block: Hamming distance of each test sequence to its nearest block sequence
    kl_steps: list[int]  # the t grid of the KL-along-t curves
    kl_inputs: list[tuple[torch.Tensor, torch.Tensor]]  # test inputs noised at each step of kl_steps
    kl_bp0: list[torch.Tensor]  # BP_0 predictions on kl_inputs
    kl_bp: list[list[float]]  # KL(BP_0 || BP_k) along t: (depth + 1) lists of len(kl_steps)
    uturn_steps: list[int]
    uturn_inputs: list[torch.Tensor]  # per block: its first n_uturn sequences then n_uturn test sequences (2 n_uturn, L)
    uturn_bp: list[torch.Tensor]  # per block: BP overlaps on uturn_inputs, (len(uturn_steps), 2 n_uturn)


def _steps(fracs, T: int) -> list[int]:
    return [max(1, min(T, round(f * T))) for f in fracs]


def make_reference(data: Data, schedule: NoiseSchedule, cfg: HierarchyConfig) -> Reference:
    """Noise the evaluation inputs once and run the exact (BP) denoisers on them."""
    g, q, seed = data.grammar, cfg.q, cfg.seed * 1000 + 17
    t_c = _steps([cfg.t_frac], cfg.T)[0]
    bps = [bp_denoise_fn(g, schedule, k) for k in range(cfg.depth + 1)]
    test_c = noised_inputs(data.test[: cfg.n_eval], q, schedule, t_c, seed)
    train_c = [noised_inputs(b[: cfg.n_eval], q, schedule, t_c, seed + 1 + i) for i, b in enumerate(data.blocks)]
    test_l = noised_inputs(data.test[: cfg.n_loss], q, schedule, None, seed + 100)
    train_l = [noised_inputs(b[: cfg.n_loss], q, schedule, None, seed + 101 + i) for i, b in enumerate(data.blocks)]
    kl_steps = _steps(cfg.kl_t_fracs, cfg.T)
    kl_inputs = [noised_inputs(data.test[: cfg.n_eval], q, schedule, t, seed + 200) for t in kl_steps]
    kl_bp0 = [bps[0](*xt) for xt in kl_inputs]
    kl_bp = [[float(kl_per_input(p0, bp(*xt)).mean()) for p0, xt in zip(kl_bp0, kl_inputs)] for bp in bps]
    uturn_steps = _steps(cfg.uturn_fracs, cfg.T)
    uturn_inputs = [torch.cat([b[: cfg.n_uturn], data.test[: cfg.n_uturn]]) for b in data.blocks]
    bp_test_l = loss_decomposition(bps[0], bps[0], data.test[: cfg.n_loss], *test_l)["l"]
    return Reference(
        t_c=t_c, test_c=test_c, train_c=train_c, bp_c=torch.stack([bp(*test_c) for bp in bps]),
        test_l=test_l, train_l=train_l, bp_test_l=bp_test_l, test_nn=[nearest_hamming(data.test, b) for b in data.blocks],
        kl_steps=kl_steps, kl_inputs=kl_inputs, kl_bp0=kl_bp0, kl_bp=kl_bp, uturn_steps=uturn_steps,
        uturn_inputs=uturn_inputs,
        uturn_bp=[uturn_overlap(bps[0], x, q, uturn_steps, schedule, cfg.uturn_reps, seed + 300) for x in uturn_inputs],
    )


@torch.no_grad()
def evaluate_checkpoint(models, members, data: Data, ref: Reference, schedule: NoiseSchedule,
                        cfg: HierarchyConfig) -> dict:
    """Every diagnostic of SPEC §7 for one checkpoint of all models; returns the metrics record.

    ``models``: networks predicting x0 logits; ``members[m] = (block, seed)``.
    Divergences and losses are in nats per sequence (summed over the ``2**depth`` positions).
    """
    q, seed = cfg.q, cfg.seed * 1000 + 17
    dens = [as_denoiser(m) for m in models]
    bp0 = bp_denoise_fn(data.grammar, schedule, 0)
    twins, controls = model_pairs(members)
    rec: dict = {}

    # twin disagreement at t_c on test inputs, on both twins' training inputs, and for same-block controls
    pred_test = [d(*ref.test_c).double() for d in dens]
    pred_train = [[d(*xt).double() for xt in ref.train_c] for d in dens]
    rec["skl_test_pairs"] = [symmetric_kl(pred_test[a], pred_test[b]) for a, b in twins]
    rec["skl_train_pairs"] = [0.5 * sum(symmetric_kl(pred_train[a][blk], pred_train[b][blk]) for blk in (members[a][0], members[b][0]))
                              for a, b in twins]
    rec["skl_control_pairs"] = [symmetric_kl(pred_test[a], pred_test[b]) for a, b in controls]

    # sequential learning: KL(BP_k || model) for k = 0..depth at t_c, and KL(BP_0 || model) along t
    rec["oracle_kl"] = [[float(kl_per_input(bp, p).mean()) for bp in ref.bp_c] for p in pred_test]  # (M, depth + 1)
    rec["kl_along_t"] = [[float(kl_per_input(p0, d(*xt)).mean()) for p0, xt in zip(ref.kl_bp0, ref.kl_inputs)]
                         for d in dens]

    # frozen-noise cross-entropy and its decomposition l = l* + l~, on test and on each model's own block
    test_dec = [loss_decomposition(d, bp0, data.test[: cfg.n_loss], *ref.test_l) for d in dens]
    train_dec = [loss_decomposition(d, bp0, data.blocks[blk][: cfg.n_loss], *ref.train_l[blk])
                 for d, (blk, _) in zip(dens, members)]
    for key in ("l", "l_star", "l_tilde"):
        rec[f"test_{key}"] = [r[key] for r in test_dec]
        rec[f"train_{key}"] = [r[key] for r in train_dec]

    # generation from shared noise: D_NN, grammaticality, exact log-probability
    seeds = [cfg.seed * 1_000_000 + 7919 * j for j in range(cfg.n_gen)]
    gen = [sample_sequences(d, 2 ** cfg.depth, q, seeds, schedule, cfg.sampler,
                            None if cfg.sampler == "ddpm" else cfg.sample_steps, batch_size=1024) for d in dens]
    rec["d_nn"] = [nn_divergence(x, data.test, data.blocks[blk]) for x, (blk, _) in zip(gen, members)]
    rec["gen_nn_mean"] = [float(nearest_hamming(x, data.blocks[blk]).double().mean()) for x, (blk, _) in zip(gen, members)]
    rec["gen_copy_share"] = [float((nearest_hamming(x, data.blocks[blk]) == 0).double().mean())
                             for x, (blk, _) in zip(gen, members)]
    logp = [data.grammar.log_prob(x) for x in gen]
    rec["gen_grammatical"] = [float(lp.isfinite().double().mean()) for lp in logp]
    rec["gen_logprob"] = [float(lp[lp.isfinite()].mean()) if lp.isfinite().any() else None for lp in logp]

    # U-turns: overlap of model / BP, on the model's own training sequences vs test sequences
    rec["uturn_ratio_train"], rec["uturn_ratio_test"] = [], []
    n = cfg.n_uturn
    for d, (blk, _) in zip(dens, members):
        model = uturn_overlap(d, ref.uturn_inputs[blk], q, ref.uturn_steps, schedule, cfg.uturn_reps, seed + 300)
        bp = ref.uturn_bp[blk]
        rec["uturn_ratio_train"].append((model[:, :n].mean(1) / bp[:, :n].mean(1)).tolist())
        rec["uturn_ratio_test"].append((model[:, n:].mean(1) / bp[:, n:].mean(1)).tolist())
    return rec


# -- onset and summary --------------------------------------------------------------------------

def _table(records: list[dict], key: str, column: int | None = None) -> torch.Tensor:
    """``(n_units, n_ckpt)`` table of a per-unit metric (``column`` picks one entry of per-unit lists)."""
    rows = [r[key] if column is None else [u[column] for u in r[key]] for r in records]
    return torch.tensor(rows, dtype=torch.float64).T


def summarize(records: list[dict], cfg: HierarchyConfig, members, data: Data) -> dict:
    """Locate tau_bias, tau_nn, tau_oracle and tau_loss with bootstrap uncertainty; verdict and coarse-to-fine order."""
    steps = [r["step"] for r in records]
    boot = dict(n_boot=cfg.n_boot, seed=cfg.seed)
    tau = {
        "tau_bias": checkpoint_minimum(steps, _table(records, "skl_test_pairs"), reduce="median", **boot),
        "tau_nn": checkpoint_minimum(steps, _table(records, "d_nn"), reduce="median", **boot),
        "tau_oracle": checkpoint_minimum(steps, _table(records, "oracle_kl", 0), reduce="mean", **boot),
        "tau_loss": checkpoint_minimum(steps, _table(records, "test_l"), reduce="mean", **boot),
    }
    judged = verdict(tau["tau_bias"], tau["tau_loss"])
    advice = recommend(judged, tau["tau_bias"], tau["tau_loss"])
    by_k = [checkpoint_minimum(steps, _table(records, "oracle_kl", k), reduce="mean", **boot) for k in range(cfg.depth + 1)]
    argmins = [m["step"] for m in by_k]
    twins, controls = model_pairs(members)
    return {
        "verdict": judged["verdict"],
        "reason": judged["reason"],
        "p_bias_before_loss": judged["p_bias_before_loss"],
        "tau_loss_open": judged["tau_loss_open"],  # the test loss still falls at the last checkpoint
        **{name: public_tau(t) for name, t in tau.items()},
        "window": [tau["tau_bias"]["step"], tau["tau_loss"]["step"]] if judged["window"]["exists"] else None,
        "recommended_step": advice["step"],
        "recommendation": advice["rationale"],
        "coarse_to_fine": {
            "oracle_kl_argmin_step": argmins,  # per k = 0..depth: checkpoint where the model is closest to BP_k
            "oracle_kl_argmin_ci": [m["ci"] for m in by_k],
            "ordered": all(a >= b for a, b in zip(argmins, argmins[1:])) and argmins[-1] < argmins[0],
            "rule": "coarse-to-fine when the model is closest to BP_k at non-increasing steps as k grows, "
                    "and strictly earlier for k = depth than for k = 0",
        },
        "checkpoints": steps,
        "complete": len(steps) == len(checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)),
        "models": [{"model": m, "block": b, "block_seed": s} for m, (b, s) in enumerate(members)],
        "n_twin_pairs": len(twins),
        "n_control_pairs": len(controls),
        "units": {"tau_bias": "twin pairs (median)", "tau_nn": "models (median)", "tau_oracle": "models (mean)",
                  "tau_loss": "models (mean)"},
        "sampler": {"method": cfg.sampler, "steps": cfg.T if cfg.sampler == "ddpm" else cfg.sample_steps},
        "data": {"grammar": {"q": cfg.q, "depth": cfg.depth, "q_eff": cfg.q_eff, "sigma": cfg.sigma,
                             "seed": cfg.grammar_seed, "leaf_entropy_nats": data.grammar.leaf_entropy()},
                 "pool": cfg.pool, "n_per_block": cfg.n, "blocks": cfg.blocks, "n_test": cfg.n_test,
                 "test_duplicates_dropped": data.dropped_test, "cross_block_duplicates": data.cross_block_duplicates,
                 "distinct_per_block": [len(torch.unique(b, dim=0)) for b in data.blocks]},
        "config": dataclasses.asdict(cfg),
        "seeds": {"master": cfg.seed, "pool": cfg.seed * 1000 + 1, "permutation": cfg.seed * 1000 + 2,
                  "model_init": [init_seed(cfg.seed, m, cfg.same_init) for m in range(len(members))],
                  "training": [training_seed(cfg.seed, m) for m in range(len(members))],
                  "evaluation_noise": cfg.seed * 1000 + 17,
                  "sample_noise": f"seed*1000000 + 7919*j for sample j (seed={cfg.seed})"},
        "environment": environment(),
    }


def human_summary(summary: dict, out: Path) -> str:
    """A few lines for the terminal."""
    fmt = lambda name: (f"step {summary[name]['step']:>6}  (68% interval {summary[name]['ci'][0]}..{summary[name]['ci'][1]}, "
                        f"over {summary[name]['n_units']} {summary['units'][name].split(' (')[0]})")
    c2f = summary["coarse_to_fine"]
    return "\n".join([
        f"biasgen hierarchy: {summary['verdict']}",
        f"  tau_bias   (twins agree most)       = {fmt('tau_bias')}",
        f"  tau_nn     (D_NN minimum)           = {fmt('tau_nn')}",
        f"  tau_oracle (closest to exact BP)    = {fmt('tau_oracle')}",
        f"  tau_loss   (test cross-entropy min) = {fmt('tau_loss')}"
        + ("  still falling at the last checkpoint" if summary["tau_loss_open"] else ""),
        f"  biased window: {summary['window'] if summary['window'] else 'none'}; "
        f"P(tau_bias < tau_loss) = {summary['p_bias_before_loss']:.2f}",
        f"  closest to BP_k at steps {c2f['oracle_kl_argmin_step']} for k = 0..{len(c2f['oracle_kl_argmin_step']) - 1}"
        f" ({'coarse-to-fine' if c2f['ordered'] else 'not ordered coarse-to-fine'})",
        f"  why: {summary['reason']}",
        f"  results in {out}: summary.json, metrics.jsonl, fig_*.png",
    ])


# -- figures (shaped like the paper's Figs. 1b, 3b, 4a, 4b, 5) -----------------------------------

def plot_all(run: Path, records: list[dict], summary: dict) -> None:
    """Write ``fig_kl.png``, ``fig_kl_along_t.png``, ``fig_nn.png``, ``fig_loss_decomposition.png``, ``fig_uturn.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    mean = lambda key, col=None: _table(records, key, col).mean(0).tolist()
    marks = {"tau_bias": "C3", "tau_nn": "C2", "tau_oracle": "C4", "tau_loss": "k"}

    def mark(ax):
        for name, color in marks.items():
            ax.axvline(summary[name]["step"], color=color, ls="--", lw=1, label=name)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(run / name, dpi=110)
        plt.close(fig)

    # Fig. 1b: sample-split KL and KL(BP_k || model) vs training time
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, _table(records, "skl_test_pairs").median(0).values, "o-", label="twins, test inputs")
    a.plot(steps, _table(records, "skl_train_pairs").median(0).values, "s-", label="twins, training inputs")
    if records[0]["skl_control_pairs"]:
        a.plot(steps, _table(records, "skl_control_pairs").median(0).values, "^:", label="same block (control)")
    a.set(xscale="log", xlabel="training step", ylabel="sample-split KL (nats/seq)",
          title=f"twin disagreement at t/T = {summary['config']['t_frac']}")
    for k in range(len(records[0]["oracle_kl"][0])):
        b.plot(steps, mean("oracle_kl", k), "o-", ms=3, label=f"k = {k}")
    b.set(xscale="log", yscale="log", xlabel="training step", ylabel="KL(BP_k || model) (nats/seq)",
          title="model vs exact k-filtered denoisers")
    for ax in (a, b):
        mark(ax)
        ax.legend(fontsize=7)
    save(fig, "fig_kl.png")

    # Fig. 3b: KL along t
    t_fracs = summary["config"]["kl_t_fracs"]
    kl_bp = summary["bp_reference"]["kl_bp_along_t"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, curve in enumerate(kl_bp):
        if k:
            ax.plot(t_fracs, curve, ":", color=f"C{k}", label=f"KL(BP_0 || BP_{k})")
    for name in ("tau_bias", "tau_loss"):
        i = summary[name]["index"]
        ax.plot(t_fracs, torch.tensor(records[i]["kl_along_t"]).mean(0), "o-", label=f"KL(BP_0 || model) at {name}")
    ax.plot(t_fracs, torch.tensor(records[-1]["kl_along_t"]).mean(0), "o-", label="KL(BP_0 || model), final")
    ax.axvline(summary["config"]["t_frac"], color="gray", lw=1)
    ax.set(xlabel="t / T", ylabel="KL (nats/seq)", yscale="log", title="divergence from the exact denoiser along t")
    ax.legend(fontsize=7)
    save(fig, "fig_kl_along_t.png")

    # Fig. 4a: D_NN with train/test cross-entropy
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, _table(records, "d_nn").median(0).values, "o-", color="C2", label="D_NN")
    ax.set(xscale="log", xlabel="training step", ylabel="D_NN = KL(P_gen || P_test)")
    ax2 = ax.twinx()
    ax2.plot(steps, mean("test_l"), "s-", color="C0", label="test CE")
    ax2.plot(steps, mean("train_l"), "^-", color="C1", label="train CE")
    ax2.set_ylabel("cross-entropy (nats/seq, frozen noise)")
    mark(ax)
    fig.legend(fontsize=7, loc="upper center", ncol=3)
    save(fig, "fig_nn.png")

    # Fig. 4b: loss decomposition
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "o-"), ("test", "s--")):
        a.plot(steps, mean(f"{split}_l_star"), style, label=f"l* {split}")
        b.plot(steps, mean(f"{split}_l_tilde"), style, label=f"l~ {split}")
    a.set(xscale="log", xlabel="training step", ylabel="l* (nats/seq)", title="distillation of the exact denoiser")
    b.axhline(0, color="gray", lw=1)
    b.set(xscale="log", xlabel="training step", ylabel="l~ (nats/seq)", title="data-dependent excess")
    for ax in (a, b):
        mark(ax)
        ax.legend(fontsize=7)
    save(fig, "fig_loss_decomposition.png")

    # Fig. 5: U-turn overlap ratio model / BP on training vs test sequences
    u_fracs = summary["config"]["uturn_fracs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for j, name in enumerate(("tau_bias", "tau_loss")):
        r = records[summary[name]["index"]]
        ax.plot(u_fracs, torch.tensor(r["uturn_ratio_train"]).mean(0), "o-", color=f"C{j}", label=f"train, {name}")
        ax.plot(u_fracs, torch.tensor(r["uturn_ratio_test"]).mean(0), "s--", color=f"C{j}", label=f"test, {name}")
    r = records[-1]
    ax.plot(u_fracs, torch.tensor(r["uturn_ratio_train"]).mean(0), "o-", color="C3", label="train, final")
    ax.plot(u_fracs, torch.tensor(r["uturn_ratio_test"]).mean(0), "s--", color="C3", label="test, final")
    ax.axhline(1, color="gray", lw=1)
    ax.set(xlabel="U-turn depth t / T", ylabel="overlap ratio model / BP", title="U-turns")
    ax.legend(fontsize=7)
    save(fig, "fig_uturn.png")
