"""biasgen: find when a diffusion model starts leaning on its training data."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``biasgen.Monitor``, imported on first use so that ``import biasgen`` stays light (no torch, no scipy)."""
    if name == "Monitor":
        from .images.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'biasgen' has no attribute {name!r}")
