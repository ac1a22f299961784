"""sdtune: parameter-efficient fine-tuning for Stable-Diffusion-style models."""

__version__ = "0.1.0"
