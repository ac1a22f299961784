"""Pure tensor math of every sdtune adapter: tensors in, tensors out, no module state.

Notation (DESIGN.md): a Linear weight is W ∈ R^{out×in}; a Conv2d weight is W ∈ R^{out×in×kh×kw}. "Matricised"
means reshaped to out × (in·kh·kw). Every ΔW returned here has the base weight's shape, so that
``F.linear(x, W + ΔW)`` / ``F.conv2d(x, W + ΔW, …)`` is the adapted layer. The modules in this package call these
functions and never re-derive the maths themselves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (up (out, r), down (r, d)): a matricised ΔW = up @ down, d = in·kh·kw

# Singular values below RANK_TOL · σ_max are numerical zeros (float64 round-off of a rank-r product is ~1e-15).
RANK_TOL = 1e-9


def lora_delta(up: Tensor, down: Tensor, scale: float, mid: Tensor | None = None) -> Tensor:
    """LoRA / LoCon / Tucker-LoCon update (LoRA paper eq. 3; LyCORIS's Tucker form).

    Plain:  ΔW = scale · up @ down.flatten(1), reshaped to ``(out, *down.shape[1:])``
        up (out, r); down (r, in) for Linear or (r, in, kh, kw) for Conv2d (the base kernel on the down side).
    Tucker: ΔW[o, i, h, w] = scale · Σ_{a,b} up[o, a] · mid[a, b, h, w] · down[b, i]
        up (out, r1); mid (r1, r2, kh, kw); down (r2, in)  ->  ΔW (out, in, kh, kw).
    """
    if mid is None:
        return (scale * (up @ down.flatten(1))).reshape(up.shape[0], *down.shape[1:])
    return scale * torch.einsum("oa,abhw,bi->oihw", up, mid, down.flatten(1))


def fold_tucker(mid: Tensor, down: Tensor) -> Tensor:
    """The Tucker core folded into the down-projection, mid ×₂ downᵀ: D[a, i, h, w] = Σ_b mid[a, b, h, w]·down[b, i].

    mid (r1, r2, kh, kw); down (r2, in) or (r2, in, 1, 1)  ->  (r1, in, kh, kw), so up @ D is the Tucker ΔW.
    """
    return torch.einsum("abhw,bi->aihw", mid, down.flatten(1))


def pad_tucker(up: Tensor, mid: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A rectangular core (r1, r2, kh, kw) zero-padded to square (r, r, kh, kw), r = max(r1, r2), with up's columns
    (out, r1[, 1, 1]) and down's rows (r2, in[, 1, 1]) padded to match: the same ΔW (ComfyUI and LyCORIS reject
    rectangular cores). A square core is returned as it is."""
    r1, r2 = mid.shape[:2]
    if r1 == r2:
        return up, mid, down
    r = max(r1, r2)
    return (F.pad(up.movedim(1, -1), (0, r - r1)).movedim(-1, 1).contiguous(),
            F.pad(mid, (0, 0, 0, 0, 0, r - r2, 0, r - r1)),
            F.pad(down.movedim(0, -1), (0, r - r2)).movedim(-1, 0).contiguous())


def tucker_product(core: Tensor, factors: list[Tensor | None]) -> Tensor:
    """n-mode product G ×₁ A⁽¹⁾ ×₂ A⁽²⁾ … ×_N A⁽ᴺ⁾ (Kolda & Bader 2009, eq. 4.1) as one einsum.

    core (r₁, …, r_N); factors[n] (I_n, r_n), or None to leave mode n as it is  ->  (I₁, …, I_N). N ≤ 13.
    """
    if len(factors) != core.dim():
        raise ValueError(f"tucker_product: core has {core.dim()} modes but {len(factors)} factors were given")
    ranks = "abcdefghijklm"[: core.dim()]
    dims = "nopqrstuvwxyz"[: core.dim()]
    used = [(d + r, f) for d, r, f in zip(dims, ranks, factors) if f is not None]
    out = "".join(d if f is not None else r for d, r, f in zip(dims, ranks, factors))
    spec = ",".join([ranks] + [s for s, _ in used]) + "->" + out
    return torch.einsum(spec, core, *[f for _, f in used])


def flora_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    """FLoRA update (Si et al. 2024, eq. 6): ΔW = s · G ×₁ A ×₂ B [×₃ C ×₄ D].

    Linear: core (r₁, r₂), factors [A (out, r₁), B (in, r₂)]   ->  ΔW = s · A G Bᵀ (out, in).
    Conv2d: core (r₁, r₂, r₃, r₄), factors [A (out, r₁), B (in, r₂), C (kh, r₃), D (kw, r₄)]  ->  (out, in, kh, kw).
    """
    return scale * tucker_product(core, factors)


def cayley(q: Tensor) -> Tensor:
    """Cayley transform R = (I − Q)(I + Q)⁻¹ of a skew-symmetric Q (r, r); R is orthogonal and R = I at Q = 0.

    (I − Q) and (I + Q)⁻¹ commute (both are rational functions of Q), so R = solve(I + Q, I − Q).
    I + Q is always invertible for skew Q (its eigenvalues are 1 + iλ).
    """
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye + q, eye - q)


def skew_from_vector(v: Tensor, r: int) -> Tensor:
    """Skew-symmetric Q (r, r) from its r(r−1)/2 strictly-upper-triangular entries v (row-major)."""
    rows, cols = torch.triu_indices(r, r, offset=1, device=v.device)
    upper = torch.zeros(r, r, dtype=v.dtype, device=v.device).index_put((rows, cols), v)
    return upper - upper.T


def spectral_additive_delta(u1: Tensor, s1: Tensor, v1: Tensor, a_u: Tensor, a_v: Tensor) -> Tensor:
    """Additive spectral update on r singular columns, matricised (out, in·kh·kw).

    W′ = (U₁ + A_U) S₁ (V₁ + A_V)ᵀ + U₂S₂V₂ᵀ, so ΔW = W′ − W = (U₁ + A_U) S₁ A_Vᵀ + A_U S₁ V₁ᵀ (exactly rank ≤ 2r).
    u1 (out, r), s1 (r,), v1 (in', r), a_u (out, r), a_v (in', r).
    """
    return ((u1 + a_u) * s1) @ a_v.T + (a_u * s1) @ v1.T


def spectral_rotational_delta(u1: Tensor, s1: Tensor, v1: Tensor, r_u: Tensor, r_v: Tensor) -> Tensor:
    """Rotational spectral update: W′ = U₁R_U S₁ (V₁R_V)ᵀ + U₂S₂V₂ᵀ, so ΔW = U₁ (R_U S₁ R_Vᵀ − S₁) V₁ᵀ (rank ≤ r).

    u1 (out, r), s1 (r,), v1 (in', r), r_u, r_v (r, r) orthogonal (see ``cayley``)  ->  (out, in').
    """
    return u1 @ spectral_rotational_core(s1, r_u, r_v) @ v1.T


def spectral_rotational_core(s1: Tensor, r_u: Tensor, r_v: Tensor) -> Tensor:
    """M = R_U S₁ R_Vᵀ − S₁ (r, r), the core of the rotational update ΔW = U₁ M V₁ᵀ."""
    return (r_u * s1) @ r_v.T - torch.diag(s1)


def channel_norm(weight: Tensor, axis: str) -> Tensor:
    """Frobenius norm of each output ("out") or input ("in") channel, shaped to broadcast against ``weight``.

    axis "out": ‖W[o, …]‖ -> (out, 1[, 1, 1]);  axis "in": ‖W[:, i, …]‖ -> (1, in[, 1, 1]). No epsilon (A1111's
    rebuild has none, and sdtune must reproduce it bit-for-bit in form).
    """
    if axis == "out":
        return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    if axis == "in":
        return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    raise ValueError(f"channel_norm: axis must be 'in' or 'out', got {axis!r}")


def squared_channel_norm(weight: Tensor, axis: str) -> Tensor:
    """‖W[o, …]‖² ("out", shape (out,)) or ‖W[:, i, …]‖² ("in", shape (in,)), accumulated in float32 (float64 for
    float64 weights)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    dims = tuple(d for d in range(w.dim()) if d != (0 if axis == "out" else 1))
    return w.pow(2).sum(dims)


def lowrank_channel_norm(weight: Tensor, weight_sq: Tensor, up: Tensor, mid: Tensor | None, down: Tensor,
                         scale: float, axis: str) -> Tensor:
    """‖W + ΔW‖ per channel of ``axis`` for a LoRA-form ΔW = scale · up @ [mid] @ down, without building W + ΔW.

    With D the down kernel matricised to (R, in, k) (Tucker: D = mid ∘ down; k = kh·kw, 1 for Linear) and
    s = scale, expanding the square gives, per input channel i and output channel o:
      ‖W[:, i] + ΔW[:, i]‖² = ‖W[:, i]‖² + 2s Σ_{r,p} D[r,i,p] (upᵀW)[r,i,p] + s² Σ_p D[:,i,p]ᵀ (upᵀup) D[:,i,p]
      ‖W[o] + ΔW[o]‖²       = ‖W[o]‖²    + 2s up[o]·(W Dᵀ)[o]                + s² up[o]ᵀ (D Dᵀ) up[o]
    The one large product (upᵀW or W Dᵀ) reads W once and writes R·in·k (or out·R) numbers; building
    W + ΔW and reducing it writes and reads four full-size weights, which dominated DoRA's step time.
    weight_sq = ``squared_channel_norm(weight, axis)`` (cached by the caller: W is frozen); its dtype is the
    accumulation dtype. Returns the norm shaped like ``channel_norm`` ((out, 1[, 1, 1]) or (1, in[, 1, 1])),
    exact up to rounding of the expansion (float32: relative error ~1e-6 of ‖W‖² while ΔW is not close to −W).
    """
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    acc = weight_sq.dtype
    up = up.to(acc)
    if mid is not None:
        down = fold_tucker(mid.to(acc), down.to(acc))
    d = down.to(acc).reshape(down.shape[0], in_ch, -1)                      # (R, in, k)
    w2 = weight.reshape(out_ch, -1)                                          # (out, in·k)
    if axis == "in":
        m = (up.to(weight.dtype).T @ w2).to(acc).view_as(d)                  # (R, in, k)
        cross = (d * m).sum((0, 2))
        gram = up.T @ up
        quad = (d * (gram @ d.flatten(1)).view_as(d)).sum((0, 2))
        shape = (1, in_ch, *[1] * (weight.dim() - 2))
    else:
        df = d.flatten(1)                                                    # (R, in·k)
        n = (w2 @ df.to(weight.dtype).T).to(acc)                             # (out, R)
        cross = (up * n).sum(1)
        quad = ((up @ (df @ df.T)) * up).sum(1)
        shape = (out_ch, *[1] * (weight.dim() - 1))
    sq = weight_sq + (2 * scale) * cross + (scale * scale) * quad
    return sq.clamp_min(0).sqrt().reshape(shape)


def dora_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, axis: str, detach_norm: bool = True) -> Tensor:
    """DoRA effective weight (Liu et al. 2024, eq. 5): W′ = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per channel of ``axis``.

    weight, delta: the base weight's shape; magnitude: broadcastable to it ((out,1,…) or (1,in,…)).
    ``detach_norm`` treats the norm as a constant in the backward pass (paper §4.3: saves memory, no accuracy loss).
    """
    merged = weight + delta
    norm = channel_norm(merged, axis)
    if detach_norm:
        norm = norm.detach()
    return merged * (magnitude / norm)


def all_finite(t: Tensor) -> bool:
    """True if no element is inf/NaN: one reduction without a full-size bool temporary (NaN and ±inf propagate
    through the sum; accumulated in fp32/fp64 so that half-precision sums cannot overflow)."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))


def merged_weight(weight: Tensor, delta: Tensor, what: str) -> Tensor:
    """W + ΔW as a new tensor (in the inputs' promoted dtype), refused when any element is not finite: PEFT's safe
    merge, and sdtune's one merge rule (``Adapter.merge``, applied files, merged checkpoints, ``fuse
    --merged-model``). Raises ValueError "<what>: merging gives non-finite weights; nothing was changed"."""
    new = weight + delta
    if not all_finite(new):
        raise ValueError(f"{what}: merging gives non-finite weights; nothing was changed")
    return new


def keep_rank(s: Tensor, rank: int | None = None, tol: float = RANK_TOL) -> int:
    """How many of the descending singular values ``s`` to keep: those above tol·σ_max, at most ``rank``."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    k = int((s > tol * s[0]).sum())
    return min(k, rank) if rank is not None else k


def dropped_share(s: Tensor, k: int) -> float:
    """‖σ_{k+1…}‖ / ‖σ‖: the relative Frobenius error of truncating to rank k (Eckart–Young)."""
    total = s.square().sum()
    return float((s[k:].square().sum() / total).sqrt()) if total > 0 else 0.0


def factorize(delta: Tensor, rank: int | None = None, tol: float = RANK_TOL) -> tuple[Tensor, Tensor, float]:
    """Balanced factors of a dense matricised ΔW (out, d) by truncated SVD: up = U_k√Σ_k (out, k), down = √Σ_k V_kᵀ
    (k, d), k = ``keep_rank``; returns (up, down, ``dropped_share``)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = keep_rank(s, rank, tol)
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], dropped_share(s, k)


def orthogonal_basis_rows(dim: int, start: int, count: int, seed: int) -> Tensor:
    """Rows [start, start+count) of one seeded random orthogonal basis of R^dim (float64, (count, dim)).

    The basis is Gram–Schmidt (classical, applied twice: "twice is enough", orthogonal to ~1e-15) of Gaussian
    rows g_0, g_1, … drawn one row per call from ``torch.Generator().manual_seed(seed)``. Row j depends only on
    g_0 … g_j, so any two calls with the same (dim, seed) agree on every row both produce: concepts that take
    disjoint row ranges of the same basis get exactly orthogonal subspaces (Orthogonal Adaptation, Po et al.
    2023). Needs start + count ≤ dim.
    """
    if start < 0 or count < 1 or start + count > dim:
        raise ValueError(f"orthogonal_basis_rows: rows [{start}, {start + count}) do not fit a basis of R^{dim}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(start + count, dim, dtype=torch.float64)
    for j in range(start + count):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        for _ in range(2):
            v = v - rows[:j].T @ (rows[:j] @ v)
        rows[j] = v / v.norm()
    return rows[start:]


def orthogonal_basis_pick(dim: int, count: int, seed: int, pick: int) -> Tensor:
    """``count`` rows drawn at random (the draw seeded by ``pick``) from one seeded random orthogonal basis of R^dim
    (float64, (count, dim)): the uncoordinated form of Orthogonal Adaptation's shared basis (Po et al. 2024, the
    "randomized orthogonal basis"). The basis is Q of the QR decomposition of a seeded Gaussian (dim, dim), signs
    fixed by R's diagonal so that it is unique; two picks share a row only where their draws collide.
    """
    if not 1 <= count <= dim:
        raise ValueError(f"orthogonal_basis_pick: {count} rows do not fit a basis of R^{dim}")
    gauss = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    basis = (q * torch.sign(torch.diagonal(r))).T
    rows = torch.randperm(dim, generator=torch.Generator().manual_seed(pick))[:count]
    return basis[rows]
