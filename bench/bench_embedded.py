"""Quality and speed of the embedded base model, measured by the toy-world judge.

    python bench/bench_embedded.py [--per-prompt 2] [--steps 20] [--guidance 5] [--model DIR] [--prompts N --seed S]
    python bench/bench_embedded.py --codec [--model DIR]     # the VAE's ceiling: judge its reconstructions

For every shape × colour prompt ("a red star"), samples ``--per-prompt`` images with DPM-Solver++ and asks
the judge whether it shows the prompted shape, colour, and both. Also times one 64 px image (batch 1).
``--codec`` instead judges 256 fresh toy-world scenes after a VAE encode -> decode round trip: no sample can be
judged better than the codec lets it be.
"""
from __future__ import annotations

import argparse
import time

import torch

from sdtune.models import load
from sdtune.sample import SampleRequest, generate
from sdtune.toy import judge as J
from sdtune.toy import world as tw


@torch.no_grad()
def vae_roundtrip(vae, scenes: list) -> tuple[list, float]:
    """Renders of ``scenes`` after an encode (posterior mean) -> decode round trip, and the mean absolute error
    in [−1, 1]."""
    from PIL import Image

    x = torch.from_numpy(tw.to_array([tw.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    arr = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr], float((rec - x).abs().mean())


def codec_ceiling(model, judge, n: int = 256, seed: int = 777) -> None:
    scenes = [s for s, _ in tw.base_dataset(n, seed)]
    images, error = vae_roundtrip(model.pipeline.vae, scenes)
    v = J.judge(judge, images)
    shape = sum(x.shape == s.shape for x, s in zip(v, scenes)) / n
    colour = sum(x.colour == s.colour for x, s in zip(v, scenes)) / n
    both = sum(x.shape == s.shape and x.colour == s.colour for x, s in zip(v, scenes)) / n
    print(f"| VAE round trip of {n} scenes | shape {shape:.1%} | colour {colour:.1%} | shape+colour {both:.1%} | "
          f"mean abs error {error:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=64, help="a seeded random subset of the 64 shape × colour prompts")
    p.add_argument("--seed", type=int, default=1000, help="sampling seed of the first image of each prompt")
    p.add_argument("--codec", action="store_true", help="judge VAE reconstructions of fresh scenes instead")
    a = p.parse_args()
    model = load(a.model)
    judge = J.load()
    if a.codec:
        codec_ceiling(model, judge)
        return
    pairs = [(s, c) for s in tw.SHAPES for c in tw.COLOURS]
    if a.prompts < len(pairs):
        import numpy as np

        pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))[:a.prompts]]
    prompts = [f"a {c} {s}" for s, c in pairs]
    t0 = time.perf_counter()
    samples = generate(model, SampleRequest(prompts, seed=a.seed, steps=a.steps, guidance=a.guidance,
                                            count=a.per_prompt), progress=True)
    wall = time.perf_counter() - t0
    verdicts = J.judge(judge, [s.image for s in samples])
    expected = [pc for pc in pairs for _ in range(a.per_prompt)]
    shape = sum(v.shape == e[0] for v, e in zip(verdicts, expected)) / len(samples)
    colour = sum(v.colour == e[1] for v, e in zip(verdicts, expected)) / len(samples)
    both = sum(v.shape == e[0] and v.colour == e[1] for v, e in zip(verdicts, expected)) / len(samples)
    times = []
    for i in range(5):
        t = time.perf_counter()
        generate(model, SampleRequest(["a red star"], seed=i, steps=a.steps, guidance=a.guidance), progress=False)
        times.append(time.perf_counter() - t)
    times.sort()
    print("| samples | sampler | steps | guidance | shape | colour | shape+colour | s/image (batch 1, median of 5) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {len(samples)} ({len(prompts)} prompts × {a.per_prompt}) | DPM-Solver++ | {a.steps} | {a.guidance} | "
          f"{shape:.1%} | {colour:.1%} | {both:.1%} | {times[2]:.3f} |")
    print(f"(batched generation wall time {wall:.1f} s, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
