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


def check(prompts: list[str], n_adapters: int) -> dict[str, ComposedPrompt]:
    """The composed prompts among ``prompts``, parsed; a ComposeError (before any model is loaded) where one cannot
    be sampled with ``n_adapters`` adapters."""
    if not n_adapters:
        raise ComposeError("composed sampling needs the adapters of the concepts the brackets mark: give them")
    return {p: parse(p, n_adapters) for p in prompts if is_composed(p)}


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

    parsed = check(request.prompts, len(request.adapters))
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

    # (adapter or None, conditioning, coefficient): c and u as sums of Σ coefficient·ε̂(mode, text)
    k = len(cp.views)
    cond = [(conditioning(i, view), 1.0) for i, view in cp.views] + [(conditioning(None, cp.neutral), 1.0 - k)]
    uncond = [(conditioning(i, request.negative_prompt), 1.0) for i, _ in cp.views]
    uncond.append((conditioning(None, request.negative_prompt), 1.0 - k))

    def eps(terms, z: Tensor, t: Tensor) -> Tensor:
        out = 0.0
        for (mode, hidden, pooled), c in terms:
            if c:   # one adapter: the base terms' coefficient is 0
                use(mode)
                out = out + c * denoise(model, z, t.expand(len(z)), hidden, pooled)
        return out

    sched = pipe.scheduler
    sched.set_timesteps(request.steps)
    width, height = (d // pipe.vae_scale_factor for d in request.dims(model.resolution))
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
