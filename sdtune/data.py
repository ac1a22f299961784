"""DreamBooth data: instance images and captions, guards, class-image generation, latent and text caches.

``scan_instance_dir`` finds and checks the images (missing/empty folder, unreadable or corrupt files, images smaller
than the training resolution: named, and either an error before training or skipped when allowed).
``ensure_class_images`` fills the class-image cache with the base model on first use. ``DreamBoothDataset`` turns
an index into (pixels, caption): resize so the short side is the resolution, crop (center/random), flip. Its
random choices come from a generator seeded by (seed, epoch, index), so a resumed run draws the same crops.
``Encoder`` caches VAE latents (center crop) and text embeddings (frozen text encoder) by key.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .atomic import atomic_path, write_text

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The training data cannot be used; the message names the folder or file(s)."""


@dataclass(frozen=True)
class Example:
    path: str
    caption: str


def _check_image(path: Path, resolution: int) -> str | None:
    """None if the image is usable, else why not."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: truncated data fails here, not mid-training
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"unreadable or corrupt ({type(e).__name__}: {e})"
    if min(w, h) < resolution:
        return f"{w}×{h} is smaller than the training resolution {resolution} (lower data.resolution or upscale it)"
    return None


def scan_instance_dir(folder: str | Path, resolution: int, *, prompt: str | None, caption_ext: str = ".txt",
                      skip_bad: bool = False) -> list[Example]:
    """The usable instance images with their captions (``prompt`` for all, or each image's caption file)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"instance folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not paths:
        raise DataError(f"instance folder {folder} has no images ({', '.join(IMAGE_EXTS)})")
    bad = {p: why for p in paths if (why := _check_image(p, resolution)) is not None}
    if bad:
        listing = "\n  ".join(f"{p.name}: {why}" for p, why in bad.items())
        if not skip_bad:
            raise DataError(f"{len(bad)} of {len(paths)} instance image(s) in {folder} cannot be used:\n  {listing}\n"
                            f"Fix or remove them, or set data.skip_bad_images = true to train without them.")
        warnings.warn(f"skipping {len(bad)} instance image(s) in {folder}:\n  {listing}", stacklevel=2)
    out = []
    for p in paths:
        if p in bad:
            continue
        if prompt is not None:
            caption = prompt
        else:
            cap = p.with_suffix(caption_ext)
            if not cap.is_file():
                raise DataError(f"{p.name} has no caption file {cap.name}; write one or set data.instance_prompt")
            caption = cap.read_text().strip()
            if not caption:
                raise DataError(f"caption file {cap} is empty")
        out.append(Example(str(p), caption))
    if not out:
        raise DataError(f"no usable instance images left in {folder}")
    return out


def class_prompts(prompt: str) -> list[str]:
    """The alternatives of a class prompt: ``"a circle | a square"`` -> ["a circle", "a square"]. Several
    alternatives suit styles, whose prior is every subject the style is applied to, not one class."""
    alternatives = [p.strip() for p in prompt.split("|") if p.strip()]
    if not alternatives:
        raise DataError(f"class prompt {prompt!r} is empty")
    return alternatives


def ensure_class_images(model, folder: str | Path, prompt: str, n: int, *, resolution: int, steps: int,
                        guidance: float, seed: int = 0, progress: bool = True) -> list[Example]:
    """``n`` class images of ``prompt`` in ``folder``, generating the missing ones with the base model.

    ``prompt`` may hold k alternatives separated by ``|`` (``class_prompts``): image i shows alternative i mod k
    with seed ``seed + i // k`` (k = 1: seed + i), so a larger ``n`` later extends the cache without redrawing it.
    The prompt and the base model's fingerprint are recorded in ``prompt.txt`` and ``model.txt``: prior
    preservation must replay *this* model's prior, so a cache made for another prompt or by another base model
    is an error, not silently reused. Each image is written to a temp name and renamed, so a killed run never
    leaves a half-written image.
    """
    from .sample import SampleRequest, generate

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
    missing = [i for i in range(n) if not (folder / f"class_{i:05d}.png").exists()]
    if missing:
        from tqdm.auto import tqdm

        print(f"generating {len(missing)} class image(s) of {prompt!r} into {folder} ({n - len(missing)} cached)")
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
                                steps=steps, guidance=guidance, size=resolution)
            for i, sample in zip(run, generate(model, req, progress=False)):
                with atomic_path(folder / f"class_{i:05d}.png") as tmp:
                    sample.image.save(tmp, format="PNG")
            bar.update(len(run))
        bar.close()
    return [Example(str(folder / f"class_{i:05d}.png"), alternatives[i % k]) for i in range(n)]


def load_pixels(path: str, resolution: int, *, crop: str, flip: bool, rng: np.random.Generator | None) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: resize the short side to R (Lanczos), crop center or at random, optionally flip."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    s = resolution / min(w, h)
    if s != 1:
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.LANCZOS)
    w, h = im.size
    if crop == "random" and rng is not None:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    else:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return x.flip(-1) if flip else x


class DreamBoothDataset:
    """Instance examples × repeats, each paired with a class example (prior preservation) by position.

    ``item(index, epoch)`` -> dict(instance=(key, pixels-or-None, caption), klass=… or None). The key names the
    exact pixels (path, flip) so that ``Encoder`` can cache their latents when the crop is deterministic.
    """

    def __init__(self, instances: list[Example], classes: list[Example] | None, *, resolution: int, repeats: int = 1,
                 crop: str = "center", flip: bool = False, seed: int = 0):
        self.instances, self.classes = instances, classes or []
        self.resolution, self.repeats, self.crop, self.flip, self.seed = resolution, repeats, crop, flip, seed

    def __len__(self) -> int:
        return len(self.instances) * self.repeats

    def order(self, epoch: int) -> list[int]:
        """The sample order of one epoch (a permutation seeded by (seed, epoch))."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def _view(self, ex: Example, index: int, epoch: int, salt: int) -> tuple[tuple, Example, bool, np.random.Generator]:
        rng = np.random.default_rng([self.seed, epoch, index, salt])
        flip = bool(self.flip and rng.random() < 0.5)
        return (ex.path, flip), ex, flip, rng

    def pixels(self, ex: Example, flip: bool, rng: np.random.Generator) -> torch.Tensor:
        return load_pixels(ex.path, self.resolution, crop=self.crop, flip=flip, rng=rng)

    def item(self, index: int, epoch: int) -> list[tuple[tuple, Example, bool, np.random.Generator]]:
        """The instance view of sample ``index`` and, with class images, the class view paired with it."""
        out = [self._view(self.instances[index % len(self.instances)], index, epoch, 0)]
        if self.classes:
            j = (epoch * len(self) + index) % len(self.classes)
            out.append(self._view(self.classes[j], index, epoch, 1))
        return out


class Encoder:
    """VAE latents and text embeddings, cached by key when the inputs are deterministic.

    Latents are the scaled posterior means (what the embedded model was pretrained on). Text embeddings are
    cached only while the text encoders are frozen (``cache_text``); otherwise they are recomputed with grads.
    """

    def __init__(self, model, *, cache_latents: bool, cache_text: bool, device):
        self.pipe, self.arch, self.device = model.pipeline, model.arch, device
        self.cache_latents, self.cache_text = cache_latents, cache_text
        self._latents: dict[tuple, torch.Tensor] = {}
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def latents(self, views, dataset: DreamBoothDataset) -> torch.Tensor:
        out = []
        for key, ex, flip, rng in views:
            z = self._latents.get(key) if self.cache_latents else None
            if z is None:
                x = dataset.pixels(ex, flip, rng)[None].to(self.device, self.pipe.vae.dtype)
                z = self.pipe.vae.encode(x).latent_dist.mean[0] * self.pipe.vae.config.scaling_factor
                if self.cache_latents:
                    self._latents[key] = z
            out.append(z)
        return torch.stack(out)

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (B, T, D), pooled (B, D') for SDXL else None)."""
        if not self.cache_text:
            return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._text]
        if missing:
            with torch.no_grad():
                h, p = self._encode(missing)
            for i, c in enumerate(missing):
                self._text[c] = (h[i], None if p is None else p[i])
        h = torch.stack([self._text[c][0] for c in captions])
        p = None if self._text[captions[0]][1] is None else torch.stack([self._text[c][1] for c in captions])
        return h, p

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        pipe = self.pipe
        if self.arch != "sdxl":
            tok = pipe.tokenizer
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            return pipe.text_encoder(ids)[0], None
        # SDXL: penultimate hidden states of both encoders concatenated; pooled output of the second
        hidden, pooled = [], None
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(hidden, dim=-1), pooled


def denoise(model, zt: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """The U-Net's output for noisy latents ``zt`` (B, C, h, w) at timesteps ``t`` (B,) under ``Encoder.text``'s
    conditioning; SDXL also gets its micro-conditioning (original size = target size = the image, crop (0, 0))."""
    extra = {}
    if pooled is not None:
        r = zt.shape[-1] * model.pipeline.vae_scale_factor
        extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                      "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * len(zt)).to(hidden)}
    return model.pipeline.unet(zt, t, encoder_hidden_states=hidden, **extra).sample


def class_dir_default(output_dir: str | Path, prompt: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in prompt)[:40]
    return Path(output_dir) / "class_images" / f"{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
