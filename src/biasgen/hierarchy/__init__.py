"""The hierarchical lab: a random grammar with an exact denoiser (docs/method.md §5–§6).

    from biasgen.hierarchy import Grammar, exact_denoiser
    g = Grammar.random(q=6, depth=4, q_eff=4, sigma=1.0, seed=0)
    x0 = g.sample(10**6, k=0, seed=1)              # LongTensor (10**6, 16)
    post = exact_denoiser(g, x_t, abar, k=0)       # (B, 16, 6) = E[one_hot(x0) | x_t]
"""
from .bp import exact_denoiser, exact_eps, exact_log_posterior, exact_score, leaf_log_evidence, log_evidence
from .grammar import Grammar, load_pool, save_pool
from .denoisers import bp_denoise_fn, empirical_denoise_fn, empirical_denoiser, sample_bp, sample_empirical, sample_sequences

__all__ = [
    "Grammar",
    "bp_denoise_fn",
    "empirical_denoise_fn",
    "empirical_denoiser",
    "exact_denoiser",
    "exact_eps",
    "exact_log_posterior",
    "exact_score",
    "leaf_log_evidence",
    "load_pool",
    "log_evidence",
    "sample_bp",
    "sample_empirical",
    "sample_sequences",
    "save_pool",
]
