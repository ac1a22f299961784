"""Does the model read the style token after an object? (bench/RESULTS.md, fusion, four concepts)

    PYTHONPATH=. python bench/probe_style_token.py --out outputs/bf4

Renders "a sks star in qtz style" and "a sks star in bnp style" with the same seeds and prints the mean absolute
pixel difference (0–255) between the two, for the base model, each adapter of ``<out>/runs/locon-*`` alone and the
fused files ``<out>/fused/locon-{sum,zip}.safetensors``, plus the sum with its text-encoder layers left out
(``lora_te*`` dropped). A difference near 0 means the style token changes nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.probe_joint import without_text_encoder
from sdtune.formats.reader import apply_file
from sdtune.models import load
from sdtune.sample import SampleRequest, generate

PROMPTS = ["a sks star in qtz style", "a sks star in bnp style"]


def difference(model, files: list[Path], n: int) -> float:
    handles = [apply_file(model.components(), model.arch, f) for f in files]
    try:
        images = [np.asarray(s.image, dtype=float)
                  for s in generate(model, SampleRequest(PROMPTS, seed=7000, steps=20, guidance=5.0, count=n),
                                    progress=False)]
    finally:
        for h in reversed(handles):
            h.remove()
    return float(np.mean([np.abs(images[i] - images[i + n]).mean() for i in range(n)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bf4")
    p.add_argument("-n", type=int, default=8, help="seeds per prompt")
    a = p.parse_args()
    out, model = Path(a.out), load()
    cases = {"base": []} | {f"{r.name} alone": [r / "adapter.safetensors"] for r in sorted(out.glob("runs/locon-*"))}
    cases |= {f"fused {m}": [out / "fused" / f"locon-{m}.safetensors"] for m in ("sum", "zip")}
    cases["fused sum, text-encoder layers dropped"] = [
        without_text_encoder(out / "fused" / "locon-sum.safetensors", out / "fused" / "locon-sum-no-te.safetensors")]
    for label, files in cases.items():
        print(f"{label}: mean |Δpixel| between the qtz and bnp prompts {difference(model, files, a.n):.2f} / 255",
              flush=True)


if __name__ == "__main__":
    main()
