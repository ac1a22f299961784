"""LoCon / LoRA (Hu et al. 2021; LyCORIS's conv extension), optionally in Tucker form for k×k convs.

ΔW = (α/r) · up @ down  (rsLoRA: α/√r). Conv: ``down`` has the base kernel (r, in, kh, kw) and is run with the base
stride/padding/dilation; ``up`` is 1×1 (out, r). Tucker (k > 1): down (r, in) 1×1, mid (r, r, kh, kw) k×k,
up (out, r) 1×1. ``up`` starts at zero, the others kaiming-uniform (a=√5, as LoRA's reference code), so ΔW = 0.
Trainable parameters: r·(out + in·kh·kw) plain; r·(out + in) + r²·kh·kw Tucker.
Orthogonal LoCon (``spec.ortho_basis_seed``): ``down`` is a frozen buffer, rows [k·r, (k+1)·r) of a seeded random
orthogonal basis of R^{in·kh·kw} (``functional.orthogonal_basis_rows``) scaled by 1/√3, the row norm kaiming-uniform
gives (variance 1/(3·fan_in) per entry), so training behaves as plain LoCon's; trainable parameters r·out.
With ``spec.ortho_pick`` "random" the r rows are drawn from the whole basis instead (``orthogonal_basis_pick``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as Fn
from .base import AdapterSpec, LayerInfo, LowRank, check_rank


def _kaiming(shape: tuple[int, ...], like: Tensor) -> nn.Parameter:
    t = torch.empty(shape, device=like.device, dtype=like.dtype)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return nn.Parameter(t)


def validate(info: LayerInfo, spec: AdapterSpec, name: str) -> None:
    if spec.ortho_basis_seed is not None and spec.ortho_pick == "block":
        check_rank(name, f"orthogonal LoCon index {spec.ortho_index} needs (ortho_index+1)·rank =",
                   (spec.ortho_index + 1) * spec.rank, info.fan_in)
    tucker = spec.tucker and info.spatial
    limit = min(info.out, info.inp) if tucker or not info.is_conv else min(info.out, info.fan_in)
    check_rank(name, "LoCon rank", spec.rank, limit)


class LoCon(LowRank):
    def __init__(self, info: LayerInfo, spec: AdapterSpec, weight: Tensor):
        super().__init__(info, spec)
        r = spec.rank
        self.tucker = spec.tucker and info.spatial
        self.scale = spec.lora_scale
        if self.tucker:
            self.down = _kaiming((r, info.inp), weight)
            self.mid = _kaiming((r, r, *info.kernel), weight)
        elif spec.ortho_basis_seed is not None:
            rows = Fn.orthogonal_basis_rows(info.fan_in, spec.ortho_index * r, r, spec.ortho_basis_seed) \
                if spec.ortho_pick == "block" else \
                Fn.orthogonal_basis_pick(info.fan_in, r, spec.ortho_basis_seed, spec.ortho_index)
            self.register_buffer("down", (rows / math.sqrt(3)).reshape(r, *weight.shape[1:])
                                 .to(device=weight.device, dtype=weight.dtype))
            self.mid = None
        else:
            self.down = _kaiming((r, *weight.shape[1:]), weight)
            self.mid = None
        self.up = nn.Parameter(torch.zeros(info.out, r, device=weight.device, dtype=weight.dtype))

    def delta(self) -> Tensor:
        d = Fn.lora_delta(self.up, self.down, self.scale, self.mid)
        return d

    def lora_form(self):
        return self.up, self.mid, self.down, self.scale

    @property
    def form_rank(self) -> int:
        return self.spec.rank
