"""Can the embedded model's VAE carry each held-apart object? (bench/RESULTS.md, four concepts)

    PYTHONPATH=. python bench/probe_vae_roundtrip.py

Encodes and decodes 32 toy-world renders of each object (seeded) and prints the share the judge still names.
"""
from __future__ import annotations

import random

from bench.bench_embedded import vae_roundtrip
from sdtune import judge as J
from sdtune import toyworld as tw
from sdtune.models import load


def main(n: int = 32) -> None:
    judge, vae = J.load(), load().pipeline.vae
    for obj in tw.OBJECTS:
        rng = random.Random(1)
        images, _ = vae_roundtrip(vae, [tw.random_scene(rng, obj=obj) for _ in range(n)])
        seen = sum(v.object == obj for v in J.judge(judge, images))
        print(f"{obj}: judged present after the VAE round trip in {seen} of {n}")


if __name__ == "__main__":
    main()
