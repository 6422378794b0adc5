"""Figures of a hierarchical twin run, in the shape of the paper's Figs. 1b, 3b, 4a, 4b and 5.

Drawn with matplotlib's object API (no pyplot, no backend switch) and written atomically.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..runs import write_figure
from ..pipeline import metric_table as table


def plot_all(run: Path, records: list[dict], summary: dict) -> None:
    """Write ``fig_kl.png``, ``fig_kl_along_t.png``, ``fig_nn.png``, ``fig_loss_decomposition.png``, ``fig_uturn.png``."""
    steps = [r["step"] for r in records]
    mean = lambda key, col=None: table(records, key, col).mean(0).tolist()
    marks = {"tau_bias": "C3", "tau_nn": "C2", "tau_oracle": "C4", "tau_loss": "k"}

    def mark(ax):
        for name, color in marks.items():
            ax.axvline(summary[name]["step"], color=color, ls="--", lw=1, label=name)

    def save(fig, name):
        fig.tight_layout()
        write_figure(fig, run / name, dpi=110)

    # Fig. 1b: sample-split KL and KL(BP_k || model) vs training time
    fig = Figure(figsize=(11, 4))
    (a, b) = fig.subplots(1, 2)
    a.plot(steps, table(records, "skl_test_pairs").median(0).values, "o-", label="twins, test inputs")
    a.plot(steps, table(records, "skl_train_pairs").median(0).values, "s-", label="twins, training inputs")
    if records[0]["skl_control_pairs"]:
        a.plot(steps, table(records, "skl_control_pairs").median(0).values, "^:", label="same block (control)")
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
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(steps, table(records, "d_nn").median(0).values, "o-", color="C2", label="D_NN")
    ax.set(xscale="log", xlabel="training step", ylabel="D_NN = KL(P_gen || P_test)")
    ax2 = ax.twinx()
    ax2.plot(steps, mean("test_l"), "s-", color="C0", label="test CE")
    ax2.plot(steps, mean("train_l"), "^-", color="C1", label="train CE")
    ax2.set_ylabel("cross-entropy (nats/seq, frozen noise)")
    mark(ax)
    fig.legend(fontsize=7, loc="upper center", ncol=3)
    save(fig, "fig_nn.png")

    # Fig. 4b: loss decomposition
    fig = Figure(figsize=(10, 4))
    (a, b) = fig.subplots(1, 2)
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
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
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
