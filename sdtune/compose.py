"""Composed sampling: several adapters in one image, each asked only about its own concept's part of the prompt.

A composed prompt marks each concept's phrase in brackets, in the order the adapters are given (or naming one,
1-based): "a [sks] star [in qtz style]" with adapters (sks, qtz). Its views keep one phrase each ("a sks star",
"a star in qtz style"), its neutral form none ("a star"). Each sampler step combines, for K adapters,

    c = ε̂_0(z, neutral) + Σ_k ( ε̂_k(z, view_k) − ε̂_0(z, neutral) )    (the conditional)
    u = ε̂_0(z, n)       + Σ_k ( ε̂_k(z, n)      − ε̂_0(z, n) )          (unconditional; n: the negative prompt)
    ε̂ = u + g · (c − u)                                                 (g: the guidance)

(ε̂_0: the base model; ε̂_k: the base with adapter k alone, at its weight). c is the conjunction of composable
diffusion (Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion Models", eq. 10) anchored at
the neutral prompt, with each concept's direction taken under its own adapter; u gives each adapter's change of the
unconditional prediction, so one adapter on "a [sks] star" is plain sampling with that adapter. Why: an adapter
trained on "a circle in qtz style" may not carry over to "a sks star in qtz style", and a summed model inherits
that; here every adapter only sees prompts like its training captions. The cost is 2K + 2 U-Net calls per step instead
of 2, and there is no single file: A1111 and ComfyUI cannot reproduce it (``sdtune fuse`` makes one file).

Regions (``SampleRequest.regions``, one per adapter) place each concept in its own box, MultiDiffusion-style
(Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation", region-based
generation): adapter k denoises only its box's crop of the latent, as an image of its own, with its view (c) and the
negative prompt (u); where boxes overlap their predictions are averaged (MultiDiffusion's closed-form fusion of the
views), and the base model with the neutral prompt fills what no box covers:

    c = Σ_k P_k[ ε̂_k(crop_k(z), view_k) ] / C + [C = 0] · ε̂_0(z, neutral)     (C: how many boxes cover a cell)

Each subject is thus drawn where its box is, at the size of the box, however the base composes a whole canvas (the
embedded base draws one object in the middle of any canvas). Boxes snap to the U-Net's multiple (8 latent cells on
SD, 4 on the embedded model). Write the phrases as whole descriptions, "[a sks star] [an ohwx circle]".
bench/RESULTS.md has the measured figures.
"""
from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sample import Sample, SampleRequest

_PHRASE = re.compile(r"\[(?:(\d+):)?([^\[\]]*)\]")


class ComposeError(ValueError):
    """A composed prompt that cannot be sampled with the adapters given."""


# named regions as (x0, y0, x1, y1), fractions of the image's width and height
REGIONS = {"full": (0.0, 0.0, 1.0, 1.0), "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
           "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0)}


def region_box(spec: str | None) -> tuple[float, float, float, float]:
    """A region as (x0, y0, x1, y1) fractions: a name of ``REGIONS`` or "X0:Y0:X1:Y1" (0 ≤ x0 < x1 ≤ 1, same for
    y); None or "" is the whole image."""
    if not spec:
        return REGIONS["full"]
    if spec in REGIONS:
        return REGIONS[spec]
    try:
        box = tuple(float(v) for v in spec.split(":"))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ComposeError(f"region {spec!r}: expected one of {', '.join(REGIONS)} or X0:Y0:X1:Y1, fractions of "
                           f"the image with X0 < X1 and Y0 < Y1")
    return box


def region_cells(spec: str | None, height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """``spec``'s box on a (height, width) latent as cells (y0, y1, x0, x1), its edges rounded to ``multiple`` (the
    side multiple the U-Net needs, in latent cells); a ComposeError when less than one multiple is left."""
    x0, y0, x1, y1 = region_box(spec)
    snap = lambda f, n: min(n, round(f * n / multiple) * multiple)
    cells = snap(y0, height), snap(y1, height), snap(x0, width), snap(x1, width)
    if cells[1] - cells[0] < multiple or cells[3] - cells[2] < multiple:
        raise ComposeError(f"region {spec or 'full'!r} is less than {multiple} latent cells on a side of a {width}×"
                           f"{height} latent (the U-Net's multiple): make it or the image larger")
    return cells


@dataclass(frozen=True)
class ComposedPrompt:
    """``text`` without brackets, ``neutral`` without any concept's phrase, ``views``: ((adapter index, text with
    only that concept's phrase), ...)."""

    text: str
    neutral: str
    views: tuple[tuple[int, str], ...]


def is_composed(prompt: str) -> bool:
    return bool(_PHRASE.search(prompt))


def parse(prompt: str, n_adapters: int) -> ComposedPrompt:
    """"a [sks] star [in qtz style]" -> ComposedPrompt("a sks star in qtz style", "a star",
    ((0, "a sks star"), (1, "a star in qtz style"))). The k-th bracket belongs to adapter k unless it names one:
    "a [1:sks] star [3:in bnp style]"."""
    marks = list(_PHRASE.finditer(prompt))
    if not marks:
        raise ComposeError(f"{prompt!r}: mark each concept's phrase in brackets, e.g. 'a [sks] star [in qtz style]'")
    owners = [int(m.group(1)) - 1 if m.group(1) else k for k, m in enumerate(marks)]
    if len(set(owners)) != len(owners) or not all(0 <= i < n_adapters for i in owners):
        raise ComposeError(f"{prompt!r}: each bracketed phrase must belong to a different adapter among "
                           f"1..{n_adapters}")
    starts = [m.start() for m in marks]

    def keep(only) -> str:
        """The prompt without brackets, keeping only the ``only``-th phrase ("all": every phrase; None: none)."""
        out = _PHRASE.sub(lambda m: m.group(2) if only in ("all", starts.index(m.start())) else "", prompt)
        return " ".join(out.split())

    return ComposedPrompt(keep("all"), keep(None), tuple((i, keep(k)) for k, i in enumerate(owners)))


def check(prompts: list[str], n_adapters: int, regions: list[str | None] = ()) -> dict[str, ComposedPrompt]:
    """The composed prompts among ``prompts``, parsed; a ComposeError (before any model is loaded) where one cannot
    be sampled with ``n_adapters`` adapters, or ``regions`` (none, or one per adapter) cannot be read."""
    if not n_adapters:
        raise ComposeError("composed sampling needs the adapters of the concepts the brackets mark: give them")
    if regions and len(regions) != n_adapters:
        raise ComposeError(f"{len(regions)} regions for {n_adapters} adapters: give one region per adapter "
                           f"(full for the whole image)")
    for r in regions:
        region_box(r)
    return {p: parse(p, n_adapters) for p in prompts if is_composed(p)}


def check_request(request: SampleRequest, composed: bool) -> None:
    """Every check a sampling request gets about composition, before a model is loaded (the CLI and the web UI):
    regions only with composed sampling; with it, ``check`` and no block weights (it hooks whole files)."""
    if not composed:
        if any(request.regions):
            raise ComposeError("regions place each adapter's phrase in composed sampling: turn it on (--compose; "
                               "Compose in the web UI)")
        return
    check(request.prompts, len(request.adapters), request.regions)
    if any(request.blocks):
        raise ComposeError("block weights do not combine with composed sampling (it hooks whole files)")


def run(model, request: SampleRequest, *, composed: bool, progress: bool = True) -> list[Sample]:
    """:func:`generate` when ``composed``, else ``sample.generate``: the one switch the CLI, the web UI and the
    benches share."""
    from .sample import generate as plain

    return (generate if composed else plain)(model, request, progress=progress)


def generate(model, request: SampleRequest, *, progress: bool = True) -> list[Sample]:
    """Like ``sample.generate``, but every adapter acts only on its own bracketed phrase (module docstring):
    prompts with phrases are sampled composed, prompts without any by the base model alone."""
    from .apply import LowRankHook, hook_parts, load
    from .sample import generate as plain
    from .schedules import sampling_schedule

    parsed = check(request.prompts, len(request.adapters), request.regions)
    plain_prompts = [p for p in request.prompts if p not in parsed]
    by_prompt = {}
    if plain_prompts:
        samples = plain(model, replace(request, prompts=plain_prompts, adapters=[]), progress=progress)
        by_prompt = {p: samples[k * request.count:(k + 1) * request.count] for k, p in enumerate(plain_prompts)}
    if parsed:
        comps = model.components()
        files = [load(path, comps, model.arch) for path, _ in request.adapters]
        layers = hook_parts(comps, model.arch, files, [w for _, w in request.adapters])
        with ExitStack() as stack:
            stack.enter_context(sampling_schedule(model.pipeline, request.zero_terminal_snr))
            hooks = [LowRankHook(layer, parts) for layer, parts in layers.values()]
            for h in hooks:
                stack.callback(h.remove)
            bar = tqdm(total=len(parsed) * request.steps, desc="composed sampling", unit="step", disable=not progress)
            for prompt, cp in parsed.items():
                by_prompt[prompt] = _composed(model, hooks, cp, prompt, request, bar.update)
            bar.close()
    return [s for p in request.prompts for s in by_prompt[p]]


@torch.no_grad()
def _composed(model, hooks, cp: ComposedPrompt, prompt: str, request: SampleRequest, step_done) -> list[Sample]:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from .data.dataset import Encoder, denoise
    from .models import model_multiple

    pipe = model.pipeline
    encoder = Encoder(model, cache_latents=False, cache_text=False, device=pipe.unet.device)
    n = request.count

    def use(mode) -> None:
        for h in hooks:
            h.mode = mode

    def conditioning(mode, text: str):
        use(mode)
        hidden, pooled = encoder.text([text])
        return mode, hidden.expand(n, -1, -1), None if pooled is None else pooled.expand(n, -1)

    width, height = (d // pipe.vae_scale_factor for d in request.dims(model.resolution))
    k = len(cp.views)
    if request.regions:   # each view on its box's crop; the base on the neutral prompt where no box is
        multiple = model_multiple(pipe) // pipe.vae_scale_factor
        boxes = {i: region_cells(request.regions[i], height, width, multiple) for i, _ in cp.views}
        cover = torch.zeros(1, 1, height, width, device=pipe.unet.device, dtype=pipe.unet.dtype)
        for y0, y1, x0, x1 in boxes.values():
            cover[..., y0:y1, x0:x1] += 1
        places, rest = boxes, (cover == 0).to(cover.dtype)
    else:                 # (conditioning, coefficient): Σ coefficient·ε̂(mode, text), the base's 1 − K
        places, rest, cover = {i: 1.0 for i, _ in cp.views}, 1.0 - k, None
    cond = [(conditioning(i, view), places[i]) for i, view in cp.views] + [(conditioning(None, cp.neutral), rest)]
    uncond = [(conditioning(i, request.negative_prompt), places[i]) for i, _ in cp.views]
    uncond.append((conditioning(None, request.negative_prompt), rest))
    # a term whose coefficient is 0 everywhere costs no U-Net call: the base's, for one adapter or boxes that tile
    live = lambda terms: [(m, c) for m, c in terms if isinstance(c, tuple) or (c.any() if isinstance(c, Tensor) else c)]
    cond, uncond = live(cond), live(uncond)

    def eps(terms, z: Tensor, t: Tensor) -> Tensor:
        out = torch.zeros_like(z)
        for (mode, hidden, pooled), where in terms:
            use(mode)
            if isinstance(where, tuple):   # a box: its crop denoised alone, averaged where boxes overlap
                y0, y1, x0, x1 = where
                crop = denoise(model, z[..., y0:y1, x0:x1], t.expand(len(z)), hidden, pooled)
                out[..., y0:y1, x0:x1] += crop / cover[..., y0:y1, x0:x1]
            else:
                out += where * denoise(model, z, t.expand(len(z)), hidden, pooled)
        return out

    sched = pipe.scheduler
    sched.set_timesteps(request.steps)
    seeds = [request.seed + i for i in range(n)]
    z = torch.stack([torch.randn(pipe.unet.config.in_channels, height, width, generator=torch.Generator().manual_seed(s))
                     for s in seeds]).to(pipe.unet.device, pipe.unet.dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(z, t)
        u, c = eps(uncond, x, t), eps(cond, x, t)
        guided = u + request.guidance * (c - u)
        if request.guidance_rescale:  # as the pipelines do (Lin et al. 2024 §3.4), with c the conditional
            guided = rescale_noise_cfg(guided, c, request.guidance_rescale)
        z = sched.step(guided, t, z).prev_sample
        step_done()
    use(None)
    image = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    return [Sample(im, prompt, s) for im, s in zip(pipe.image_processor.postprocess(image, output_type="pil"), seeds)]
