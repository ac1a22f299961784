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
the prediction far less than a subject does, and unnormalised its error was ignored (measured: the style's
fidelity fell from 100 % under the plain sum to 0 %). z₀ are latents that the
teacher (adapter i alone) samples from p_i, so no training images are needed; ε̂ is the U-Net's output whatever
its prediction type. Unlike the per-layer methods in ``fusion_math``, this one sees the model end to end:
upstream layers are merged too, and text-encoder merges act through the conditioning.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

Factors = tuple[Tensor, Tensor]


@dataclass
class ZipOptions:
    steps: int = 100            # Adam steps (ZipLoRA: 100)
    lr: float = 1e-2            # ZipLoRA: 0.01
    cos_weight: float = 0.01    # λ of the cosine term (ZipLoRA: 0.01)
    batch: int = 4              # noisy latents per concept and step
    latents: int = 8            # teacher-sampled latents per concept
    sample_steps: int = 10      # sampler steps drawing them
    guidance: float = 5.0       # and their classifier-free guidance
    seed: int = 0


class MergedLayer:
    """A forward hook on one base Linear/Conv2d adding a merged low-rank update.

    ``mode`` None: off; an int i: input i alone at weight w_i (the teacher); "fused": Σ_i w_i up_i down_i diag(m_i).
    """

    def __init__(self, layer: nn.Module, parts: list[tuple[int, Factors]]):
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("merged low-rank hooks (zip, composed sampling): grouped convolutions are not supported")
        self.layer, self.mode = layer, None
        dev, dt = layer.weight.device, layer.weight.dtype
        self.parts = {i: (up.to(dev, dt), down.to(dev, dt)) for i, (up, down) in parts}
        # a layer that one input alone adapts is that input's own: its merger stays 1 (not learned)
        self.merger = {i: torch.ones(down.shape[1], device=dev, dtype=dt, requires_grad=len(parts) > 1)
                       for i, (_, down) in parts}
        self.handle = layer.register_forward_hook(self._hook)

    def _apply(self, x: Tensor, up: Tensor, down: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down.reshape(down.shape[0], *layer.weight.shape[1:]), None, layer.stride, layer.padding,
                         layer.dilation)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    def _hook(self, _module, args, out):
        if self.mode is None:
            return out
        if self.mode != "fused":
            if self.mode not in self.parts:
                return out
            up, down = self.parts[self.mode]
            return out + self._apply(args[0], up, down)
        for i, (up, down) in self.parts.items():
            out = out + self._apply(args[0], up, down * self.merger[i])
        return out

    def cosine_penalty(self) -> Tensor:
        terms = _abs_cosines(list(self.merger.values()))
        return torch.stack(terms).sum() if terms else self.layer.weight.new_zeros(())


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

    (Tried and dropped: also fitting joint prompts ("a sks star in qtz style") to a composed prediction. With
    every adapter on the whole prompt, ε̂_0 + Σ_i (ε̂_i − ε̂_0), sks + qtz kept 68 % of sks instead of 94 % and joint
    success fell from 6 % to 0 %. With each adapter on its own phrase (ε̂_0(p) + Σ_i (ε̂_i(view_i) − ε̂_0(neutral)),
    close to ``sdtune.compose``'s conditional) it kept 77 % and joint success was 3 %; on random adapters the
    fit moved the fused model's error to that target by 3 %, and fitting the factors too did not help: one static
    ΔW cannot route each concept to its phrase. Composed sampling does that at sampling time instead.)
    """
    from .data import Encoder, denoise

    options = options or ZipOptions()
    hooks = {name: MergedLayer(layer, parts) for name, (layer, parts) in layers.items()}
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
            penalty = sum(h.cosine_penalty() for h in hooks.values())
            opt.zero_grad(set_to_none=True)
            (loss + options.cos_weight * penalty).backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for h in hooks.values():
            h.handle.remove()
        for p, flag in grad_state.items():
            p.requires_grad_(flag)
    merger = {name: {i: m.detach().double().cpu() for i, m in h.merger.items()} for name, h in hooks.items()}
    return merger, losses


def mean_cosine(merger: Mapping[str, Mapping[int, Tensor]]) -> float:
    """Mean over shared layers and input pairs of |cos(m_{L,i}, m_{L,j})|: 1 at the start (the plain sum), lower
    as the learned merge moves the inputs onto different columns; nan when no layer is shared."""
    terms = [float(c) for ms in merger.values() for c in _abs_cosines(list(ms.values()))]
    return sum(terms) / len(terms) if terms else float("nan")
