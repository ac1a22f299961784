"""Pure tensor maths of multi-adapter fusion: factors in, factors out, no files and no modules.

Every update is a *matricised* ΔW ∈ R^{out×d} (d = fan-in = in·kh·kw for a conv) held as factors
``(up, down)`` with ΔW = up @ down, up (out, r), down (r, d): low-rank adapters stay low-rank through every
method, so nothing of size out×d is formed (dense inputs, such as LoHa or DoRA layers, arrive already factored by
``sdtune.apply``).
Adapter i enters at weight w_i, so its target update is w_i·ΔW_i. Notation for subspaces: U_i (out, k) and
V_i (d, k) are orthonormal bases of the dominant column (output) and row (input) space of ΔW_i; P_S = S Sᵀ.
Computations are meant for float64 (the callers convert).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..adapters.functional import RANK_TOL, Factors, dropped_share, keep_rank


# ------------------------------------------------------------------------------------------ factor algebra

def svd_factors(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW = up @ down without forming ΔW: returns L (out, r), σ (r,), R (d, r) with ΔW = L diag(σ) Rᵀ.

    up = Q₁R₁, downᵀ = Q₂R₂ (QR), R₁R₂ᵀ = Y Σ Zᵀ (an r×r SVD)  =>  ΔW = (Q₁Y) Σ (Q₂Z)ᵀ. Cost O((out + d)·r²).
    """
    q1, r1 = torch.linalg.qr(up)
    q2, r2 = torch.linalg.qr(down.T)
    y, s, zh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ y, s, q2 @ zh.T


def compact(up: Tensor, down: Tensor, rank: int | None = None, tol: float = RANK_TOL) -> tuple[Tensor, Tensor, float]:
    """Re-factor ΔW = up @ down at its numerical rank (σ > tol·σ_max), truncated to ``rank`` if given.

    Returns (up′, down′, err) with up′ = L√Σ, down′ = √Σ Rᵀ (balanced) and err = ‖ΔW − up′down′‖_F / ‖ΔW‖_F
    (Eckart–Young: the root of the dropped σ² over all σ²; 0 up to round-off when only numerical zeros go).
    """
    left, s, right = svd_factors(up, down)
    k = keep_rank(s, rank, tol)
    root = s[:k].sqrt()
    return left[:, :k] * root, root[:, None] * right[:, :k].T, dropped_share(s, k)


def concat(parts: list[Factors], weights: list[float]) -> Factors:
    """Exact weighted sum in factor form: Σ w_i·up_i down_i = [w₁up₁ … w_n up_n] @ [down₁; …; down_n] (ranks add)."""
    return (torch.cat([w * up for (up, _), w in zip(parts, weights)], dim=1),
            torch.cat([down for _, down in parts], dim=0))


def dense(f: Factors) -> Tensor:
    return f[0] @ f[1]


def norm(f: Factors) -> float:
    """‖up @ down‖_F without forming the product (the root of Σσ² of ``svd_factors``)."""
    return float(svd_factors(*f)[1].square().sum().sqrt())


# ----------------------------------------------------------------------------------------------- subspaces

def dominant_bases(up: Tensor, down: Tensor, energy: float = 1.0, tol: float = RANK_TOL) -> tuple[Tensor, Tensor]:
    """(U, V): orthonormal bases of the output and input subspaces holding ``energy`` of ‖ΔW‖_F².

    k is the smallest count of leading singular triples with Σ_{j≤k} σ_j² ≥ energy · Σ σ² (all non-zero ones
    at energy = 1). U (out, k), V (d, k).
    """
    left, s, right = svd_factors(up, down)
    n = keep_rank(s, None, tol)
    if n == 0:
        return left[:, :0], right[:, :0]
    cum = torch.cumsum(s[:n].square(), 0)
    k = n if energy >= 1.0 else min(n, int((cum < energy * cum[-1]).sum()) + 1)
    return left[:, :k], right[:, :k]


def span(bases: list[Tensor], dim: int, dtype=torch.float64) -> Tensor:
    """Orthonormal basis (dim, k) of the span of the columns of ``bases`` (numerically dependent ones dropped)."""
    cols = [b for b in bases if b.shape[1]]
    if not cols:
        return torch.zeros(dim, 0, dtype=dtype)
    u, s, _ = torch.linalg.svd(torch.cat(cols, dim=1), full_matrices=False)
    return u[:, : int((s > 1e-8 * s[0]).sum())] if s.numel() and s[0] > 0 else u[:, :0]


def project(f: Factors, out_basis: Tensor | None = None, in_basis: Tensor | None = None) -> Factors:
    """(I − P_out) ΔW (I − P_in) in factor form: up ← up − Q(Qᵀup), down ← down − (down P)Pᵀ. Rank unchanged."""
    up, down = f
    if out_basis is not None and out_basis.shape[1]:
        up = up - out_basis @ (out_basis.T @ up)
    if in_basis is not None and in_basis.shape[1]:
        down = down - (down @ in_basis) @ in_basis.T
    return up, down


# ------------------------------------------------------------------------------------------------- methods

def orthogonal_parts(parts: list[Factors], weights: list[float], *, sides: str = "in", mode: str = "symmetric",
                     energy: float = 1.0) -> list[Factors]:
    """Post-hoc orthogonalisation: the weighted parts w_i·ΔW_i′, each kept off the others' dominant subspaces.

    sides "in" protects input (row) subspaces, "out" output (column) subspaces, "both" both. For the input side
    with mode "symmetric" (every adapter treated alike):

        ΔW_i′ = w_i · (I − P_{U¬i}) ΔW_i (I − P_{V¬i}),   V¬i = span{V_j : j ≠ i}  (U¬i likewise, "out"/"both")

    - Input side — why: for x in concept i's protected input subspace span(V_i), every other part gives
      ΔW_j′x = 0 exactly, so W_fused·x = W·x + ΔW_i′x ≈ W_i·x (the concept's own layer output). The cost is the
      self-distortion ΔW_i P_{V¬i} x, which is *second* order in the subspace overlap (P_{V¬i}x is first order, and
      ΔW_i only sees its component back inside V_i), whereas a plain sum's crosstalk ΔW_j x is first order. It does
      not shrink with w_j, though: a weak adapter still takes its subspace out of a strong one (``regmean_parts``
      balances strengths; mode "sequential" lets the user rank them).
    - Output side — why: U_iᵀΔW_j′ = 0, so no other adapter writes into the directions concept i writes to: for
      every input x, ⟨ΔW_i x, ΔW_j′x⟩ = 0 (nothing cancels or amplifies i's edit seen by the next layer).
    mode "sequential" (priority = list order) projects against the *fused* parts already placed:

        ΔW_j′ = w_j · (I − P_{U<j}) ΔW_j (I − P_{V<j}),   V<j = span of the dominant row spaces of ΔW_1′ … ΔW_{j−1}′

      which leaves ΔW_1′ = w₁ΔW₁ untouched and makes the fused parts mutually orthogonal on the chosen sides:
      ΔW_i′ΔW_j′ᵀ = 0 ("in"), ΔW_i′ᵀΔW_j′ = 0 ("out"), exactly at energy = 1 (else bounded by the unprotected
      tail of the earlier parts).
    ``energy``: the fraction of each ‖ΔW_i‖_F² whose singular subspace is protected (1 = its whole row/column
    space). Ranks are unchanged; ``concat`` + ``compact`` of the result gives the fused factors.
    """
    if sides not in ("in", "out", "both"):
        raise ValueError(f"orthogonal: sides must be 'in', 'out' or 'both', got {sides!r}")
    if mode not in ("symmetric", "sequential"):
        raise ValueError(f"orthogonal: mode must be 'symmetric' or 'sequential', got {mode!r}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"orthogonal: energy must be in (0, 1], got {energy}")
    use_out, use_in = sides in ("out", "both"), sides in ("in", "both")
    out_dim, in_dim = parts[0][0].shape[0], parts[0][1].shape[1]
    weighted = [(w * up, down) for (up, down), w in zip(parts, weights)]
    if mode == "symmetric":
        bases = [dominant_bases(*f, energy) for f in weighted]
        fused = []
        for i, f in enumerate(weighted):
            others = [b for j, b in enumerate(bases) if j != i]
            fused.append(project(f, span([u for u, _ in others], out_dim) if use_out else None,
                                 span([v for _, v in others], in_dim) if use_in else None))
        return fused
    fused, placed_u, placed_v = [], [], []
    for f in weighted:
        g = project(f, span(placed_u, out_dim) if use_out else None, span(placed_v, in_dim) if use_in else None)
        fused.append(g)
        u, v = dominant_bases(*g, energy)
        placed_u.append(u)
        placed_v.append(v)
    return fused


def regmean_parts(parts: list[Factors], weights: list[float], inputs: list[Tensor | None],
                  ridge: float = 0.1) -> Factors:
    """RegMean (Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models", §3) on
    low-rank updates: the ΔW that best reproduces every concept's own layer output, in least squares,

        ΔW_m = argmin Σ_i ‖ΔW Z_i − w_iΔW_i Z_i‖²  =  (Σ_i w_iΔW_i G_i)(Σ_i G_i + λI)⁻¹,   G_i = Z_iZ_iᵀ,

    Z_i = [V_i / ‖w_iΔW_i V_i‖, X_i / ‖w_iΔW_i X_i‖]: concept i's own row space V_i (always: keeps ΔW_m ≈ w_iΔW_i
    on the inputs the adapter reads) plus its captured activations X_i (d, n) when given. Dividing by
    ‖w_iΔW_i Z‖ makes each term concept i's *relative* interference, so concepts of different strength are
    balanced. Everything lives in S = span(Z_1 … Z_n) (d, K): ΔW_m = up_m Sᵀ with
    up_m = (Σ_i w_i up_i down_i S g_i)(Σ_i g_i + λI)⁻¹, g_i = (SᵀZ_i)(SᵀZ_i)ᵀ, λ = ridge·tr(Σg)/K — no d×d matrix.
    The ridge matters: measured on *held-out* activations of two concepts on the micro model, ridge 1e-6 fitted
    the capture and amplified everything else (interference 20, and 137 without activations: nearly dependent
    row spaces), while ridge 0.1 gave 0.23 (0.26 without activations) against 1.0 for the plain sum.
    """
    d = parts[0][1].shape[1]
    zs = []
    for (up, down), w, x in zip(parts, weights, inputs):
        cols = []
        for z in [span([down.T], d, down.dtype)] + ([x] if x is not None else []):
            scale = float((w * up @ (down @ z)).norm())
            if scale > 0:
                cols.append(z / scale)
        zs.append(torch.cat(cols, 1) if cols else down.new_zeros(d, 0))
    s = span(zs, d, parts[0][1].dtype)
    gs = [(s.T @ z) @ (s.T @ z).T for z in zs]
    g = sum(gs)
    lam = ridge * float(g.diagonal().sum()) / max(1, g.shape[0])
    num = sum(w * up @ ((down @ s) @ gi) for (up, down), w, gi in zip(parts, weights, gs))
    up_m = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), num.T).T
    return up_m, s.T.contiguous()


# ------------------------------------------------------------------------------------------- measurements

def row_space_inputs(down: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """n random inputs (d, n) from an adapter's own input space: x = V c, V an orthonormal basis of the row
    space of ``down`` (d, r ≥ numerical rank), c ~ N(0, I). The stand-in for concept activations."""
    v = span([down.T], down.shape[1], down.dtype)
    c = torch.randn(v.shape[1], n, generator=generator, dtype=down.dtype)
    return v @ c


def interference(fused: Factors, own: Factors | None, x: Tensor) -> tuple[float, float]:
    """(‖W_fused·x − W_i·x‖², ‖ΔW_i·x‖²) summed over the columns of x (d, n), with W_fused = W + ΔW_fused and
    W_i = W + ΔW_i (``own`` is the weighted w_i·ΔW_i; None where concept i has no adapter on the layer).
    W cancels: the numerator is ‖(ΔW_fused − ΔW_i)x‖². Sums of squares add over layers for a total."""
    y = fused[0] @ (fused[1] @ x)
    if own is None:
        return float(y.square().sum()), 0.0
    ref = own[0] @ (own[1] @ x)
    return float((y - ref).square().sum()), float(ref.square().sum())


def cross_products(parts: list[Factors]) -> tuple[float, float]:
    """Largest normalised cross-products over pairs i ≠ j: max ‖ΔW_iᵀΔW_j‖_F/(‖ΔW_i‖‖ΔW_j‖) (outputs overlap)
    and max ‖ΔW_iΔW_jᵀ‖_F/(‖ΔW_i‖‖ΔW_j‖) (inputs overlap), in factor form. 0 = mutually orthogonal."""
    out_max = in_max = 0.0
    norms = [norm(f) for f in parts]
    for i, (ui, di) in enumerate(parts):
        for j, (uj, dj) in enumerate(parts):
            if j <= i or norms[i] == 0 or norms[j] == 0:
                continue
            den = norms[i] * norms[j]
            out_max = max(out_max, float((di.T @ (ui.T @ uj) @ dj).norm()) / den)
            in_max = max(in_max, float((ui @ (di @ dj.T) @ uj.T).norm()) / den)
    return out_max, in_max
