"""DreamBooth data: the pipeline scan → intake → bucket → cache → batch, and the text encoder.

``scan_instance_dir`` (``scan``) finds and checks the images, captions and masks (every unusable file named in one
error); class images come from ``classes``. ``DreamBoothDataset`` places every image in its aspect-ratio bucket
(``buckets``), draws batches within one bucket, and turns a view (image, flip, crop) into pixels (``intake.decode``:
EXIF, modes, alpha) and a mask. Its random choices come from generators seeded by (seed, epoch, index), so a
resumed run draws the same views.
``Encoder`` caches VAE latents (deterministic crops; in memory or on disk, ``latent_cache``) and text embeddings.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .buckets import Placement, TooSmall, make_buckets, place
from .captions import CaptionPolicy, overlong
from .intake import DEFAULT_MAX_PIXELS, decode, probe
from .latent_cache import LatentCache
from .scan import IMAGE_EXTS, DataError, Example, Source, require, scan_folder  # noqa: F401  (the data API)


def size_check(resolution: int, buckets: list[tuple[int, int]] | None, upscale: bool = False):
    """``check(size)`` for ``scan_folder``: why an image of that size fits no bucket (without bucketing: the
    resolution square), or None."""
    def check(size: tuple[int, int]) -> str | None:
        try:
            place(size, buckets or [(resolution, resolution)], upscale=upscale)
        except TooSmall as e:
            return f"{size[0]}×{size[1]} is smaller than the training resolution {resolution} allows ({e})"
        return None
    return check


def scan_instance_dir(folder: str | Path, resolution: int, *, prompt: str | None, caption_ext: str = ".txt",
                      skip_bad: bool = False, buckets: list[tuple[int, int]] | None = None, upscale: bool = False,
                      **source) -> list[Example]:
    """The usable images of one folder with their captions (each image's caption file, else ``prompt``).
    ``source``: the other ``scan.Source`` fields (recursive, max_pixels, mask_dir, alpha_mask, policy)."""
    found = scan_folder(folder, Source(prompt=prompt, caption_ext=caption_ext, **source),
                        size_check(resolution, buckets, upscale))
    return require([found], skip_bad=skip_bad)


def bucket_shapes(dc, resolution: int, multiple: int) -> list[tuple[int, int]] | None:
    """The bucket table of a [data] section (``buckets.make_buckets``), or None when bucketing is off."""
    if not dc.buckets:
        return None
    try:
        return make_buckets(resolution, multiple, min_side=dc.bucket_min_side, max_side=dc.bucket_max_side,
                            max_aspect=dc.bucket_max_aspect, step=dc.bucket_step)
    except ValueError as e:
        raise DataError(f"[data] {e}") from None


def caption_policy(dc, sub=None) -> CaptionPolicy:
    """The caption policy of [data] ``dc``, or of subset ``sub`` (its unset keys take [data]'s value)."""
    def get(name):
        v = getattr(sub, name, None)
        return getattr(dc, name) if v is None else v
    return CaptionPolicy(shuffle_tags=get("shuffle_tags"), keep_tags=get("keep_tags"), tag_dropout=get("tag_dropout"),
                         caption_dropout=get("caption_dropout"), trigger_word=get("trigger_word"),
                         separator=dc.tag_separator)


@dataclass
class DataPlan:
    """What the [data] section trains on: instance examples with their repeats, the user's own regularisation
    images (``is_reg`` subsets, repeated), and the class prompts that generated class images need (each instance
    subset's own, else prior.class_prompt)."""

    instances: list[Example]
    repeats: list[int]
    regs: list[Example]
    class_prompts: list[str]  # distinct, in subset order


def read_instances(dc, resolution: int, buckets: list[tuple[int, int]] | None, *, class_prompt: str = "") -> DataPlan:
    """Scan every folder of a [data] section (instance_dir, then each [[data.subsets]]); one DataError names every
    unusable file of all of them. ``class_prompt``: that of the subsets that name none (prior.class_prompt)."""
    check = size_check(resolution, buckets, dc.bucket_upscale)
    subsets = dc.folders()  # the [data] folder is a subset with [data]'s own settings
    scans = []
    for sub in subsets:
        def get(name, default_name=None):
            v = getattr(sub, name)
            return getattr(dc, default_name or name) if v is None else v
        source = Source(prompt=get("prompt", "instance_prompt"), caption_ext=get("caption_ext"),
                        recursive=get("recursive"), max_pixels=dc.max_pixels, mask_dir=get("mask_dir"),
                        alpha_mask=get("alpha_mask"), policy=caption_policy(dc, sub))
        scans.append(scan_folder(sub.dir, source, check))
    require(scans, skip_bad=dc.skip_bad_images)  # the one error (or warning) for every folder
    plan = DataPlan([], [], [], [])
    for sub, found in zip(subsets, scans):
        examples = found.examples
        if sub.is_reg:
            plan.regs += [e for e in examples for _ in range(sub.repeats)]
        else:
            plan.instances += examples
            plan.repeats += [sub.repeats] * len(examples)
            prompt = sub.class_prompt or class_prompt
            if prompt and prompt not in plan.class_prompts:
                plan.class_prompts.append(prompt)
    if not plan.instances:
        raise DataError("every [[data.subsets]] is is_reg: at least one folder of instance images is needed")
    return plan


def warn_long_captions(tokenizer, examples: list[Example]) -> None:
    """One warning naming the captions longer than the text encoder reads (it keeps the first model_max_length
    tokens, begin/end included; the rest does not reach the model)."""
    long = overlong(tokenizer, {Path(ex.path).name: ex.policy.apply(ex.caption, None) for ex in examples})
    if long:
        listing = ", ".join(f"{name} ({n} tokens)" for name, n in long[:12]) + (" …" if len(long) > 12 else "")
        warnings.warn(f"{len(long)} caption(s) are longer than the text encoder's {tokenizer.model_max_length} "
                      f"tokens and are cut there: {listing}", stacklevel=2)


class DreamBoothDataset:
    """Instance examples × repeats in aspect-ratio buckets, each paired with a class example of its own bucket (by
    position among them; any class example when its bucket has none).

    A view is the tuple (key, example, flip, crop): ``crop`` is the (left, top) of the bucket window in the resized
    image (None = centred), ``example.caption`` is this view's caption (caption policy applied) and ``key`` names
    the exact pixels (path, flip, bucket, crop) so that ``Encoder`` can cache their latents.
    ``buckets`` None: one square bucket of ``resolution`` (the classic centre/random square crop).
    """

    def __init__(self, instances: list[Example], classes: list[Example] | None, *, resolution: int,
                 repeats: int | list[int] = 1, crop: str = "center", flip: bool = False, seed: int = 0,
                 buckets: list[tuple[int, int]] | None = None, upscale: bool = False,
                 background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = DEFAULT_MAX_PIXELS):
        self.instances, self.classes = instances, classes or []
        self.resolution, self.crop, self.flip, self.seed = resolution, crop, flip, seed
        self.buckets = buckets or [(resolution, resolution)]
        self.upscale, self.background, self.max_pixels = upscale, background, max_pixels
        reps = [repeats] * len(instances) if isinstance(repeats, int) else list(repeats)
        self.samples = [i for i, r in enumerate(reps) for _ in range(r)]  # sample index -> instance index
        self.placements: dict[str, Placement] = {}
        self._buckets_of: dict[tuple[int, int], list[int]] | None = None
        self._classes_of: dict[tuple[int, int], list[int]] | None = None
        for ex in self.instances + self.classes:
            self.placement(ex)

    def __len__(self) -> int:
        return len(self.samples)

    def placement(self, ex: Example) -> Placement:
        p = self.placements.get(ex.path)
        if p is None:
            size = ex.size or probe(ex.path, max_pixels=self.max_pixels).size
            p = self.placements[ex.path] = place(size, self.buckets, upscale=self.upscale)
        return p

    # ------------------------------------------------------------------------------------------- batching
    def num_batches(self, size: int) -> int:
        """Batches of ``size`` samples per epoch: Σ_bucket ⌈n_bucket / size⌉ (the same every epoch)."""
        return sum(math.ceil(len(s) / size) for s in self._by_bucket().values())

    def _by_bucket(self) -> dict[tuple[int, int], list[int]]:
        """bucket -> its sample indices (computed once: the samples and their buckets never change)."""
        if self._buckets_of is None:
            by: dict[tuple[int, int], list[int]] = {}
            for q, i in enumerate(self.samples):
                by.setdefault(self.placement(self.instances[i]).bucket, []).append(q)
            self._buckets_of = dict(sorted(by.items()))
        return self._buckets_of

    def batches(self, epoch: int, size: int) -> list[list[int]]:
        """The batches of one epoch: sample indices, ``size`` per batch, all of one bucket. Each bucket is shuffled
        and its last batch filled up with other samples of that bucket; then the batches are shuffled."""
        rng = np.random.default_rng([self.seed, epoch, 0x0BA7C4])
        out = []
        for samples in self._by_bucket().values():
            order = [samples[j] for j in rng.permutation(len(samples))]
            short = -len(order) % size
            if short:
                order += [samples[j] for j in rng.choice(len(samples), short, replace=len(samples) < short)]
            out += [order[k:k + size] for k in range(0, len(order), size)]
        return [out[j] for j in rng.permutation(len(out))]

    def bucket_table(self) -> str:
        from .buckets import table

        paths = [ex.path for ex in self.instances]
        root = os.path.commonpath([str(Path(p).parent) for p in paths])
        return table({os.path.relpath(p, root): self.placement(ex) for p, ex in zip(paths, self.instances)},
                     samples=len(self))

    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info``: {"buckets": {"0": {"resolution": [w, h], "count": samples}, …},
        "mean_img_ar_error": mean |image w/h − bucket w/h| over the instance samples}."""
        by = self._by_bucket()
        errors = [abs(pl.size[0] / pl.size[1] - pl.bucket[0] / pl.bucket[1])
                  for pl in (self.placement(self.instances[i]) for i in self.samples)]
        return {"buckets": {str(k): {"resolution": list(b), "count": len(s)} for k, (b, s) in enumerate(by.items())},
                "mean_img_ar_error": sum(errors) / max(len(errors), 1)}

    def bucket_metadata(self, enabled: bool) -> dict[str, str]:
        """kohya's bucket keys of an export (``ss_enable_bucket``, ``ss_bucket_info``, …), which A1111's and
        ComfyUI's metadata viewers show."""
        if not enabled:
            return {"ss_enable_bucket": "False"}
        sides = [s for b in self.buckets for s in b]
        return {"ss_enable_bucket": "True", "ss_bucket_no_upscale": str(not self.upscale),
                "ss_min_bucket_reso": str(min(sides)), "ss_max_bucket_reso": str(max(sides)),
                "ss_bucket_info": json.dumps(self.bucket_info())}

    # ------------------------------------------------------------------------------------------- views
    def _view(self, ex: Example, index: int, epoch: int, salt: int) -> tuple:
        rng = np.random.default_rng([self.seed, epoch, index, salt])
        flip = bool(self.flip and rng.random() < 0.5)
        pl = self.placement(ex)
        crop = pl.crop(rng if self.crop == "random" else None)
        view_ex = replace(ex, caption=ex.policy.apply(ex.caption, rng))
        return (ex.path, flip, pl.bucket, crop), view_ex, flip, crop

    def _class_pool(self, bucket: tuple[int, int]) -> list[int]:
        """Class images to pair with an instance of ``bucket``: those of the same bucket (one U-Net call per
        step), else all of them."""
        if self._classes_of is None:
            self._classes_of = {}
            for j, ex in enumerate(self.classes):
                self._classes_of.setdefault(self.placement(ex).bucket, []).append(j)
        return self._classes_of.get(bucket) or list(range(len(self.classes)))

    def item(self, index: int, epoch: int) -> list[tuple]:
        """The instance view of sample ``index`` and, with class images, the class view paired with it (one of
        the instance's bucket when there is one)."""
        ex = self.instances[self.samples[index]]
        out = [self._view(ex, index, epoch, 0)]
        if self.classes:
            pool = self._class_pool(self.placement(ex).bucket)
            j = pool[(epoch * len(self) + index) % len(pool)]
            out.append(self._view(self.classes[j], index, epoch, 1))
        return out

    def fixed_views(self) -> list[tuple]:
        """One view per instance image: centred, unflipped, its caption without dropout or shuffling."""
        out = []
        for ex in self.instances:
            pl = self.placement(ex)
            crop = pl.crop(None)
            out.append(((ex.path, False, pl.bucket, crop), replace(ex, caption=ex.policy.apply(ex.caption, None)),
                        False, crop))
        return out

    def groups(self, views) -> list[list[int]]:
        """Positions of ``views`` grouped by bucket (one U-Net call per latent shape), in first-seen order."""
        by: dict[tuple[int, int], list[int]] = {}
        for k, (_, ex, _, _) in enumerate(views):
            by.setdefault(self.placement(ex).bucket, []).append(k)
        return list(by.values())

    def time_ids(self, views) -> torch.Tensor:
        """SDXL micro-conditioning per view (B, 6): original (h, w), crop (top, left), target (h, w) = bucket. A
        flipped view's crop is measured from the right edge, where its left edge came from (as kohya does)."""
        rows = []
        for _, ex, flip, crop in views:
            pl = self.placement(ex)
            left, top = crop if crop is not None else pl.crop(None)
            if flip:
                left = pl.resized[0] - left - pl.bucket[0]
            rows.append([pl.size[1], pl.size[0], top, left, pl.bucket[1], pl.bucket[0]])
        return torch.tensor(rows, dtype=torch.float32)

    def geometry(self, ex: Example, flip: bool, crop: tuple[int, int] | None) -> tuple:
        """Everything besides the files that decides a view's pixels (the disk cache's key)."""
        pl = self.placement(ex)
        return pl.bucket, pl.resized, crop if crop is not None else pl.crop(None), flip, self.background

    def pixels(self, ex: Example, flip: bool, crop: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((3, bh, bw) in [-1, 1], mask (1, bh, bw) in [0, 1] or None): decode (EXIF, mode, alpha), resize to
        cover the bucket (Lanczos), crop the window, optionally flip."""
        pl = self.placement(ex)
        im, alpha = decode(ex.path, max_pixels=self.max_pixels, background=self.background)
        mask = alpha if ex.mask == "alpha" else None
        if ex.mask not in (None, "alpha"):
            mask = decode(ex.mask, max_pixels=self.max_pixels)[0].convert("L")
        left, top = crop if crop is not None else pl.crop(None)
        box = (left, top, left + pl.bucket[0], top + pl.bucket[1])
        x = _to_tensor(im.resize(pl.resized, Image.LANCZOS).crop(box) if im.size != pl.resized else im.crop(box))
        x = x / 127.5 - 1.0
        m = None
        if mask is not None:
            m = _to_tensor(mask.resize(pl.resized, Image.BILINEAR).crop(box)) / 255.0
        if flip:
            x, m = x.flip(-1), None if m is None else m.flip(-1)
        return x, m


def _to_tensor(im: Image.Image) -> torch.Tensor:
    a = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()


def masked_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of ``err`` (B, C, h, w) weighted by ``mask`` (B, 1, h, w) or unweighted (None):
    Σ m·err / (C · Σ m). A sample whose mask is zero everywhere gets 0 (and no gradient)."""
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    m = mask.to(err)
    return (err * m).sum(dim=(1, 2, 3)) / (err.shape[1] * m.sum(dim=(1, 2, 3))).clamp_min(1e-8)


TEXT_CACHE_MAX = 4096  # cached caption embeddings (SD 1.x: 4096 × 77 × 768 floats ≈ 1 GB)


class Encoder:
    """VAE latents and text embeddings, cached by key when the inputs are deterministic.

    Latents are the scaled posterior means (what the embedded model was pretrained on). A text encoder's outputs
    (hidden states and, SDXL's second, the pooled embedding) are cached per caption while it is frozen
    (``cache_text``: True = every encoder, False = none, or the component names of the frozen ones); a trained
    encoder's are recomputed with grads.
    """

    def __init__(self, model, *, cache_latents: bool, cache_text: bool | Collection[str], device,
                 disk: LatentCache | None = None):
        self.pipe, self.arch, self.device = model.pipeline, model.arch, device
        self.cache_latents, self.disk = cache_latents, disk  # disk: latents in files instead of memory
        self.text_encoders = ["text_encoder", "text_encoder_2"] if model.arch == "sdxl" else ["text_encoder"]
        self.cached_encoders = set(self.text_encoders if cache_text is True else cache_text or ())
        self._latents: dict[tuple, torch.Tensor] = {}
        self._text: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def latents(self, views, dataset: DreamBoothDataset) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(latents (B, C, h, w), masks (B, 1, h, w) area-averaged to the latent grid, or None when no view has
        one) of views that share a bucket; views without a mask get ones."""
        zs, ms = [], []
        for key, ex, flip, crop in views:
            file = self.disk.path(ex.path, ex.mask, dataset.geometry(ex, flip, crop)) \
                if self.cache_latents and self.disk is not None else None
            if file is not None:
                hit = self.disk.get(file)
                hit = None if hit is None else tuple(None if v is None else v.to(self.device) for v in hit)
            else:
                hit = self._latents.get(key) if self.cache_latents else None
            if hit is None:
                x, m = dataset.pixels(ex, flip, crop)
                z = self.pipe.vae.encode(x[None].to(self.device, self.pipe.vae.dtype)).latent_dist.mean[0]
                z = z * self.pipe.vae.config.scaling_factor
                if m is not None:
                    m = F.interpolate(m[None], size=z.shape[-2:], mode="area")[0].to(z.device)
                hit = (z, m)
                if file is not None:
                    self.disk.put(file, z, m)  # on disk only: the dataset is never held in memory
                elif self.cache_latents:
                    self._latents[key] = hit
            zs.append(hit[0])
            ms.append(hit[1])
        z0 = torch.stack(zs)
        if all(m is None for m in ms):
            return z0, None
        return z0, torch.stack([torch.ones_like(z0[0, :1]) if m is None else m for m in ms])

    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (B, T, D), pooled (B, D') for SDXL else None). SDXL: the penultimate hidden states of both
        encoders concatenated, and the second one's pooled projection."""
        outs = [self._encoder_output(name, captions) for name in self.text_encoders]
        return torch.cat([h for h, _ in outs], dim=-1), outs[-1][1]

    def _encoder_output(self, name: str, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in self.cached_encoders:
            return self._encode(name, captions)
        if len(self._text) > TEXT_CACHE_MAX * len(self.text_encoders):  # shuffled/dropped tags: captions without end
            self._text.clear()
        missing = [c for c in dict.fromkeys(captions) if (name, c) not in self._text]
        if missing:
            with torch.no_grad():
                h, p = self._encode(name, missing)
            for i, c in enumerate(missing):
                self._text[name, c] = (h[i], None if p is None else p[i])
        hits = [self._text[name, c] for c in captions]
        return torch.stack([h for h, _ in hits]), None if hits[0][1] is None else torch.stack([p for _, p in hits])

    def _encode(self, name: str, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled projection or None) of text encoder ``name``."""
        pipe = self.pipe
        tok = pipe.tokenizer_2 if name == "text_encoder_2" else pipe.tokenizer
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        if self.arch != "sdxl":
            return getattr(pipe, name)(ids)[0], None
        out = getattr(pipe, name)(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0] if name == "text_encoder_2" else None


def denoise(model, zt: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
            time_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The U-Net's output for noisy latents ``zt`` (B, C, h, w) at timesteps ``t`` (B,) under ``Encoder.text``'s
    conditioning. SDXL also gets its micro-conditioning ``time_ids`` (B, 6) = original (h, w), crop (top, left),
    target (h, w) (``DreamBoothDataset.time_ids``); None = the latent's own size, uncropped."""
    extra = {}
    if pooled is not None:
        if time_ids is None:
            h, w = (s * model.pipeline.vae_scale_factor for s in zt.shape[-2:])
            time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(zt))
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(hidden)}
    return model.pipeline.unet(zt, t, encoder_hidden_states=hidden, **extra).sample
