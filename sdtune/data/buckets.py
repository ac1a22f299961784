"""Aspect-ratio buckets: a table of (width, height) shapes of about the training area, and where each image goes.

Sides are multiples of ``models.model_multiple`` = VAE scale factor × 2^(U-Net downsamplers): the latent must halve
cleanly at every U-Net level (SD 1.x: 8 × 2³ = 64; the embedded tiny-sd: 4 × 2² = 16). The table follows
kohya's ``make_buckets``: for every width w from ``min_side`` to ``max_side`` in ``step``,
h = min(max_side, ⌊R² / w / step⌋ · step), kept when h ≥ min_side and max(w/h, h/w) ≤ ``max_aspect``; the
square R × R is always in it.

``place`` puts an image of size (W, H) into the bucket whose aspect is nearest in log space, among those it
covers without upscaling (unless allowed); the resize factor s = max(bw/W, bh/H) makes the image cover the
bucket with one side exact, so the crop removes only the other side's excess: the least crop for that bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class TooSmall(ValueError):
    """No bucket fits the image without upscaling; the message says which would and how to allow it."""


def make_buckets(resolution: int, multiple: int, *, min_side: int | None = None, max_side: int | None = None,
                 max_aspect: float = 2.0, step: int | None = None) -> list[tuple[int, int]]:
    """Bucket shapes (w, h), sorted, all sides multiples of ``multiple``, areas ≤ ``resolution``² (see module doc).
    Defaults: min_side = resolution / 2, max_side = 2 · resolution, step = multiple (all rounded to it)."""
    step = step or multiple
    if step % multiple:
        raise ValueError(f"bucket step {step} is not a multiple of {multiple} (the model's side multiple)")
    square = max(multiple, resolution // multiple * multiple)
    lo = max(multiple, (min_side or resolution // 2) // multiple * multiple)
    hi = max(square, (max_side or 2 * resolution) // multiple * multiple)
    area = square * square
    out = {(square, square)}
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo and max(w / h, h / w) <= max_aspect + 1e-9:
            out |= {(w, h), (h, w)}
    return sorted(out)


@dataclass(frozen=True)
class Placement:
    """Where an image of ``size`` goes: ``bucket`` (w, h), and ``resized`` (w, h) ≥ bucket before the crop."""

    size: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]

    def crop(self, rng: np.random.Generator | None) -> tuple[int, int]:
        """(left, top) of the bucket window in the resized image: centred, or uniform when ``rng`` is given."""
        (rw, rh), (bw, bh) = self.resized, self.bucket
        if rng is None:
            return (rw - bw) // 2, (rh - bh) // 2
        return int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))


def _resized(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    (w, h), (bw, bh) = size, bucket
    s = max(bw / w, bh / h)
    return max(bw, round(w * s)), max(bh, round(h * s))


def place(size: tuple[int, int], buckets: list[tuple[int, int]], *, upscale: bool = False) -> Placement:
    """The bucket of an image of ``size`` (w, h): nearest aspect (|log(w/h) − log(bw/bh)|), then the largest;
    without ``upscale`` only buckets the image covers (bw ≤ w and bh ≤ h). Raises TooSmall if none fits."""
    w, h = size
    fits = [b for b in buckets if upscale or (b[0] <= w and b[1] <= h)]
    if not fits:
        best = min(buckets, key=lambda b: (abs(math.log(w / h) - math.log(b[0] / b[1])), -b[0] * b[1]))
        raise TooSmall(f"nearest bucket {best[0]}×{best[1]}; lower data.resolution, set data.bucket_upscale = "
                       f"true, or remove the image")
    bucket = min(fits, key=lambda b: (abs(math.log(w / h) - math.log(b[0] / b[1])), -b[0] * b[1]))
    return Placement(size, bucket, _resized(size, bucket))


def table(placements: dict[str, Placement], samples: int | None = None) -> str:
    """The bucket table, one line per bucket: 'w×h (aspect): n image(s)', most used first, then the names.
    ``samples``: samples per epoch (images × repeats), said in the heading."""
    by: dict[tuple[int, int], list[str]] = {}
    for name, p in placements.items():
        by.setdefault(p.bucket, []).append(name)
    per_epoch = f", {samples} samples per epoch with repeats," if samples is not None else ""
    lines = [f"{len(placements)} image(s){per_epoch} in {len(by)} bucket(s):"]
    for (bw, bh), names in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"  {bw}×{bh} ({bw / bh:.2f}): {len(names)}  " + ", ".join(sorted(names)[:8])
                     + (" …" if len(names) > 8 else ""))
    return "\n".join(lines)
