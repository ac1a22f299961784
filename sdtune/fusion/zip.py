"""Learned merge of low-rank adapters: ZipLoRA (Shah et al. 2023, "ZipLoRA: Any Subject in Any Style by
Effectively Merging LoRAs", §3.3), on every adapted layer of the U-Net and the text encoders.

Each input i gets a merger vector m_{L,i} ∈ R^d per layer L (d = fan-in; one coefficient per *column* of the
matricised ΔW, i.e. per input coordinate), and the fused update is

    ΔW_L = Σ_i w_i ΔW_{L,i} diag(m_{L,i})  =  [w₁up₁ … w_n up_n] @ [down₁ diag(m₁); …; down_n diag(m_n)]

(still low-rank: the merger only rescales ``down``'s columns). Starting from m = 1 (the plain sum), the m's are
fitted with Adam so that the *fused model* on concept i's prompts denoises like the model with adapter i alone:

    L(m) = (1/n) Σ_i E‖ε̂_fused(z_t, t, p_i) − ε̂_i(z_t, t, p_i)‖² / E‖ε̂_0(z_t, t, p_i) − ε̂_i(z_t, t, p_i)‖²
           + λ Σ_L Σ_{i<j} |cos(m_{L,i}, m_{L,j})|

(ZipLoRA eq. 4: the second term pushes the inputs onto different columns, which is what keeps their crosstalk
down; eq. 4 has one subject and one style, the sum over pairs extends it to n inputs). Unlike eq. 4, each
concept's error is divided by its adapter's own effect (ε̂_0: the base model, on the same batch): a style changes
the prediction far less than a subject does, and unnormalised its error is ignored. z₀ are latents that the
teacher (adapter i alone) samples from p_i, so no training images are needed; ε̂ is the U-Net's output whatever
its prediction type. Unlike the per-layer methods in ``fusion.math``, this one sees the model end to end:
upstream layers are merged too, and text-encoder merges act through the conditioning.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters.functional import Factors
from ..apply import LowRankHook


@dataclass(frozen=True)
class ZipOptions:
    """Method zip: the learned merge (module docstring); ``rank`` truncates the written factors (error reported)."""

    rank: int | None = None
    steps: int = 100            # Adam steps (ZipLoRA: 100)
    lr: float = 1e-2            # ZipLoRA: 0.01
    cos_weight: float = 0.01    # λ of the cosine term (ZipLoRA: 0.01)
    batch: int = 4              # noisy latents per concept and step
    latents: int = 8            # teacher-sampled latents per concept
    sample_steps: int = 10      # sampler steps drawing them
    guidance: float = 5.0       # and their classifier-free guidance
    seed: int = 0


def cosine_penalty(hook: LowRankHook) -> Tensor:
    """Σ_{i<j} |cos(m_i, m_j)| over one layer's merger vectors."""
    terms = _abs_cosines(list(hook.merger.values()))
    return torch.stack(terms).sum() if terms else hook.layer.weight.new_zeros(())


def _abs_cosines(ms: list[Tensor]) -> list[Tensor]:
    """|cos(m_i, m_j)| for every pair i < j of one layer's merger vectors."""
    return [F.cosine_similarity(a, b, dim=0).abs() for k, a in enumerate(ms) for b in ms[k + 1:]]


def _noised(model, latents: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(z_t, t): ``latents`` noised at uniformly drawn training timesteps."""
    sched = model.pipeline.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    return sched.add_noise(latents, noise, t), t


def learn_merger(model, layers: Mapping[str, tuple[nn.Module, list[tuple[int, Factors]]]],
                 prompts: Sequence[Sequence[str]], options: ZipOptions | None = None, *,
                 progress: bool = True) -> tuple[dict[str, dict[int, Tensor]], list[float]]:
    """Fit the merger vectors (see the module docstring).

    layers: {kohya name: (base layer, [(input index, (w_i·up_i (out, r), down_i (r, d)))])}, the weight already
    in ``up``; prompts[i]: concept i's prompts. Returns ({name: {i: m (d,)}}, the loss per step). The model is
    left as it was (hooks removed, requires_grad restored).
    """
    from ..data.dataset import Encoder, denoise

    options = options or ZipOptions()
    hooks = {name: LowRankHook(layer, parts) for name, (layer, parts) in layers.items()}
    for h in hooks.values():        # a layer that one input alone adapts is that input's own: its merger stays 1
        for m in h.merger.values():
            m.requires_grad_(len(h.merger) > 1)
    params = [m for h in hooks.values() for m in h.merger.values() if m.requires_grad]
    grad_state = {p: p.requires_grad for c in model.components().values() for p in c.parameters()}
    for p in grad_state:
        p.requires_grad_(False)
    encoder = Encoder(model, cache_latents=False, cache_text=False, device=model.pipeline.unet.device)

    def set_mode(mode) -> None:
        for h in hooks.values():
            h.mode = mode

    def eps(mode, caps: list[str], zt: Tensor, t: Tensor) -> Tensor:
        set_mode(mode)
        return denoise(model, zt, t, *encoder.text(caps)).float()

    losses: list[float] = []
    try:
        # no shared layer: nothing to learn, every merger stays 1
        tasks = []   # (prompts, teacher-sampled latents z₀, teacher input index)
        with torch.no_grad():
            for i, ps in enumerate(prompts if params else []):
                set_mode(i)
                reps = [ps[k % len(ps)] for k in range(options.latents)]
                z0 = model.pipeline(reps, num_inference_steps=options.sample_steps, guidance_scale=options.guidance,
                                    output_type="latent",
                                    generator=torch.Generator().manual_seed(options.seed + i)).images
                tasks.append((reps, z0.float(), i))
        gen = torch.Generator().manual_seed(options.seed)
        opt = torch.optim.Adam(params, lr=options.lr) if params else None
        for _ in tqdm(range(options.steps if params else 0), desc="zip merge", unit="step", disable=not progress):
            loss = 0.0
            for reps, z0, teacher in tasks:
                pick = torch.randint(0, len(z0), (options.batch,), generator=gen)
                caps = [reps[k] for k in pick.tolist()]
                zt, t = _noised(model, z0[pick], gen)
                with torch.no_grad():
                    target = eps(teacher, caps, zt, t)
                    effect = F.mse_loss(eps(None, caps, zt, t), target)
                pred = eps("fused", caps, zt, t)
                loss = loss + F.mse_loss(pred, target) / effect.clamp_min(1e-12) / len(tasks)
            penalty = sum(cosine_penalty(h) for h in hooks.values())
            opt.zero_grad(set_to_none=True)
            (loss + options.cos_weight * penalty).backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for h in hooks.values():
            h.remove()
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
    merger = {name: {i: m.detach().double().cpu() for i, m in h.merger.items()} for name, h in hooks.items()}
    return merger, losses


def mean_cosine(merger: Mapping[str, Mapping[int, Tensor]]) -> float:
    """Mean over shared layers and input pairs of |cos(m_{L,i}, m_{L,j})|: 1 at the start (the plain sum), lower
    as the learned merge moves the inputs onto different columns; nan when no layer is shared."""
    terms = [float(c) for ms in merger.values() for c in _abs_cosines(list(ms.values()))]
    return sum(terms) / len(terms) if terms else float("nan")
