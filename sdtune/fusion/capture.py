"""Activations of a model's layers while it denoises prompts: what fusion measures interference on (and regmean
fits), as matricised input columns."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..apply import find_layers


@torch.no_grad()
def capture_activations(model, prompts: Sequence[str], names: Sequence[str], *, columns: int = 256,
                        steps: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """{kohya name: x (fan_in, ≤ columns)}: inputs of the named layers while the base model denoises ``prompts``
    (``steps`` steps, no guidance, latents only), as matricised columns (a conv's unfolded patches), sub-sampled
    uniformly at random (seeded)."""
    layers = find_layers(model.components(), model.arch, names)
    gen = torch.Generator().manual_seed(seed)
    store: dict[str, list[Tensor]] = {}
    handles = []

    def hook(name, layer):
        def pre(_module, args):
            x = args[0].detach().float()
            if isinstance(layer, nn.Conv2d):
                cols = F.unfold(x if x.dim() == 4 else x[None], layer.kernel_size, layer.dilation, layer.padding,
                                layer.stride).transpose(1, 2).reshape(-1, layer.weight[0].numel())
            else:
                cols = x.reshape(-1, x.shape[-1])
            if cols.shape[0] > columns:
                cols = cols[torch.randperm(cols.shape[0], generator=gen)[:columns]]
            store.setdefault(name, []).append(cols)
        return pre

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(hook(name, layer)))
        model.pipeline(list(prompts), num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                       generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, chunks in store.items():
        cols = torch.cat(chunks)
        if cols.shape[0] > columns:
            cols = cols[torch.randperm(cols.shape[0], generator=gen)[:columns]]
        out[name] = cols.T.contiguous()
    return out
