"""Rank reduction of low-rank updates without forming them densely: pure tensor maths, no files, no modules.

Rank rules (``choose_rank``), with kohya sd-scripts' ``networks/resize_lora.py`` meanings, on the singular values
σ₁ ≥ σ₂ ≥ … of the layer's matricised ΔW (out × in·kh·kw):
  rank           k = R
  sv_ratio       keep σ_i > σ₁ / p                      (p ≥ 1: the largest kept-to-dropped ratio)
  sv_cumulative  the smallest k with Σ_{i≤k} σ_i ≥ p·Σ σ_i
  sv_fro         the smallest k with ‖σ_{≤k}‖₂ ≥ p·‖σ‖₂   (p: the retained Frobenius share of ΔW)
and LyCORIS's ``extract_locon`` modes (``lycoris.utils.extract_linear``):
  threshold      keep σ_i > p                           (absolute)
  ratio          keep σ_i > p·σ₁                        (0 ≤ p ≤ 1)
  quantile       k = #{k : Σ_{i≤k} σ_i < p·Σ σ_i}       (0 ≤ p ≤ 1; one below ``sv_cumulative``'s k)
k is at least 1 and at most ``max_rank``; unlike kohya it may equal the full rank (kohya caps dynamic ranks one
below), so a stated ``sv_fro`` share is always met unless ``max_rank`` cuts it.

Truncation keeps each layer's form. LoRA / LoCon (ΔW = up·down): the SVD through the factors
(``fusion.math.svd_factors``: QR of each factor and an r×r SVD, O((out + d)·r²)), truncated to rank k, which is the
Eckart–Young optimum a dense SVD of ΔW attains. Tucker (ΔW = mid ×₁ up ×₂ downᵀ): with up = Q₁R₁, downᵀ = Q₂R₂ the
core C = mid ×₁ R₁ ×₂ R₂ (r₁ × r₂ × kh × kw) carries every singular value of ΔW (its mode-1 unfolding has
ΔW's σ); it is truncated by HOSVD to a square (k, k) core, which keeps the Tucker form (and the portable square core)
at an error a little above the matricised optimum. DoRA: the magnitude is refitted to the truncated direction
(``refit_magnitude``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..fusion.math import svd_factors

RULES = ("rank", "sv_ratio", "sv_cumulative", "sv_fro", "threshold", "ratio", "quantile")


def check_rule(rule: str, param: float) -> None:
    """One clear error for a rule/parameter pair that means nothing."""
    if rule not in RULES:
        raise ValueError(f"unknown rank rule {rule!r}; expected one of {RULES}")
    if rule == "rank" and (param < 1 or int(param) != param):
        raise ValueError(f"--rank needs a whole number ≥ 1, got {param}")
    if rule == "sv_ratio" and param < 1:
        raise ValueError(f"sv_ratio needs a ratio ≥ 1 (σ₁/σ_k kept), got {param}")
    if rule in ("sv_cumulative", "sv_fro") and not 0 < param <= 1:
        raise ValueError(f"{rule} needs a share in (0, 1], got {param}")
    if rule in ("ratio", "quantile") and not 0 <= param <= 1:
        raise ValueError(f"{rule} needs a value in [0, 1], got {param}")
    if rule == "threshold" and param < 0:
        raise ValueError(f"threshold needs a singular value ≥ 0, got {param}")


def choose_rank(s: Tensor, rule: str, param: float, max_rank: int | None = None) -> int:
    """The rank ``rule`` keeps of the descending singular values ``s`` (module docstring)."""
    check_rule(rule, param)
    n = int(s.numel())
    if n == 0 or s[0] <= 0:
        return 0
    if rule == "rank":
        k = int(param)
    elif rule == "sv_ratio":
        k = int((s > s[0] / param).sum())
    elif rule == "threshold":
        k = int((s > param).sum())
    elif rule == "ratio":
        k = int((s > s[0] * param).sum())
    elif rule == "quantile":
        k = int((torch.cumsum(s, 0) < param * s.sum()).sum())
    else:
        values = s if rule == "sv_cumulative" else s.square()
        target = param if rule == "sv_cumulative" else param ** 2
        share = torch.cumsum(values, 0) / values.sum()
        k = int(torch.searchsorted(share, torch.tensor(target, dtype=share.dtype) * (1 - 1e-12))) + 1
    k = max(1, min(k, n))
    return min(k, max_rank) if max_rank is not None else k


def truncate_dense(delta: Tensor, rule: str, param: float, max_rank: int | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """A dense matricised ΔW (out, d) → balanced rank-k factors (up (out, k), down (k, d)) and all its singular
    values (for the captured energy Σ_{i≤k} σ_i² / Σ σ_i²)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    up, down = _balanced(u, s, vh, choose_rank(s, rule, param, max_rank))
    return up, down, s


def _balanced(left: Tensor, s: Tensor, right_t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(L_k √Σ_k, √Σ_k Rᵀ_k) of an SVD L Σ Rᵀ (``right_t`` = Rᵀ)."""
    root = s[:k].sqrt()
    return left[:, :k] * root, root[:, None] * right_t[:k]


def retained(s: Tensor, k: int) -> float:
    """‖σ_{≤k}‖ / ‖σ‖: the Frobenius share of ΔW a rank-k truncation keeps."""
    total = s.square().sum()
    return float((s[:k].square().sum() / total).sqrt()) if total > 0 else 1.0


def truncate_lora(up: Tensor, down: Tensor, rule: str, param: float, max_rank: int | None = None
                  ) -> tuple[Tensor, Tensor, float]:
    """ΔW = up (out, r) @ down (r, d) → balanced rank-k factors (up′ = L_k√Σ_k, down′ = √Σ_k R_kᵀ) and the retained
    share; the best rank-k approximation (Eckart–Young), computed through the factors."""
    left, s, right = svd_factors(up, down)
    k = choose_rank(s, rule, param, max_rank)
    return *_balanced(left, s, right.T, k), retained(s, k)


def _mode_basis(core: Tensor, mode: int) -> tuple[Tensor, Tensor]:
    """Left singular vectors and values of the mode-``mode`` unfolding of a (r₁, r₂, kh, kw) core."""
    unfolded = core.movedim(mode, 0).reshape(core.shape[mode], -1)
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    return u, s


def truncate_tucker(up: Tensor, mid: Tensor, down: Tensor, rule: str, param: float, max_rank: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, float]:
    """ΔW[o,i,k,l] = Σ up[o,m]·mid[m,n,k,l]·down[n,i] (up (out, r₁), mid (r₁, r₂, kh, kw), down (r₂, in)) → the
    same form with a square (k, k) core by HOSVD of the QR-reduced core; returns (up′, mid′, down′, retained share).
    k follows ``rule`` on ΔW's singular values; for ``sv_fro`` k grows until the share is met (HOSVD keeps a little
    less than the matricised optimum)."""
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    core = torch.einsum("mnkl,am,bn->abkl", mid, r1, r2)
    u1, s = _mode_basis(core, 0)
    u2, _ = _mode_basis(core, 1)
    total = core.norm()
    limit = min(u1.shape[1], u2.shape[1])
    k = min(choose_rank(s, rule, param, max_rank), limit)

    def cut(k: int) -> tuple[Tensor, float]:
        small = torch.einsum("abkl,am,bn->mnkl", core, u1[:, :k], u2[:, :k])
        return small, float(small.norm() / total) if total > 0 else 1.0

    small, share = cut(k)
    while rule == "sv_fro" and share < param * (1 - 1e-12) and k < limit and (max_rank is None or k < max_rank):
        k += 1
        small, share = cut(k)
    return q1 @ u1[:, :k], small, (q2 @ u2[:, :k]).T, share


def refit_magnitude(weight: Tensor, delta: Tensor, target: Tensor, axis: str) -> Tensor:
    """DoRA magnitude m′ for a new ΔW: with the direction D = (W+ΔW)/‖W+ΔW‖ (unit norm per channel of ``axis``),
    the m′ minimising ‖m′ ⊙ D − target‖_F is m′ = ⟨D, target⟩ per channel (``target``: the merged weight W′ the
    original file gives). Shape (1, in, 1…) for ``axis="in"``, (out, 1, 1…) for ``"out"``."""
    merged = weight + delta
    keep = 1 if axis == "in" else 0
    dims = [d for d in range(merged.dim()) if d != keep]
    direction = merged / torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
    return (direction * target).sum(dim=dims, keepdim=True)
