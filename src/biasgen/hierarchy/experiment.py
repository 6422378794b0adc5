"""Twins on the hierarchical data model: the sequence definition of the twin pipeline.

    from biasgen.hierarchy.experiment import hierarchy
    summary = hierarchy("runs/hierarchy")                   # the 'cpu' preset, minutes on a laptop
    summary = hierarchy("runs/paper", preset="paper")        # the paper's setting, for a GPU

or from the shell: ``biasgen hierarchy --preset cpu --out runs/hierarchy``. A
seeded pool of grammar sequences is permuted once and cut into disjoint
training splits and a test set; each model is an encoder transformer predicting
x0 logits; every checkpoint is compared with the exact belief-propagation
denoisers BP_k. The run folder is laid out as for ``biasgen audit``; what each
diagnostic means: docs/method.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TwinConfig, check, check_at_least, opt
from ..errors import BiasgenError
from ..losses import X0CrossEntropyLoss
from ..memorization import wilson
from ..pipeline import Curve, Data, Shared, TwinExperiment, metric_table as table, run_experiment
from ..sampler import DEFAULT_SAMPLER, SAMPLER_HELP
from ..schedule import NoiseSchedule
from ..seeds import SeedPlan
from ..twins import model_pairs
from . import figures
from .denoisers import bp_denoise_fn, empirical_denoise_fn, sample_sequences
from .grammar import Grammar
from .metrics import (bp_predictions, distance_divergence, is_near_copy, loss_terms, near_copies, nearest_hamming,
                      nearest_two_hamming, nn_histogram,
                      noised_inputs, oracle_kl, oracle_kl_along_t, symmetric_kl, uturn_overlap, uturn_random, uturn_ratio)
from .model import SequenceDenoiser, as_denoiser
from .report_view import VIEW


@dataclass
class HierarchyConfig(TwinConfig):
    """The hierarchical experiment's settings: the shared twin settings plus the grammar and its diagnostics."""

    n: int = opt(64, "training sequences per split")
    n_test: int = opt(1000, "held-out test sequences")
    seeds_per_split: int = opt(2, "models per split; >1 adds same-split pairs as a seed-variance control")
    T: int = opt(500, "diffusion steps (betas rescaled by 1000/T)")
    dropout: float = opt(0.0, "dropout rate")
    batch_size: int = opt(128, "batch size")
    ema_decay: float | None = opt(0.99, "EMA decay of the evaluated weights (none: raw weights; EMA smooths Adam noise but lags)")
    sampler: str = opt(DEFAULT_SAMPLER, SAMPLER_HELP + "; ddim collapses an undertrained model's samples onto the "
                                                       "most likely symbols")
    threads: int = opt(1, "torch CPU threads in the main process (0: torch's default); small models run fastest on 1")
    # grammar
    q: int = opt(6, "vocabulary size")
    depth: int = opt(4, "tree depth l (sequences have 2**l symbols)")
    q_eff: int = opt(4, "child pairs owned by each parent symbol")
    sigma: float = opt(1.0, "spread of the rule log-probabilities")
    grammar_seed: int = opt(0, "seed of the random grammar")
    grammar_file: str | None = opt(None, "load the grammar tensor M (q, q, q) from a .npy or .pt file instead of drawing it")
    pool: int = opt(20_000, "sequences in the seeded pool the splits and the test set are cut from")
    test_disjoint: bool = opt(True, "drop test sequences that also occur in a training split (content-disjoint test set)")
    # model (the paper: 8 layers, width 512, 4 heads, FFN 1024)
    layers: int = opt(2, "transformer layers")
    width: int = opt(64, "transformer width")
    heads: int = opt(4, "attention heads")
    ffn: int = opt(128, "feed-forward width")
    # diagnostics
    t_frac: float = opt(0.15, "critical time t/T of the sample-split and model-oracle KLs")
    n_eval: int = opt(300, "test inputs (and training inputs per split) for the KLs at t/T = t_frac")
    n_loss: int = opt(1000, "test and training inputs for the frozen-noise cross-entropy and its decomposition")
    loss_t_frac: float = opt(0.3, "t/T of the loss decomposition at one noise level (the paper's Fig. 4b)")
    uturn_fracs: tuple[float, ...] = opt((0.02, 0.06, 0.12), "U-turn depths t/T")
    n_uturn: int = opt(32, "training and test sequences per model for the U-turn overlap")
    uturn_reps: int = opt(2, "U-turns per sequence")
    kl_t_fracs: tuple[float, ...] = opt((0.02, 0.05, 0.1, 0.15, 0.3, 0.6), "t/T grid of the KL-along-t curves")
    random_uturn_fracs: tuple[float, ...] = opt((0.05, 0.1), "U-turn depths t/T of uniformly random sequences")
    n_random_uturn: int = opt(32, "uniformly random sequences for their U-turns (>= 2)")

    INPUT_KEYS = ("grammar_file",)

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 1, "q", "depth", "q_eff", "pool", "layers", "width", "heads", "ffn", "n_eval", "n_loss",
                       "n_uturn", "uturn_reps")
        check_at_least(self, 2, "n_random_uturn")
        check(self.q_eff <= self.q, f"--q-eff must be at most q={self.q}, got {self.q_eff}.")
        check(self.sigma >= 0, f"--sigma must be >= 0, got {self.sigma}.")
        check(self.width % self.heads == 0, f"--width ({self.width}) must be divisible by --heads ({self.heads}).")
        for name in ("t_frac", "loss_t_frac", "uturn_fracs", "kl_t_fracs", "random_uturn_fracs"):
            fracs = getattr(self, name)
            fracs = fracs if isinstance(fracs, tuple) else (fracs,)
            check(len(fracs) >= 1 and all(1 <= round(f * self.T) <= self.T for f in fracs),
                  f"--{name.replace('_', '-')} must hold fractions t/T with 1 <= t <= T (e.g. 0.15), got {fracs}.")
        need = self.splits * self.n + self.n_test
        check(need <= self.pool, f"{self.splits} splits of {self.n} plus {self.n_test} test sequences need {need} "
                                 f"sequences but the pool has {self.pool}; raise --pool or lower --n / --n-test.")


PRESETS: dict[str, dict] = {
    # n = 64 per split, 2 splits x 3 seeds, 1500 steps, checkpoints from step 2 (the twins first converge within ~15
    # steps): a few minutes on 2 CPU cores; docs/hierarchy-experiments.md gives what it shows and why 3 seeds.
    "cpu": dict(seeds_per_split=3, first_checkpoint=2, checkpoints=18),
    # A depth-3 grammar the 2-layer model learns nearly to the exact test cross-entropy on CPU (n = 1000 per split,
    # 3000 steps, 2 splits x 3 seeds, as the cpu preset); docs/hierarchy-experiments.md gives what it shows.
    "cpu-depth3": dict(depth=3, n=1000, steps=3000, checkpoints=14, seeds_per_split=3),
    # The paper's hierarchical setting (docs/method.md §8) at n = 12k, for a GPU (hours).
    "paper": dict(pool=1_000_000, n=12_000, splits=3, seeds_per_split=5, n_test=10_000, layers=8, width=512, heads=4,
                  ffn=1024, steps=100_000, batch_size=512, lr=3e-4, lr_schedule="halve-cosine", grad_clip=None,
                  ema_decay=None, checkpoints=25, first_checkpoint=10,
                  n_eval=2000, n_loss=10_000, n_samples=2048, sampler="ddpm", sample_steps=None, n_uturn=512,
                  uturn_reps=8, n_random_uturn=512, device="cuda", threads=0),
    # A seconds-long smoke run (used by the tests); far too small to show anything.
    "tiny": dict(sampler="ddim", pool=400, n=48, splits=2, seeds_per_split=1, n_test=64, depth=3, layers=1, width=16, heads=2, ffn=32,
                 steps=12, batch_size=16, checkpoints=3, first_checkpoint=4, n_eval=32, n_loss=32, n_samples=16,
                 sample_steps=5, uturn_fracs=(0.04,), n_uturn=8, uturn_reps=1, kl_t_fracs=(0.1, 0.5), n_boot=50,
                 random_uturn_fracs=(0.04,), n_random_uturn=4, workers=1),
}

SWEEP_PRESETS: dict[str, dict] = {  # biasgen sweep's presets of the grammar lab (biasgen.sweep; docs/sweep.md)
    # The grammar lab at CPU sizes: the experiment's 'cpu' preset (2 splits x 3 seeds, checkpoints from step 2) at
    # each size; docs/sweep.md gives what it shows. 25-step ancestral sampling (not the paper's all-T sampler, noted
    # in each verdict) keeps it within 30 minutes; the hierarchy's tau_bias does not depend on sampling.
    "hierarchy-cpu": dict(experiment_preset="cpu", sizes=(16, 32, 64, 128), steps_per_image=25.0,
                          settings=dict(splits=2, sample_steps=25)),
    # The paper's hierarchical sizes (Garnier-Brun et al. 2026, Sec. 4: n = 5k, 12k, 70k), for a GPU.
    "paper": dict(experiment_preset="paper", sizes=(5_000, 12_000, 70_000)),
    # A seconds-long smoke sweep (used by the tests); far too small to show anything.
    "tiny-hierarchy": dict(experiment_preset="tiny", sizes=(8, 16, 24), steps_per_image=0.5,
                           settings=dict(threads=1, n_boot=30)),
}


def steps_of(fracs, T: int) -> list[int]:
    """Diffusion steps ``round(f * T)`` (clamped to 1..T) of the fractions ``fracs``."""
    return [max(1, min(T, round(f * T))) for f in fracs]


@dataclass
class Frozen:
    """Sequences noised once with a fixed seed (reused at every checkpoint) and the exact denoisers on them."""

    x0: torch.Tensor  # LongTensor (N, L): the clean sequences
    x_t: torch.Tensor  # (N, L, q) float64: their noised one-hot encodings
    t: torch.Tensor  # (N,) long: the step of each input
    bp: torch.Tensor  # (K, N, L, q) float64: BP_0..BP_{K-1} on (x_t, t); K = 0 where no exact prediction is needed


@dataclass
class Reference:
    """Evaluation inputs noised once (frozen noise) and what the exact denoisers say about them."""

    grammar: Grammar
    train: list[torch.Tensor]  # one training split per entry, LongTensor (n, L)
    test: torch.Tensor  # LongTensor (n_test, L)
    test_c: Frozen  # n_eval test inputs at the critical step, BP_0..BP_depth
    train_c: list[Frozen]  # per split, its first n_eval sequences at the critical step (no BP)
    test_l: Frozen  # n_loss test inputs, each at its own random step (frozen-noise cross-entropy), BP_0
    train_l: list[Frozen]  # per split, the same for its first n_loss sequences
    test_lt: Frozen  # the same n_loss test sequences, all at the step of loss_t_frac, BP_0
    train_lt: list[Frozen]  # per split
    kl_test: list[Frozen]  # per step of kl_steps, n_eval test inputs, BP_0..BP_depth
    kl_train: list[list[Frozen]]  # per split, per step of kl_steps, its first n_eval sequences, BP_0..BP_depth
    kl_steps: list[int]  # the t grid of the KL-along-t curves
    kl_bp: list[list[float]]  # KL(BP_0 || BP_k) along t on the test inputs: (depth + 1) lists of len(kl_steps)
    test_nn_dist: list[torch.Tensor]  # per split, LongTensor (n_test,): each test sequence's distance to its nearest training one
    uturn_steps: list[int]
    uturn_own: int  # training sequences at the head of each uturn_inputs entry: min(n_uturn, n)
    uturn_inputs: list[torch.Tensor]  # per split: its first uturn_own sequences then n_uturn test sequences (., L)
    uturn_bp: list[torch.Tensor]  # per split: BP overlaps on uturn_inputs, (len(uturn_steps), len(uturn_inputs[i]))
    random_uturn_steps: list[int]
    random_uturn: dict  # U-turns of random sequences: {"bp_k" / "empirical_split_i": {"mean", "sem"}}


def make_data(cfg: HierarchyConfig, seeds: SeedPlan) -> Data:
    """Sample the seeded pool, permute it once, and cut K disjoint splits and a test set from it."""
    grammar = (load_grammar(cfg.grammar_file, cfg.q, cfg.depth) if cfg.grammar_file else
               Grammar.random(q=cfg.q, depth=cfg.depth, q_eff=cfg.q_eff, sigma=cfg.sigma, seed=cfg.grammar_seed))
    pool = grammar.sample(cfg.pool, k=0, seed=seeds.pool())
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seeds.pool_permutation()))]
    used = cfg.splits * cfg.n
    train_ids, rest_ids = _ids(pool[:used], pool[used:])
    splits = [pool[i * cfg.n:(i + 1) * cfg.n] for i in range(cfg.splits)]
    split_ids = train_ids.reshape(cfg.splits, cfg.n)
    cross = sum(int(torch.isin(split_ids[i], torch.cat([split_ids[:i], split_ids[i + 1:]]).flatten()).sum())
                for i in range(cfg.splits))
    keep = ~torch.isin(rest_ids, train_ids) if cfg.test_disjoint else torch.ones(len(rest_ids), dtype=torch.bool)
    test = pool[used:][keep][: cfg.n_test]
    check(len(test) == cfg.n_test, f"Only {len(test)} pool sequences outside the training splits are left for "
                                   f"--n-test {cfg.n_test}; raise --pool.")
    dropped = int(torch.nonzero(keep)[cfg.n_test - 1]) + 1 - cfg.n_test
    description = {
        "grammar": {"q": cfg.q, "depth": cfg.depth, "q_eff": cfg.q_eff, "sigma": cfg.sigma, "seed": cfg.grammar_seed,
                    "file": cfg.grammar_file, "leaf_entropy_nats": grammar.leaf_entropy()},
        "pool": cfg.pool, "n_per_split": cfg.n, "splits": cfg.splits, "n_test": cfg.n_test,
        "test_duplicates_dropped": dropped, "cross_split_duplicates": cross,
        "distinct_per_split": [len(torch.unique(s, dim=0)) for s in splits],
        # what a model sampling the grammar exactly would score on gen_mem_share: held-out sequences that are near-copies
        "test_near_copy_share": [float(near_copies(test, s).double().mean()) for s in splits],
    }
    return Data(train=splits, test=test, description=description, extra={"grammar": grammar})


def load_grammar(path: str, q: int, depth: int) -> Grammar:
    """A grammar tensor ``M[a, b, c] = P(left=b, right=c | parent=a)`` of shape ``(q, q, q)`` from ``.npy`` or
    ``.pt`` (read without running code: ``numpy.load(allow_pickle=False)``, ``torch.load(weights_only=True)``)."""
    import pickle
    import warnings

    import numpy as np

    file = Path(path).expanduser()
    check(file.is_file(), f"--grammar-file {path} does not exist; give a .npy or .pt file holding M of shape (q, q, q).")
    try:
        if file.suffix == ".npy":
            M = torch.from_numpy(np.load(file, allow_pickle=False))
        elif file.suffix == ".pt":
            with warnings.catch_warnings():  # torch warns about the protocol of a pickle it then refuses
                warnings.simplefilter("ignore")
                M = torch.load(file, weights_only=True, map_location="cpu")
        else:
            raise ValueError("the file must end in .npy or .pt")
    except (ValueError, TypeError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0][:200]  # torch's refusal of a pickle runs to many lines
        raise BiasgenError(f"Cannot read the grammar tensor from {file} ({reason}); only plain arrays are read, never "
                           "pickled objects. Save M, a float tensor, with numpy.save or torch.save.") from e
    check(isinstance(M, torch.Tensor) and M.is_floating_point() and tuple(M.shape) == (q, q, q),
          f"--grammar-file {path} must hold a float tensor of shape (q, q, q) = ({q}, {q}, {q}) matching --q; got "
          f"{f'{M.dtype} {tuple(M.shape)}' if isinstance(M, torch.Tensor) else type(M).__name__}.")
    return Grammar(M, depth)


def _ids(*parts: torch.Tensor) -> list[torch.Tensor]:
    """One integer per distinct sequence, consistent across ``parts`` (each ``(N_i, L)``): ``[(N_i,), ...]``."""
    _, ids = torch.unique(torch.cat(parts), dim=0, return_inverse=True)
    return list(ids.split([len(p) for p in parts]))


class HierarchyExperiment(TwinExperiment):
    """Twins on disjoint splits of a grammar's sequences, each an x0-predicting transformer."""

    kind = "hierarchy"
    config_class = HierarchyConfig
    presets = PRESETS
    default_preset = "cpu"
    report_view = VIEW
    sweep_presets = SWEEP_PRESETS
    memorization_rule = ("gen_mem_share: generated sequences whose Hamming distances to the nearest and second-nearest "
                         "distinct sequence of their own split have d1/d2 < 1/3 (exact copies included); Wilson 95% interval")
    sampler_caveat = ("tau_bias does not depend on it (it is measured on the denoisers), but the generated sequences "
                      "do: the memorized share, tau_mem and the D_NN curve")
    default_out = "runs/hierarchy"
    help = "twins on the hierarchical data model, with exact (belief-propagation) ground truth"
    cfg: HierarchyConfig

    def load(self) -> Data:
        return make_data(self.cfg, self.seeds)

    def largest_size(self) -> int:
        return (self.cfg.pool - self.cfg.n_test) // self.cfg.splits

    def network(self, data: Data) -> tuple[type, dict]:
        cfg = self.cfg
        return SequenceDenoiser, dict(q=cfg.q, length=2 ** cfg.depth, T=cfg.T, layers=cfg.layers, width=cfg.width,
                                      heads=cfg.heads, ffn=cfg.ffn, dropout=cfg.dropout)

    def loss(self):
        return X0CrossEntropyLoss(NoiseSchedule.onehot(self.cfg.T), self.cfg.q)

    def reference(self, data: Data, members) -> Reference:
        return make_reference(data, self.cfg, self.seeds)

    def evaluate(self, models, shared: Shared):
        return evaluate_checkpoint(models, shared.members, shared.reference, self.cfg, self.seeds)

    def curves(self, records: list[dict]) -> dict[str, Curve]:
        return {
            "tau_bias": Curve(table(records, "skl_test_pairs"), "mean", "twin pairs"),
            **({"control": Curve(table(records, "skl_control_pairs"), "mean", "control pairs")}
               if records[0]["skl_control_pairs"] else {}),
            "tau_nn": Curve(table(records, "d_nn"), "median", "models"),
            "tau_oracle": Curve(table(records, "oracle_kl", 0), "mean", "models"),
            "tau_loss": Curve(table(records, "test_l"), "mean", "models"),
        }

    def memorized_share(self, records: list[dict]) -> list[dict]:
        """``gen_mem_share`` (near-copies: Hamming distances d1/d2 < 1/3 to the own split's distinct sequences, exact
        copies included) pooled over models, with the Wilson 95% interval over the ``n_samples x models`` generated
        sequences; runs recorded before ``gen_mem_share`` existed fall back to exact copies (``gen_copy_share``)."""
        key = "gen_mem_share" if all("gen_mem_share" in r for r in records) else "gen_copy_share"
        out = []
        for r in records:
            total = self.cfg.n_samples * len(r[key])
            copies = round(sum(r[key]) * self.cfg.n_samples)
            out.append({"step": r["step"], "share": copies / total, "ci": wilson(copies, total), "key": key})
        return out

    def summarize(self, records, data, ref: Reference, judged) -> dict:
        last = records[-1]
        return {"coarse_to_fine": coarse_to_fine(records, self.cfg, self.seeds), "bp_reference": {
            "kl_bp_along_t": ref.kl_bp, "kl_t_steps": ref.kl_steps, "test_ce": _loss_terms(None, ref.test_l)["l"],
            "loss_t_step": int(ref.test_lt.t[0]), "test_ce_at_t": _loss_terms(None, ref.test_lt)["l"],
            "uturn_steps": ref.uturn_steps,
            "uturn_overlap_bp_test": torch.stack(ref.uturn_bp)[:, :, ref.uturn_own:].mean((0, 2)).tolist()},
            "nn_histograms": {"distance": list(range(2 ** self.cfg.depth + 1)), "test_per_split": [nn_histogram(d, 2 ** self.cfg.depth).tolist() for d in ref.test_nn_dist]},
            "uturn_random": {"steps": ref.random_uturn_steps, **ref.random_uturn,
                             "model_last_checkpoint": {"mean": last["uturn_random"], "sem": last["uturn_random_sem"]}}}

    def plot(self, run: Path, records, summary, data: Data) -> None:
        figures.plot_all(run, records, summary)

    def terminal_lines(self, summary: dict) -> list[str]:
        c2f = summary["coarse_to_fine"]
        return [f"tau_nn (D_NN minimum) = step {summary['tau_nn']['step']}; tau_oracle (closest to exact BP) = "
                f"step {summary['tau_oracle']['step']}",
                f"closest to BP_k at steps {c2f['oracle_kl_argmin_step']} for k = 0..{len(c2f['oracle_kl_argmin_step']) - 1}"
                f" ({'coarse-to-fine' if c2f['ordered'] else 'not ordered coarse-to-fine'})"]


def hierarchy(out: str | Path, preset: str | None = "cpu", config: str | Path | None = None, *,
              resume: bool = False, force: bool = False, progress: bool = True, **settings) -> dict:
    """Python API of ``biasgen hierarchy``: resolve the config, run, and return ``summary.json`` as a dict."""
    return run_experiment(HierarchyExperiment.from_settings(preset, config, **settings), out, resume=resume,
                          force=force, progress=progress)


def make_reference(data: Data, cfg: HierarchyConfig, seeds: SeedPlan) -> Reference:
    """Noise the evaluation inputs once and run the exact (BP) and empirical denoisers on them."""
    g, q, L, schedule = data.extra["grammar"], cfg.q, 2 ** cfg.depth, NoiseSchedule.onehot(cfg.T)
    every_k = cfg.depth + 1

    def frozen(x0: torch.Tensor, t: int | None, seed: int, levels: int) -> Frozen:
        x_t, tt = noised_inputs(x0, q, schedule, t, seed)
        bp = bp_predictions(g, schedule, x_t, tt, levels) if levels else torch.zeros((0, *x_t.shape), dtype=x_t.dtype)
        return Frozen(x0, x_t, tt, bp)

    t_c, t_l = steps_of([cfg.t_frac, cfg.loss_t_frac], cfg.T)
    kl_steps = steps_of(cfg.kl_t_fracs, cfg.T)
    kl_test = [frozen(data.test[: cfg.n_eval], t, seeds.evaluation("kl_along_t"), every_k) for t in kl_steps]
    uturn_steps = steps_of(cfg.uturn_fracs, cfg.T)
    uturn_inputs = [torch.cat([s[: cfg.n_uturn], data.test[: cfg.n_uturn]]) for s in data.train]
    random_uturn_steps = steps_of(cfg.random_uturn_fracs, cfg.T)
    exact = {f"bp_{k}": bp_denoise_fn(g, schedule, k) for k in range(every_k)}
    empirical = {f"empirical_split_{i}": empirical_denoise_fn(s, q, schedule) for i, s in enumerate(data.train)}
    splits = list(enumerate(data.train))
    return Reference(
        grammar=g, train=data.train, test=data.test,
        test_c=frozen(data.test[: cfg.n_eval], t_c, seeds.evaluation("critical_test"), every_k),
        train_c=[frozen(s[: cfg.n_eval], t_c, seeds.evaluation("critical_train", i), 0) for i, s in splits],
        test_l=frozen(data.test[: cfg.n_loss], None, seeds.evaluation("loss_test"), 1),
        train_l=[frozen(s[: cfg.n_loss], None, seeds.evaluation("loss_train", i), 1) for i, s in splits],
        test_lt=frozen(data.test[: cfg.n_loss], t_l, seeds.evaluation("loss_at_t_test"), 1),
        train_lt=[frozen(s[: cfg.n_loss], t_l, seeds.evaluation("loss_at_t_train", i), 1) for i, s in splits],
        kl_test=kl_test,
        kl_train=[[frozen(s[: cfg.n_eval], t, seeds.evaluation("kl_along_t_train", i), every_k) for t in kl_steps]
                  for i, s in splits],
        kl_steps=kl_steps,
        kl_bp=[oracle_kl_along_t([f.bp[:1] for f in kl_test], [f.bp[k] for f in kl_test])[0] for k in range(every_k)],
        test_nn_dist=[nearest_hamming(data.test, s) for s in data.train],
        uturn_steps=uturn_steps, uturn_own=min(cfg.n_uturn, cfg.n), uturn_inputs=uturn_inputs,
        uturn_bp=[uturn_overlap(exact["bp_0"], x, q, uturn_steps, schedule, cfg.uturn_reps, seeds.evaluation("uturn"))
                  for x in uturn_inputs],
        random_uturn_steps=random_uturn_steps,
        random_uturn=uturn_random(exact | empirical, cfg.n_random_uturn, L, q, random_uturn_steps, schedule,
                                  cfg.uturn_reps, seeds.evaluation("uturn_random")),
    )


def evaluate_checkpoint(models, members, ref: Reference, cfg: HierarchyConfig, seeds: SeedPlan) -> tuple[dict, dict]:
    """Every hierarchical diagnostic (docs/method.md §7) for one checkpoint of all models.

    ``models``: networks predicting x0 logits; ``members[m] = (split, seed)``. Divergences and losses
    are in nats per sequence (summed over the ``2**depth`` positions). The exact (BP) side comes
    precomputed in ``ref``: a checkpoint costs only the models' forward passes. Returns the metrics
    record and ``{"samples": LongTensor (M, n_samples, 2**depth)}``, the generated sequences.
    """
    q, L, schedule = cfg.q, 2 ** cfg.depth, NoiseSchedule.onehot(cfg.T)
    dens = [as_denoiser(m) for m in models]
    splits = [s for s, _ in members]
    twins, controls = model_pairs(members)
    rec: dict = {}

    # twin disagreement at t_c on test inputs, on both twins' training inputs, and for same-split controls
    pred_test = [d(ref.test_c.x_t, ref.test_c.t) for d in dens]
    pred_train = [[d(f.x_t, f.t) for f in ref.train_c] for d in dens]
    rec["skl_test_pairs"] = [symmetric_kl(pred_test[a], pred_test[b]) for a, b in twins]
    rec["skl_train_pairs"] = [0.5 * sum(symmetric_kl(pred_train[a][s], pred_train[b][s]) for s in (splits[a], splits[b]))
                              for a, b in twins]
    rec["skl_control_pairs"] = [symmetric_kl(pred_test[a], pred_test[b]) for a, b in controls]

    # sequential learning: KL(BP_k || model) for every k at t_c, and along t on test and own training inputs
    rec["oracle_kl"] = [oracle_kl(ref.test_c.bp, p) for p in pred_test]  # (M, depth + 1)
    rec["oracle_kl_along_t_test"] = [_kl_along_t(d, ref.kl_test) for d in dens]  # (M, depth + 1, len(kl_steps))
    rec["oracle_kl_along_t_train"] = [_kl_along_t(d, ref.kl_train[s]) for d, s in zip(dens, splits)]
    rec["kl_along_t"] = [curves[0] for curves in rec["oracle_kl_along_t_test"]]  # k = 0 alone, (M, len(kl_steps))

    # cross-entropy l = l* + l~ on test and on each model's own split: frozen random t, then all at loss_t_frac
    for suffix, test, train in (("", ref.test_l, ref.train_l), ("_at_t", ref.test_lt, ref.train_lt)):
        test_terms = [_loss_terms(d, test) for d in dens]
        train_terms = [_loss_terms(d, train[s]) for d, s in zip(dens, splits)]
        for key in ("l", "l_star", "l_tilde"):
            rec[f"test_{key}{suffix}"] = [r[key] for r in test_terms]
            rec[f"train_{key}{suffix}"] = [r[key] for r in train_terms]

    # generation from shared noise: D_NN and its histogram, grammaticality, exact log-probability
    gen = [sample_sequences(d, L, q, seeds.sample_seeds(cfg.n_samples), schedule, cfg.sampler,
                            cfg.sample_steps, eta=cfg.eta, batch_size=1024) for d in dens]
    two = [nearest_two_hamming(x, ref.train[s]) for x, s in zip(gen, splits)]  # (N, 2) per model: d1, d2
    nearest = [d[:, 0] for d in two]
    rec["d_nn"] = [distance_divergence(d, ref.test_nn_dist[s], L) for d, s in zip(nearest, splits)]
    rec["gen_nn_hist"] = [nn_histogram(d, L).tolist() for d in nearest]  # (M, L + 1); the test one: in the summary
    rec["gen_nn_mean"] = [float(d.double().mean()) for d in nearest]
    rec["gen_copy_share"] = [float((d == 0).double().mean()) for d in nearest]
    rec["gen_mem_share"] = [float(is_near_copy(d).double().mean()) for d in two]
    logp = [ref.grammar.log_prob(x) for x in gen]
    rec["gen_grammatical"] = [float(lp.isfinite().double().mean()) for lp in logp]
    rec["gen_logprob"] = [float(lp[lp.isfinite()].mean()) if lp.isfinite().any() else None for lp in logp]

    # U-turns: per-sequence overlap ratio model / BP (mean, SEM) on the model's own training vs test sequences
    n = ref.uturn_own
    for key in ("uturn_ratio_train", "uturn_ratio_train_sem", "uturn_ratio_test", "uturn_ratio_test_sem"):
        rec[key] = []
    for d, s in zip(dens, splits):
        model = uturn_overlap(d, ref.uturn_inputs[s], q, ref.uturn_steps, schedule, cfg.uturn_reps, seeds.evaluation("uturn"))
        for side, cols in (("train", slice(None, n)), ("test", slice(n, None))):
            ratio = uturn_ratio(model[:, cols], ref.uturn_bp[s][:, cols])
            rec[f"uturn_ratio_{side}"].append(ratio["mean"])
            rec[f"uturn_ratio_{side}_sem"].append(ratio["sem"])

    # U-turns of uniformly random sequences (the same sequences and noise as the reference's BP and empirical ones)
    rand = [uturn_random({"model": d}, cfg.n_random_uturn, L, q, ref.random_uturn_steps, schedule, cfg.uturn_reps,
                         seeds.evaluation("uturn_random"))["model"] for d in dens]
    rec["uturn_random"] = [r["mean"] for r in rand]  # (M, len(random_uturn_steps))
    rec["uturn_random_sem"] = [r["sem"] for r in rand]
    return rec, {"samples": torch.stack(gen)}


def _kl_along_t(den, inputs: list[Frozen]) -> list[list[float]]:
    """``KL(BP_k || den)`` for every k at each step of ``inputs`` (one :class:`Frozen` per step): ``(K, len(inputs))``."""
    return oracle_kl_along_t([f.bp for f in inputs], [den(f.x_t, f.t) for f in inputs])


def _loss_terms(den, inputs: Frozen) -> dict:
    """``l = l* + l~`` of the denoiser ``den`` on ``inputs`` (``None``: of BP_0 itself, the floor of ``l``)."""
    pred = inputs.bp[0] if den is None else den(inputs.x_t, inputs.t)
    return loss_terms(pred, inputs.bp[0], inputs.x0)


def coarse_to_fine(records: list[dict], cfg: HierarchyConfig, seeds: SeedPlan) -> dict:
    """The checkpoint where the model is closest to each BP_k, and whether they come coarse (large k) first."""
    from ..onset import checkpoint_minimum

    steps = [r["step"] for r in records]
    by_k = [checkpoint_minimum(steps, table(records, "oracle_kl", k), n_boot=cfg.n_boot, seed=seeds.bootstrap(),
                               reduce="mean") for k in range(cfg.depth + 1)]
    argmins = [m["step"] for m in by_k]
    return {
        "oracle_kl_argmin_step": argmins,  # per k = 0..depth
        "oracle_kl_argmin_ci": [m["ci"] for m in by_k],
        "ordered": all(a >= b for a, b in zip(argmins, argmins[1:])) and argmins[-1] < argmins[0],
        "rule": "coarse-to-fine when the model is closest to BP_k at non-increasing steps as k grows, "
                "and strictly earlier for k = depth than for k = 0",
    }
