"""Benchmark of the hierarchical lab: exact BP denoiser vs a joint-materialising baseline, and sampling.

    python bench/bench_hierarchy.py                 # default threads; prints a markdown table
    python bench/bench_hierarchy.py --batches 10000 --repeats 2

The baseline below is the common straightforward implementation: log-space BP
that materialises the ``(B, nodes, q, q, q)`` joint of every parent and its two
children at each upward and downward update. Both run side by side on the same
noised inputs (the paper's grammar, q=6, depth=4, float32, abar uniform over
the one-hot schedule) and must agree to 1e-6.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from biasgen.hierarchy import Grammar, exact_denoiser, leaf_log_evidence
from biasgen.schedule import NoiseSchedule


def joint_bp(g: Grammar, x_t: torch.Tensor, abar: torch.Tensor, k: int) -> torch.Tensor:
    """Reference BP: leaf marginals ``(B, n, q)`` materialising ``(B, nodes, q, q, q)`` joints."""
    logM = g.M.log().to(x_t.dtype)  # (a, b, c)
    log_top = g.level_transitions(k).log().to(x_t.dtype)  # (J, r, a)
    psi = leaf_log_evidence(x_t, abar)
    ups = [psi]
    u = psi
    while u.shape[1] > 2**k:
        l, r = u[:, 0::2, None, :, None], u[:, 1::2, None, None, :]
        u = torch.logsumexp(logM + l + r, (-2, -1))
        u = u - u.amax(-1, keepdim=True)
        ups.append(u)
    ups = ups[::-1]
    root_in = torch.logsumexp(log_top + ups[0][:, :, None, :], -1)  # (B, J, r)
    others = root_in.sum(1, keepdim=True) - root_in  # sum over j' != j
    others = torch.where(torch.isnan(others), torch.full_like(others, -math.inf), others)
    down = torch.logsumexp(others[..., None] + log_top, -2)
    for u in ups[1:]:
        d = down[:, :, :, None, None]
        l, r = u[:, 0::2, None, :, None], u[:, 1::2, None, None, :]
        to_left = torch.logsumexp(d + logM + r, (-3, -1))
        to_right = torch.logsumexp(d + logM + l, (-3, -2))
        down = torch.stack([to_left, to_right], 2).flatten(1, 2)
        down = down - down.amax(-1, keepdim=True)
    return torch.softmax(down + ups[-1], -1)


def noised_batch(g: Grammar, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` ``(B, n, q)`` float32 and ``abar`` ``(B,)``: grammar samples noised at uniform steps of the one-hot schedule."""
    schedule = NoiseSchedule.onehot()
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.nn.functional.one_hot(g.sample(B, seed=seed), g.q).float()
    t = torch.randint(1, schedule.T + 1, (B,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    return schedule.add_noise(x0, eps, t), schedule.abar(t)


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pool", type=int, default=1_000_000)
    args = p.parse_args()

    g = Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; grammar q=6 depth=4 q_eff=4 sigma=1 seed=0; float32\n")
    print("| task | batch | k | baseline (seq/s) | biasgen (seq/s) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        x_t, abar = noised_batch(g, B, seed=B)
        for k in args.ks:
            ref, got = joint_bp(g, x_t, abar, k), exact_denoiser(g, x_t, abar, k)
            diff = (ref - got).abs().max().item()
            t_ref = best_time(lambda: joint_bp(g, x_t, abar, k), args.repeats)
            t_new = best_time(lambda: exact_denoiser(g, x_t, abar, k), args.repeats)
            print(f"| exact_denoiser | {B:,} | {k} | {B / t_ref:,.0f} | {B / t_new:,.0f} | {t_ref / t_new:.1f}x | {diff:.1e} |")
    for k in args.ks:
        t = best_time(lambda: g.sample(args.pool, k=k, seed=1), args.repeats)
        print(f"| g.sample | {args.pool:,} | {k} | | {args.pool / t:,.0f} | {t:.2f} s | |")


if __name__ == "__main__":
    main()
