"""A tiny training config for tests: attention LoCon r2 at 32 px, 4 steps, on an instance folder."""
from __future__ import annotations

from pathlib import Path

from sdtune.config import TrainConfig, loads_config


def tiny_config(inst: Path, out: Path, *overrides: str) -> TrainConfig:
    """The config, with ``section.key=value`` overrides as ``--set`` takes them."""
    text = f"""
[data]
instance_dir = "{inst}"
resolution = 32
[[adapters]]
preset = "attn"
rank = 2
[optim]
lr_unet = 1e-3
[train]
steps = 4
[output]
dir = "{out}"
"""
    return loads_config(text, list(overrides))
