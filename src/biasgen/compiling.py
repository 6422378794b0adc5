"""``torch.compile`` for the evaluation's many small network calls, where it was measured to pay.

The paper's sampler calls each network ``T`` times per checkpoint on a small batch. On this project's 2-core
CPU the compiled default U-Net (fused normalisation and activations, no per-layer Python) runs one call on 48
samples 1.2-1.3 times faster than eager PyTorch; over a whole default audit's evaluation that is 10% with
the compiler's cache already filled by an earlier run and 4% on a machine's first run, where each worker
process compiles once (BENCHMARKS.md). Compiled outputs differ from eager ones by float32 rounding (samples
within 4e-5 after 1000 steps; the same decisions). Few calls do not repay the compilation, and other networks
were not measured, so ``auto`` compiles only biasgen's U-Net, on a CPU, for samplers of at least 200 calls.

    denoiser = compiled(model, example=(x_t, t))   # the model itself when compiling fails
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

COMPILE_SETTINGS = ("auto", "on", "off")
COMPILE_HELP = ("torch.compile the networks for unconditional sampling: auto (biasgen's U-Net on a CPU, for "
                "samplers of at least 200 calls, where it was measured to pay), on, or off")
MIN_SAMPLER_CALLS = 200  # auto: below this many network calls per sample, compiling costs more than it saves


def should_compile(setting: str, device: str, sampler_calls: int, measured_network: bool = True) -> bool:
    """Whether ``setting`` (auto | on | off) compiles for a sampler of ``sampler_calls`` calls per sample on
    ``device``; ``auto`` only for a network it was measured on (``measured_network``)."""
    if setting == "auto":
        return measured_network and torch.device(device).type == "cpu" and sampler_calls >= MIN_SAMPLER_CALLS
    return setting == "on"


_failed_here: set[str] = set()  # network classes whose compilation failed in this process: not tried again


def compiled(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> Callable:
    """``torch.compile(model)``, compiled now on the inputs ``example``; the model itself (with a warning, once per
    process and network class) when compilation fails (no C++ compiler, an unsupported layer), so a run never
    stops for it and does not pay for the failed attempt at every checkpoint."""
    name = type(model).__qualname__
    if name in _failed_here:
        return model
    fast = torch.compile(model)
    try:
        with torch.no_grad():
            fast(*example)
    except Exception as error:  # noqa: BLE001 - any failure of the compiler stack falls back to eager
        _failed_here.add(name)
        warnings.warn(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); sampling with the "
                      "uncompiled network instead (slower; pass --compile off to skip the attempt).", stacklevel=2)
        return model
    return fast
