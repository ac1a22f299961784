"""Preview samples of a run's adapters at several strengths (``output.sample_strengths``).

Strength s scales the adapter as A1111's ``<lora:name:s>`` does: the adapters are written to a temporary A1111
file (fp32) and sampled through ``sample.generate`` with that file at each strength, on the plain base layers.
Block weights (``output.preview_blocks``) take the same path, as ``sdtune sample --blocks`` applies them to a file.
Strength 1 alone without block weights samples the live adapters directly (no file).
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch


def samples_at_strengths(model, injection, request, strengths: list[float], blocks: str | None = None) -> list:
    """Samples of ``request`` for each strength, ordered prompt by prompt: prompt 0 at every strength (``count``
    images each), then prompt 1, … — one grid row per (prompt, strength). ``blocks``: block weights
    (``sdtune.blocks`` notation) applied at every strength."""
    from ..formats.kohya import save_kohya
    from ..inject import plain_layers
    from ..sample import generate

    if list(strengths) == [1.0] and blocks is None:
        return generate(model, request, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "preview.safetensors"
        save_kohya(injection, file, dtype=torch.float32, verify=False)
        with plain_layers(model.components()):
            runs = [generate(model, replace(request, adapters=[(str(file), s)], blocks=[blocks]), progress=False)
                    for s in strengths]
    n = request.count
    return [run[i * n + j] for i in range(len(request.prompts)) for run in runs for j in range(n)]
