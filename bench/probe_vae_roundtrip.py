"""Can the embedded model's VAE carry each held-apart object? (bench/RESULTS.md, four concepts)

    PYTHONPATH=. python bench/probe_vae_roundtrip.py

Encodes and decodes 32 toy-world renders of each object (seeded) and prints the share the judge still names.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from sdtune import judge as J
from sdtune import toyworld as tw
from sdtune.models import load


@torch.no_grad()
def main(n: int = 32) -> None:
    judge, vae = J.load(), load().pipeline.vae
    for obj in tw.OBJECTS:
        rng = random.Random(1)
        x = torch.tensor(np.stack([np.asarray(tw.render(tw.random_scene(rng, obj=obj))) for _ in range(n)]))
        y = vae.decode(vae.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean).sample
        images = [Image.fromarray(((t.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for t in y]
        seen = sum(v.object == obj for v in J.judge(judge, images))
        print(f"{obj}: judged present after the VAE round trip in {seen} of {n}")


if __name__ == "__main__":
    main()
