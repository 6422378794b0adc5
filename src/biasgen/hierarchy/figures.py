"""Figures of a hierarchical twin run, in the shape of the paper's Figs. 1b, 3b, 4a, 4b and 5 and appendix Fig. 11.

Drawn with matplotlib's object API (no pyplot, no backend switch) and written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..runs import write_figure
from ..pipeline import metric_table as table


MARKS = {"tau_bias": "C3", "tau_data": "C1", "tau_nn": "C2", "tau_oracle": "C4", "tau_loss": "k"}  # vertical lines at each tau


def plot_all(run: Path, records: list[dict], summary: dict) -> None:
    """Write ``fig_kl.png``, ``fig_kl_along_t.png``, ``fig_nn.png``, ``fig_nn_histograms.png``,
    ``fig_loss_decomposition.png``, ``fig_uturn.png`` and ``fig_uturn_random.png``."""
    for name, plot in (("fig_kl.png", plot_kl), ("fig_kl_along_t.png", plot_kl_along_t), ("fig_nn.png", plot_nn),
                       ("fig_nn_histograms.png", plot_nn_histograms),
                       ("fig_loss_decomposition.png", plot_loss_decomposition), ("fig_uturn.png", plot_uturn),
                       ("fig_uturn_random.png", plot_uturn_random)):
        fig = plot(records, summary)
        fig.tight_layout()
        write_figure(fig, run / name, dpi=110)


def _mean(records: list[dict], key: str, column: int | None = None) -> list[float]:
    return table(records, key, column).mean(0).tolist()


def _array(values) -> torch.Tensor:
    """Nested lists of numbers (``None`` where undefined) as a float64 tensor with NaN for ``None``."""
    if isinstance(values, list):
        return torch.stack([_array(v) for v in values]) if values else torch.zeros(0, dtype=torch.float64)
    return torch.tensor(math.nan if values is None else float(values), dtype=torch.float64)


def _mean_and_error(means, sems, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over models (axis ``dim``) of per-model means, e.g. ``(M, S)``, and its standard error from the
    per-model SEMs of the same shape (independent models: ``sqrt(sum sem^2) / M``)."""
    m, e = _array(means), _array(sems)
    return m.mean(dim), e.pow(2).sum(dim).sqrt() / e.shape[dim]


def _moments(records: list[dict], summary: dict, first: bool = False) -> list[tuple[str, int]]:
    """``(label, record index)`` of the first checkpoint (with ``first``), tau_bias, tau_loss and the last
    checkpoint, one entry per distinct checkpoint, in training order."""
    picks = [("first", 0)] * first + [(n, summary[n]["index"]) for n in ("tau_bias", "tau_loss")] + [("last", len(records) - 1)]
    labels: dict[int, str] = {}
    for label, i in picks:
        labels[i] = f"{labels[i]} = {label}" if i in labels else label
    return [(f"{label}, step {records[i]['step']}", i) for i, label in sorted(labels.items())]


def _mark_taus(ax, summary: dict) -> None:
    for name, color in MARKS.items():
        if summary.get(name):  # tau_data only with same-split controls
            ax.axvline(summary[name]["step"], color=color, ls="--", lw=1, label=name)


def plot_kl(records: list[dict], summary: dict) -> Figure:
    """Fig. 1b: sample-split KL (twins, training inputs, controls) and KL(BP_k || model) vs training time."""
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(11, 4))
    (a, b) = fig.subplots(1, 2)
    a.plot(steps, table(records, "skl_test_pairs").median(0).values, "o-", label="twins, test inputs")
    a.plot(steps, table(records, "skl_train_pairs").median(0).values, "s-", label="twins, training inputs")
    if records[0]["skl_control_pairs"]:
        a.plot(steps, table(records, "skl_control_pairs").median(0).values, "^:", label="same split (control)")
    a.set(xscale="log", xlabel="training step", ylabel="sample-split KL (nats/seq)",
          title=f"twin disagreement at t/T = {summary['config']['t_frac']}")
    for k in range(len(records[0]["oracle_kl"][0])):
        b.plot(steps, _mean(records, "oracle_kl", k), "o-", ms=3, label=f"k = {k}")
    b.set(xscale="log", yscale="log", xlabel="training step", ylabel="KL(BP_k || model) (nats/seq)",
          title="model vs exact k-filtered denoisers")
    for ax in (a, b):
        _mark_taus(ax, summary)
        ax.legend(fontsize=7)
    return fig


def plot_kl_along_t(records: list[dict], summary: dict) -> Figure:
    """Fig. 3b: KL(BP_k || model) for every k along t/T on test (top) and own training inputs (bottom), at tau_bias,
    tau_loss and the last checkpoint; dotted: KL(BP_0 || BP_k) on the test inputs."""
    t_fracs = summary["config"]["kl_t_fracs"]
    moments = _moments(records, summary)
    fig = Figure(figsize=(4 * len(moments), 7))
    axes = fig.subplots(2, len(moments), squeeze=False, sharey=True)
    for col, (label, i) in enumerate(moments):
        for row, side in enumerate(("test", "train")):
            ax = axes[row, col]
            curves = _array(records[i][f"oracle_kl_along_t_{side}"]).mean(0)  # (depth + 1, len(t_fracs))
            for k, curve in enumerate(curves):
                ax.plot(t_fracs, curve.numpy(), "o-", ms=3, color=f"C{k}", label=f"KL(BP_{k} || model)")
            if side == "test":
                for k, curve in enumerate(summary["bp_reference"]["kl_bp_along_t"][1:], start=1):
                    ax.plot(t_fracs, curve, ":", color=f"C{k}", label=f"KL(BP_0 || BP_{k})")
            ax.axvline(summary["config"]["t_frac"], color="gray", lw=1)
            ax.set(xlabel="t / T", ylabel=f"KL, {side} inputs (nats/seq)", yscale="log", title=label)
    axes[0, 0].legend(fontsize=6)
    return fig


def plot_nn(records: list[dict], summary: dict) -> Figure:
    """Fig. 4a: D_NN with the frozen-noise train and test cross-entropies."""
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(steps, table(records, "d_nn").median(0).values, "o-", color="C2", label="D_NN")
    ax.set(xscale="log", xlabel="training step", ylabel="D_NN = KL(P_gen || P_test)")
    ax2 = ax.twinx()
    ax2.plot(steps, _mean(records, "test_l"), "s-", color="C0", label="test CE")
    ax2.plot(steps, _mean(records, "train_l"), "^-", color="C1", label="train CE")
    ax2.set_ylabel("cross-entropy (nats/seq, frozen noise)")
    _mark_taus(ax, summary)
    fig.legend(fontsize=7, loc="upper center", ncol=3)
    return fig


def plot_nn_histograms(records: list[dict], summary: dict) -> Figure:
    """Fig. 4a (appendix Figs. 9, 10): Hamming distance of generated sequences to their nearest training sequence
    (mean over models) beside that of the test sequences (mean over splits), at a few checkpoints."""
    hist = summary["nn_histograms"]
    distance, test = hist["distance"], _array(hist["test_per_split"]).mean(0).numpy()
    moments = _moments(records, summary, first=True)
    fig = Figure(figsize=(3.2 * len(moments), 3.4))
    axes = fig.subplots(1, len(moments), squeeze=False, sharey=True)[0]
    for ax, (label, i) in zip(axes, moments):
        ax.bar(distance, _array(records[i]["gen_nn_hist"]).mean(0).numpy(), width=0.8, color="C2", alpha=0.7, label="generated")
        ax.step(distance, test, where="mid", color="k", label="test")
        ax.set(xlabel="distance to nearest training seq.", title=f"{label}\nD_NN = "
               f"{table(records, 'd_nn')[:, i].median():.2f}")
    axes[0].set_ylabel("share of sequences")
    axes[0].legend(fontsize=7)
    return fig


def plot_loss_decomposition(records: list[dict], summary: dict) -> Figure:
    """Fig. 4b: l* (distillation of BP) and l~ (data-dependent excess) on training and test inputs, averaged over t
    (top) and at t/T = loss_t_frac (bottom, the paper's panel)."""
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    for row, (suffix, when) in enumerate((("", "t averaged"), ("_at_t", f"t/T = {summary['config']['loss_t_frac']}"))):
        a, b = axes[row]
        for split, style in (("train", "o-"), ("test", "s--")):
            a.plot(steps, _mean(records, f"{split}_l_star{suffix}"), style, label=f"l* {split}")
            b.plot(steps, _mean(records, f"{split}_l_tilde{suffix}"), style, label=f"l~ {split}")
        a.set(xscale="log", xlabel="training step", ylabel="l* (nats/seq)", title=f"distillation of the exact denoiser, {when}")
        b.axhline(0, color="gray", lw=1)
        b.set(xscale="log", xlabel="training step", ylabel="l~ (nats/seq)", title=f"data-dependent excess, {when}")
        for ax in (a, b):
            _mark_taus(ax, summary)
            ax.legend(fontsize=7)
    return fig


def plot_uturn(records: list[dict], summary: dict) -> Figure:
    """Fig. 5: U-turn overlap ratio model / BP (mean over sequences, ± standard error) on training vs test
    sequences, at tau_bias, tau_loss and the last checkpoint."""
    u_fracs = summary["config"]["uturn_fracs"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for j, (label, i) in enumerate(_moments(records, summary)):
        for side, style in (("train", "o-"), ("test", "s--")):
            mean, err = _mean_and_error(records[i][f"uturn_ratio_{side}"], records[i][f"uturn_ratio_{side}_sem"])
            ax.errorbar(u_fracs, mean.numpy(), yerr=err.numpy(), fmt=style, color=f"C{j}", capsize=3, label=f"{side}, {label}")
    ax.axhline(1, color="gray", lw=1)
    ax.set(xlabel="U-turn depth t / T", ylabel="overlap ratio model / BP", title="U-turns")
    ax.legend(fontsize=7)
    return fig


def plot_uturn_random(records: list[dict], summary: dict) -> Figure:
    """Appendix Fig. 11: U-turn overlap of uniformly random sequences over training (mean over models ± standard
    error), one panel per depth, beside BP_0..BP_depth and the empirical denoisers of the splits (horizontal)."""
    ref = summary["uturn_random"]
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(5.5 * len(ref["steps"]), 4))
    axes = fig.subplots(1, len(ref["steps"]), squeeze=False, sharey=True)[0]
    exact = sorted((name for name in ref if name.startswith("bp_")), key=lambda name: int(name[3:]))
    empirical = [ref[name]["mean"] for name in ref if name.startswith("empirical_split_")]
    mean, err = _mean_and_error([r["uturn_random"] for r in records], [r["uturn_random_sem"] for r in records], dim=1)
    for j, (ax, frac) in enumerate(zip(axes, summary["config"]["random_uturn_fracs"])):
        ax.errorbar(steps, mean[:, j].numpy(), yerr=err[:, j].numpy(), fmt="o-", color="C0", capsize=3, label="model")
        for k, name in enumerate(exact):
            ax.axhline(ref[name]["mean"][j], color=colormaps["viridis"](k / len(exact)), ls=":", label=name.replace("bp_", "BP_"))
        ax.axhline(_array(empirical)[:, j].mean(), color="k", ls="-.", label="empirical (mean over splits)")
        _mark_taus(ax, summary)
        ax.set(xscale="log", xlabel="training step", title=f"random sequences, t/T = {frac}")
    axes[0].set_ylabel("U-turn overlap")
    axes[0].legend(fontsize=7)
    return fig
