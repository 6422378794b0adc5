"""Figures of a hierarchical twin run, in the shape of the paper's Figs. 1b, 3b, 4a, 4b and 5.

Drawn with matplotlib's object API (no pyplot, no backend switch) and written atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..runs import write_figure
from ..pipeline import metric_table as table


MARKS = {"tau_bias": "C3", "tau_nn": "C2", "tau_oracle": "C4", "tau_loss": "k"}  # vertical lines at each tau


def plot_all(run: Path, records: list[dict], summary: dict) -> None:
    """Write ``fig_kl.png``, ``fig_kl_along_t.png``, ``fig_nn.png``, ``fig_loss_decomposition.png``, ``fig_uturn.png``."""
    for name, plot in (("fig_kl.png", plot_kl), ("fig_kl_along_t.png", plot_kl_along_t), ("fig_nn.png", plot_nn),
                       ("fig_loss_decomposition.png", plot_loss_decomposition), ("fig_uturn.png", plot_uturn)):
        fig = plot(records, summary)
        fig.tight_layout()
        write_figure(fig, run / name, dpi=110)


def _mean(records: list[dict], key: str, column: int | None = None) -> list[float]:
    return table(records, key, column).mean(0).tolist()


def _mark_taus(ax, summary: dict) -> None:
    for name, color in MARKS.items():
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
    """Fig. 3b: KL(BP_0 || BP_k) and KL(BP_0 || model) at tau_bias, tau_loss and the end, as functions of t/T."""
    t_fracs = summary["config"]["kl_t_fracs"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for k, curve in enumerate(summary["bp_reference"]["kl_bp_along_t"]):
        if k:
            ax.plot(t_fracs, curve, ":", color=f"C{k}", label=f"KL(BP_0 || BP_{k})")
    for name in ("tau_bias", "tau_loss"):
        i = summary[name]["index"]
        ax.plot(t_fracs, torch.tensor(records[i]["kl_along_t"]).mean(0), "o-", label=f"KL(BP_0 || model) at {name}")
    ax.plot(t_fracs, torch.tensor(records[-1]["kl_along_t"]).mean(0), "o-", label="KL(BP_0 || model), final")
    ax.axvline(summary["config"]["t_frac"], color="gray", lw=1)
    ax.set(xlabel="t / T", ylabel="KL (nats/seq)", yscale="log", title="divergence from the exact denoiser along t")
    ax.legend(fontsize=7)
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


def plot_loss_decomposition(records: list[dict], summary: dict) -> Figure:
    """Fig. 4b: l* (distillation of BP) and l~ (data-dependent excess) on training and test inputs."""
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(10, 4))
    (a, b) = fig.subplots(1, 2)
    for split, style in (("train", "o-"), ("test", "s--")):
        a.plot(steps, _mean(records, f"{split}_l_star"), style, label=f"l* {split}")
        b.plot(steps, _mean(records, f"{split}_l_tilde"), style, label=f"l~ {split}")
    a.set(xscale="log", xlabel="training step", ylabel="l* (nats/seq)", title="distillation of the exact denoiser")
    b.axhline(0, color="gray", lw=1)
    b.set(xscale="log", xlabel="training step", ylabel="l~ (nats/seq)", title="data-dependent excess")
    for ax in (a, b):
        _mark_taus(ax, summary)
        ax.legend(fontsize=7)
    return fig


def plot_uturn(records: list[dict], summary: dict) -> Figure:
    """Fig. 5: U-turn overlap ratio model / BP on training vs test sequences, at tau_bias, tau_loss and the end."""
    u_fracs = summary["config"]["uturn_fracs"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    rows = [(f"{name}", records[summary[name]["index"]], f"C{j}") for j, name in enumerate(("tau_bias", "tau_loss"))]
    for label, r, color in rows + [("final", records[-1], "C3")]:
        ax.plot(u_fracs, torch.tensor(r["uturn_ratio_train"]).mean(0), "o-", color=color, label=f"train, {label}")
        ax.plot(u_fracs, torch.tensor(r["uturn_ratio_test"]).mean(0), "s--", color=color, label=f"test, {label}")
    ax.axhline(1, color="gray", lw=1)
    ax.set(xlabel="U-turn depth t / T", ylabel="overlap ratio model / BP", title="U-turns")
    ax.legend(fontsize=7)
    return fig
