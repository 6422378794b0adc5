"""biasgen: find when a diffusion model starts leaning on its training data."""

__version__ = "0.1.0"
