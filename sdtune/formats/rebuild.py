"""ΔW from the tensors of one module of an A1111 adapter file: pure functions, no module state.

A *group* is the dict of one module's tensors with the module name stripped: ``{"lora_down.weight": …,
"lora_up.weight": …, "alpha": …}``. Conventions are the ones every consumer shares (A1111 ``extensions-builtin/
Lora``, ComfyUI ``weight_adapter``, LyCORIS ``functional``):

* LoRA / LoCon: ΔW = (α/r)·up·down with r = ``lora_down.shape[0]``; conv ``down`` (r, in, kh, kw),
  ``up`` (out, r, 1, 1). Tucker: ``down`` (r, in, 1, 1), ``mid`` (r, r, kh, kw), ``up`` (out, r, 1, 1),
  ΔW[o,i,k,l] = Σ_mn up[o,m]·mid[m,n,k,l]·down[n,i].
* LoHa: ΔW = (α/r)·(w1a·w1b) ⊙ (w2a·w2b), r = ``hada_w1_b.shape[0]``; with Tucker cores t1, t2 (r, r, kh, kw)
  each factor is t ×₁ w_aᵀ ×₂ w_bᵀ where w_a is (r, out) and w_b is (r, in).
* LoKr: ΔW = (α/r)·w1 ⊗ w2, each side either full or a product a·b (w2 optionally Tucker with t2);
  r = ``lokr_w1_b.shape[0]`` or ``lokr_w2_b.shape[0]``; both sides full → scale 1.
* Full: ΔW = ``diff`` (and bias ``diff_b``).
* A ``scale`` tensor, when present, replaces α/r (A1111 honours it).
* α missing or 0 → scale 1 (kohya and LyCORIS treat α = 0 as α = r).

DoRA (``dora_scale``) is applied on top: W' = m ⊙ (W+ΔW)/‖W+ΔW‖, the norm over every axis except the one
``dora_scale`` lives on. A1111 uses the input axis (``(1, in, …)``); the output axis (``(out, 1, …)``) is
rebuilt here with the correct ‖W+ΔW‖ (LyCORIS's semantics).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..adapters import functional as Fn

LORA_KEYS = {"lora_down.weight", "lora_up.weight", "lora_mid.weight"}
LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_KEYS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
FULL_KEYS = {"diff", "diff_b"}
COMMON_KEYS = {"alpha", "scale", "dora_scale"}
KNOWN_KEYS = LORA_KEYS | LOHA_KEYS | LOKR_KEYS | FULL_KEYS | COMMON_KEYS

_REQUIRED = {
    "lora": {"lora_down.weight", "lora_up.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": set(),  # checked in _lokr_sides
    "full": {"diff"},
}


class RebuildError(ValueError):
    """A group of tensors that does not form a valid adapter module."""


def detect_kind(keys) -> str:
    """The family of a group from its key set: ``lora`` | ``loha`` | ``lokr`` | ``full``."""
    keys = set(keys)
    found = [kind for kind, family in (("lora", LORA_KEYS), ("loha", LOHA_KEYS), ("lokr", LOKR_KEYS),
                                       ("full", FULL_KEYS)) if keys & family]
    if len(found) != 1:
        what = "no weight tensors" if not found else f"tensors of several algorithms ({', '.join(found)})"
        raise RebuildError(f"{what} in key set {sorted(keys)}")
    kind = found[0]
    missing = _REQUIRED[kind] - keys
    if missing:
        raise RebuildError(f"{kind} module without {sorted(missing)} (has {sorted(keys)})")
    return kind


def algorithm_name(group: dict[str, Tensor]) -> str:
    """Human name: ``lora`` (linear / 1×1), ``locon`` (k×k conv), ``tucker``, ``loha``, ``lokr``, ``full``;
    ``+dora`` when a ``dora_scale`` is present."""
    kind = detect_kind(group)
    if kind == "lora":
        if "lora_mid.weight" in group:
            name = "tucker"
        else:
            down = group["lora_down.weight"]
            name = "locon" if down.dim() > 2 and any(s > 1 for s in down.shape[2:]) else "lora"
    else:
        name = kind
    return name + "+dora" if "dora_scale" in group else name


def _lokr_sides(g: dict[str, Tensor]) -> None:
    for side in ("1", "2"):
        full, a, b = f"lokr_w{side}", f"lokr_w{side}_a", f"lokr_w{side}_b"
        if (full in g) == (a in g and b in g) or ((a in g) != (b in g)):
            raise RebuildError(f"LoKr side {side} needs either {full} or both {a} and {b}; has {sorted(g)}")


def rank(group: dict[str, Tensor]) -> int | None:
    """The rank r that α is divided by (None when the module has none: full diff, LoKr with two full sides)."""
    kind = detect_kind(group)
    if kind == "lora":
        return int(group["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(group["hada_w1_b"].shape[0])
    if kind == "lokr":
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in group:
                return int(group[key].shape[0])
    return None


def scale(group: dict[str, Tensor]) -> float:
    """The factor ΔW's factor product is multiplied by: ``scale`` if stored, else α/r, else 1."""
    if "scale" in group:
        return float(group["scale"].item())
    r = rank(group)
    alpha = float(group["alpha"].item()) if "alpha" in group else 0.0
    if r is None or alpha == 0.0:
        return 1.0
    return alpha / r


def lora_chain(g: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, Tensor]:
    """(up (out, r), mid | None, down) of a LoRA group, checked to chain, in ``functional.lora_delta``'s form:
    up's 1×1 kernel dropped, a Tucker ``down`` (r, in[, 1, 1]) left for it to flatten."""
    up, down, mid = g["lora_up.weight"], g["lora_down.weight"], g.get("lora_mid.weight")
    if up.dim() > 2 and any(s != 1 for s in up.shape[2:]):
        raise RebuildError(f"lora_up must be 1×1, got shape {tuple(up.shape)}")
    up2 = up.reshape(up.shape[0], up.shape[1])
    if mid is None:
        if up2.shape[1] != down.shape[0]:
            raise RebuildError(f"lora_up {tuple(up.shape)} does not chain with lora_down {tuple(down.shape)}")
    else:
        if down.dim() > 2 and any(s != 1 for s in down.shape[2:]):
            raise RebuildError(f"Tucker lora_down must be 1×1, got {tuple(down.shape)}")
        if mid.shape[0] != up2.shape[1] or mid.shape[1] != down.shape[0]:
            raise RebuildError(f"lora_mid {tuple(mid.shape)} does not chain up {tuple(up.shape)} / down "
                               f"{tuple(down.shape)}")
    return up2, mid, down


def _tucker_factor(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """t ×₁ waᵀ ×₂ wbᵀ: t (r, r, k…), wa (r, out), wb (r, in) → (out, in, k…)."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def loha_delta(g: dict[str, Tensor]) -> Tensor:
    """(w1a·w1b) ⊙ (w2a·w2b), unscaled; Tucker form when ``hada_t1``/``hada_t2`` are present."""
    if "hada_t1" in g or "hada_t2" in g:
        if not ("hada_t1" in g and "hada_t2" in g):
            raise RebuildError("LoHa Tucker module needs both hada_t1 and hada_t2")
        return (_tucker_factor(g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"])
                * _tucker_factor(g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"]))
    w1 = g["hada_w1_a"] @ g["hada_w1_b"].reshape(g["hada_w1_b"].shape[0], -1)
    w2 = g["hada_w2_a"] @ g["hada_w2_b"].reshape(g["hada_w2_b"].shape[0], -1)
    return w1 * w2


def lokr_delta(g: dict[str, Tensor]) -> Tensor:
    """w1 ⊗ w2, unscaled; each side full or a product a·b (side 2 optionally Tucker with ``lokr_t2``)."""
    _lokr_sides(g)
    w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"] @ g["lokr_w1_b"]
    if "lokr_w2" in g:
        w2 = g["lokr_w2"]
    elif "lokr_t2" in g:
        w2 = _tucker_factor(g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
    else:
        b = g["lokr_w2_b"]
        w2 = (g["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(g["lokr_w2_a"].shape[0], *b.shape[1:])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def delta_shape(group: dict[str, Tensor]) -> tuple[int, ...]:
    """Shape of the rebuilt ΔW (before any reshape to the target weight), computed without rebuilding."""
    kind = detect_kind(group)
    g = group
    if kind == "lora":
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        kernel = g["lora_mid.weight"].shape[2:] if "lora_mid.weight" in g else down.shape[2:]
        return (up.shape[0], down.shape[1], *kernel)
    if kind == "full":
        return tuple(g["diff"].shape)
    if kind == "loha":
        if "hada_t1" in g:
            return (g["hada_w1_a"].shape[1], g["hada_w1_b"].shape[1], *g["hada_t1"].shape[2:])
        return (g["hada_w1_a"].shape[0], math.prod(g["hada_w1_b"].shape[1:]))
    _lokr_sides(g)
    s1 = tuple(g["lokr_w1"].shape) if "lokr_w1" in g else (g["lokr_w1_a"].shape[0], g["lokr_w1_b"].shape[1])
    if "lokr_w2" in g:
        s2 = tuple(g["lokr_w2"].shape)
    elif "lokr_t2" in g:
        s2 = (g["lokr_w2_a"].shape[1], g["lokr_w2_b"].shape[1], *g["lokr_t2"].shape[2:])
    else:
        s2 = (g["lokr_w2_a"].shape[0], *g["lokr_w2_b"].shape[1:])
    return (s1[0] * s2[0], s1[1] * s2[1], *s2[2:])


def fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a ΔW of ``shape`` applies to a weight of ``target``: equal, or the same output dim and numel
    (1×1 conv ↔ linear, LoHa's flattened conv factors), which every UI reshapes."""
    shape, target = tuple(shape), tuple(target)
    return shape == target or (shape[0] == target[0] and math.prod(shape) == math.prod(target))


def group_delta(group: dict[str, Tensor], target_shape: tuple[int, ...] | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The scaled ΔW of a group (no DoRA), computed in ``dtype``, reshaped to ``target_shape`` if given."""
    g = {k: v.to(dtype) for k, v in group.items()}
    kind = detect_kind(g)
    s = scale(g)
    if kind == "lora":
        up, mid, down = lora_chain(g)
        delta = Fn.lora_delta(up, down, s, mid)
    else:
        delta = loha_delta(g) if kind == "loha" else lokr_delta(g) if kind == "lokr" else g["diff"]
        if s != 1.0:
            delta = delta * s
    if target_shape is not None and tuple(delta.shape) != tuple(target_shape):
        if not fits(delta.shape, target_shape):
            raise RebuildError(f"ΔW of shape {tuple(delta.shape)} does not fit weight {tuple(target_shape)}")
        delta = delta.reshape(target_shape)
    return delta


def dora_axis(dora_scale: Tensor, weight_shape: tuple[int, ...]) -> str:
    """``"in"`` for a (1, in, 1…) magnitude, ``"out"`` for (out, 1, 1…); anything else is an error."""
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    ones = (1,) * (len(weight_shape) - 2)
    shape = tuple(dora_scale.shape)
    if shape == (1, in_dim, *ones):
        return "in"
    if shape == (out_dim, 1, *ones):
        return "out"
    if dora_scale.dim() == 1 and in_dim != out_dim and shape[0] in (in_dim, out_dim):
        return "in" if shape[0] == in_dim else "out"
    raise RebuildError(f"dora_scale of shape {shape} matches neither the input axis (1, {in_dim}, …) nor the "
                       f"output axis ({out_dim}, 1, …) of a weight {tuple(weight_shape)}")


def dora_weight(weight: Tensor, delta: Tensor, dora_scale: Tensor) -> Tensor:
    """W' = m ⊙ (W+ΔW)/‖W+ΔW‖ (``functional.dora_weight``, no eps, as A1111) with the axis read off
    ``dora_scale``'s shape."""
    axis = dora_axis(dora_scale, tuple(weight.shape))
    shape = (1, -1) if axis == "in" else (-1, 1)
    m = dora_scale.to(weight.dtype).reshape(*shape, *[1] * (weight.dim() - 2))
    return Fn.dora_weight(weight, delta, m, axis, detach_norm=False)


def effective_delta(group: dict[str, Tensor], weight: Tensor, multiplier: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """What a loader adds to ``weight`` at strength ``multiplier``: multiplier·ΔW, or with DoRA
    multiplier·(W' − W) (A1111's order: α/r before the decomposition, the multiplier after)."""
    delta = group_delta(group, tuple(weight.shape), dtype)
    if "dora_scale" in group:
        w = weight.to(dtype)
        delta = dora_weight(w, delta, group["dora_scale"].to(dtype)) - w
    return delta * multiplier if multiplier != 1.0 else delta


def square_tucker(group: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pad a rectangular ``lora_mid`` (r₁, r₂, k, k) with zeros to (r, r, k, k), r = max(r₁, r₂), padding up's
    columns / down's rows to match and rewriting α so that α/r keeps the scale (ComfyUI and LyCORIS reject
    rectangular cores). A square core is returned unchanged."""
    mid = group.get("lora_mid.weight")
    if mid is None or mid.shape[0] == mid.shape[1]:
        return group
    up, mid, down = Fn.pad_tucker(group["lora_up.weight"], mid, group["lora_down.weight"])
    out = dict(group, **{"lora_mid.weight": mid, "lora_up.weight": up, "lora_down.weight": down})
    out.pop("scale", None)
    out["alpha"] = torch.tensor(scale(group) * mid.shape[0], dtype=torch.float32)
    return out


def fold_tucker(group: dict[str, Tensor]) -> dict[str, Tensor]:
    """Plain-LoCon form of a Tucker group: ``lora_down`` ← mid ×₂ down (r₁, in, kh, kw), no ``lora_mid``,
    α rewritten for the new rank r₁ (diffusers rejects files with ``lora_mid``)."""
    mid = group.get("lora_mid.weight")
    if mid is None:
        return group
    down = group["lora_down.weight"]
    s = scale(group)
    new_down = Fn.fold_tucker(mid, down)
    out = {k: v for k, v in group.items() if k not in ("lora_mid.weight", "scale")}
    out["lora_down.weight"] = new_down
    out["alpha"] = torch.tensor(s * new_down.shape[0], dtype=torch.float32)
    return out


def rel_error(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom
