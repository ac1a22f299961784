"""Prior preservation's class images: the class prompt's alternatives, how many images to draw at each bucket's
shape, and the cache of images the base model generates on first use (``ensure_class_images``)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..atomic import atomic_path, write_text
from .buckets import place
from .intake import probe
from .scan import DataError, Example


def class_prompts(prompt: str) -> list[str]:
    """The alternatives of a class prompt: ``"a circle | a square"`` -> ["a circle", "a square"]. Several
    alternatives suit styles, whose prior is every subject the style is applied to, not one class."""
    alternatives = [p.strip() for p in prompt.split("|") if p.strip()]
    if not alternatives:
        raise DataError(f"class prompt {prompt!r} is empty")
    return alternatives


def class_image_shapes(instances: list[Example], repeats: list[int], n: int, resolution: int,
                       buckets: list[tuple[int, int]] | None, upscale: bool = False) -> dict[tuple[int, int], int]:
    """How many of ``n`` class images to draw at each instance bucket's shape (w, h): in proportion to the
    bucket's instance samples, at least one per bucket. A class image then shares its instance's bucket, so a
    step is one U-Net call, and the prior is replayed at the shapes the adapter trains at."""
    if not buckets:
        return {(resolution, resolution): n}
    counts: dict[tuple[int, int], int] = {}
    for ex, r in zip(instances, repeats):
        b = place(ex.size or probe(ex.path).size, buckets, upscale=upscale).bucket
        counts[b] = counts.get(b, 0) + r
    total = sum(counts.values())
    return {b: max(1, round(n * c / total)) for b, c in sorted(counts.items())}


def ensure_class_images(model, folder: str | Path, prompt: str, n: int, *, resolution: int, steps: int,
                        guidance: float, seed: int = 0, progress: bool = True,
                        shape: tuple[int, int] | None = None) -> list[Example]:
    """``n`` class images of ``prompt`` in ``folder``, generating the missing ones with the base model.

    ``shape`` (w, h): images of a non-square bucket, named ``class_{w}x{h}_NNNNN.png`` beside the square ones
    (``class_NNNNN.png``, at ``resolution``).

    ``prompt`` may hold k alternatives separated by ``|`` (``class_prompts``): image i shows alternative i mod k
    with seed ``seed + i // k`` (k = 1: seed + i), so a larger ``n`` later extends the cache without redrawing it.
    The prompt and the base model's fingerprint are recorded in ``prompt.txt`` and ``model.txt``: prior
    preservation must replay *this* model's prior, so a cache made for another prompt or by another base model
    is an error, not silently reused. Each image is written to a temp name and renamed, so a killed run never
    leaves a half-written image.
    """
    from ..sample import SampleRequest, generate

    folder = Path(folder)
    alternatives = class_prompts(prompt)
    k = len(alternatives)
    folder.mkdir(parents=True, exist_ok=True)
    # the normalised prompt: "a circle|a square" and "a circle | a square" are one cache
    stamps = {"prompt.txt": ("prompt", " | ".join(alternatives)), "model.txt": ("base model", model.fingerprint())}
    has_images = any(folder.glob("class_*.png"))
    for name, (what, value) in stamps.items():
        found = (folder / name).read_text().strip() if (folder / name).exists() else "unrecorded"
        if has_images and found != value:
            raise DataError(f"class-image cache {folder} was made for {what} {found!r}, not {value!r} ({name}): "
                            f"use another prior.class_dir or delete that folder")
    for name, (_, value) in stamps.items():
        write_text(folder / name, value + "\n")
    square = shape is None or shape == (resolution, resolution)
    width, height = (resolution, resolution) if square else shape

    def path(i: int) -> Path:
        return folder / (f"class_{i:05d}.png" if square else f"class_{width}x{height}_{i:05d}.png")

    missing = [i for i in range(n) if not path(i).exists()]
    if missing:
        from tqdm.auto import tqdm

        print(f"generating {len(missing)} class image(s) of {prompt!r} at {width}×{height} into {folder} "
              f"({n - len(missing)} cached)")
        # runs of images with one prompt and consecutive seeds, ≤ 8 per pipeline call
        runs: list[list[int]] = []
        for i in sorted(missing, key=lambda i: (i % k, i)):
            if runs and runs[-1][-1] == i - k and len(runs[-1]) < 8:
                runs[-1].append(i)
            else:
                runs.append([i])
        bar = tqdm(total=len(missing), desc="class images", unit="img", disable=not progress)
        for run in runs:
            req = SampleRequest(prompts=[alternatives[run[0] % k]], seed=seed + run[0] // k, count=len(run),
                                steps=steps, guidance=guidance, width=width, height=height)
            for i, sample in zip(run, generate(model, req, progress=False)):
                with atomic_path(path(i)) as tmp:
                    sample.image.save(tmp, format="PNG")
            bar.update(len(run))
        bar.close()
    return [Example(str(path(i)), alternatives[i % k]) for i in range(n)]


def class_dir_default(output_dir: str | Path, prompt: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in prompt)[:40]
    return Path(output_dir) / "class_images" / f"{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
