"""FLoRA (Si et al. 2024, "FLoRA: Low-Rank Core Space for N-dimension"): a Tucker core with one factor per mode.

Conv2d: ΔW = s · G ×₁ A ×₂ B ×₃ C ×₄ D with G (r₁, r₂, r₃, r₄), A (out, r₁), B (in, r₂), C (kh, r₃), D (kw, r₄);
Linear: ΔW = s · A G Bᵀ. Parameters r₁r₂r₃r₄ + out·r₁ + in·r₂ + kh·r₃ + kw·r₄ (linear: r₁r₂ + out·r₁ + in·r₂).
Init: A = 0 (so ΔW = 0); B, C, D with orthonormal columns; G ~ N(0, 1/(3·r₂r₃r₄)), which gives the folded
down-projection G ×₂ B ×₃ C ×₄ D the variance of LoCon's kaiming-uniform down (see AdapterSpec.scale).
Fast path (LoRA form): C and D fold into the core, mid = G ×₃ C ×₄ D (r₁, r₂, kh, kw); the bypass runs
1×1 (Bᵀ) -> k×k (mid, base stride/padding) -> 1×1 (A). For Linear and 1×1 convs the core folds into the down.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as Fn
from .base import AdapterSpec, LayerInfo, LowRank, check_rank


def ranks_for(info: LayerInfo, spec: AdapterSpec) -> tuple[int, ...]:
    if spec.flora_ranks is not None:
        return spec.flora_ranks
    if info.is_conv:
        return (spec.rank, spec.rank, min(info.kernel[0], 2), min(info.kernel[1], 2))
    return (spec.rank, spec.rank)


def validate(info: LayerInfo, spec: AdapterSpec, name: str) -> None:
    ranks = ranks_for(info, spec)
    dims = (info.out, info.inp, *info.kernel) if info.is_conv else (info.out, info.inp)
    if len(ranks) != len(dims):
        raise ValueError(f"{name}: flora_ranks {ranks} has {len(ranks)} entries but the layer weight has "
                         f"{len(dims)} modes")
    for mode, (r, d) in enumerate(zip(ranks, dims), start=1):
        check_rank(name, f"FLoRA rank r{mode}", r, d)


def _orthonormal(rows: int, cols: int, like: Tensor) -> nn.Parameter:
    t = torch.empty(rows, cols, device=like.device, dtype=like.dtype)
    nn.init.orthogonal_(t)
    return nn.Parameter(t)


class FLoRA(LowRank):
    def __init__(self, info: LayerInfo, spec: AdapterSpec, weight: Tensor):
        super().__init__(info, spec)
        self.ranks = ranks_for(info, spec)
        self.scale = spec.flora_scale
        r1, r2 = self.ranks[:2]
        self.core = nn.Parameter(torch.randn(self.ranks, device=weight.device, dtype=weight.dtype)
                                 / math.sqrt(3 * math.prod(self.ranks[1:])))
        self.a_out = nn.Parameter(torch.zeros(info.out, r1, device=weight.device, dtype=weight.dtype))
        self.a_in = _orthonormal(info.inp, r2, weight)
        if info.is_conv:
            self.a_kh = _orthonormal(info.kernel[0], self.ranks[2], weight)
            self.a_kw = _orthonormal(info.kernel[1], self.ranks[3], weight)

    def _factors(self) -> list[Tensor]:
        return [self.a_out, self.a_in, self.a_kh, self.a_kw] if self.info.is_conv else [self.a_out, self.a_in]

    def delta(self) -> Tensor:
        return Fn.flora_delta(self.core, self._factors(), self.scale)

    def lora_form(self):
        if not self.info.is_conv:
            return self.a_out, None, self.core @ self.a_in.T, self.scale
        mid = Fn.tucker_product(self.core, [None, None, self.a_kh, self.a_kw])   # (r1, r2, kh, kw)
        if self.info.spatial:
            return self.a_out, mid, self.a_in.T, self.scale
        return self.a_out, None, (mid[:, :, 0, 0] @ self.a_in.T)[:, :, None, None], self.scale

    @property
    def form_rank(self) -> int:
        return max(self.ranks[:2])
