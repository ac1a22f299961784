"""Spectral adapters: train r singular directions of the frozen weight (SVD matricised as out × in·kh·kw).

W = U S Vᵀ; the trained block is columns [slot·r, (slot+1)·r) (U₁, S₁, V₁; slot 0 = the top-r).
  additive:   W′ = (U₁ + A_U) S₁ (V₁ + A_V)ᵀ + rest,  A_U (out, r), A_V (in′, r) zero-init -> params r·(out + in′)
              ΔW = (U₁ + A_U) S₁ A_Vᵀ + A_U S₁ V₁ᵀ: exactly the rank-2r LoRA up = [(U₁+A_U)S₁, A_U S₁], down = [A_Vᵀ; V₁ᵀ].
  rotational: W′ = U₁R_U S₁ (V₁R_V)ᵀ + rest, R = Cayley(Q), Q skew from r(r−1)/2 zero-init entries -> params r(r−1)
              ΔW = U₁ (R_U S₁ R_Vᵀ − S₁) V₁ᵀ: the rank-r LoRA up = U₁M, down = V₁ᵀ.
The SVD is LAPACK's full (not truncated, not randomised) ``torch.linalg.svd`` in fp32 (fp64 for fp64 weights),
so U₁S₁V₁ᵀ is the exact SVD block up to that precision. It is computed once per weight and cached on disk
(``svd_cache_dir``, default $SDTUNE_CACHE/svd or ~/.cache/sdtune/svd), keyed by sha256 of the weight's bytes,
shape and dtype; only the first (slot+1)·r columns are stored (a later request for more recomputes).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from . import functional as Fn
from .base import AdapterSpec, LayerInfo, LowRank, check_rank


def default_cache_dir() -> Path:
    root = os.environ.get("SDTUNE_CACHE")
    return Path(root) / "svd" if root else Path.home() / ".cache" / "sdtune" / "svd"


def weight_key(weight: Tensor) -> str:
    w = weight.detach().contiguous().cpu()
    h = hashlib.sha256(f"svd-v2|{tuple(w.shape)}|{w.dtype}|".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def top_singular(weight: Tensor, k: int, cache_dir: str | Path | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """First k singular triples of weight matricised (out, in′): U (out, k), S (k,), V (in′, k), on weight's device.

    Cached in ``cache_dir`` (None -> default_cache_dir()); pass ``cache_dir=False`` to skip the cache.
    """
    path = None
    if cache_dir is not False:
        path = Path(cache_dir or default_cache_dir()) / f"{weight_key(weight)}.safetensors"
        if path.exists():
            cached = load_file(str(path))
            if cached["s"].numel() >= k:
                return tuple(cached[n][..., :k].to(weight.device) for n in ("u", "s", "v"))
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mat = weight.detach().to(dtype).flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    u, s, v = u[:, :k], s[:k].contiguous(), vh[:k].T
    # Singular vectors are defined up to sign, and LAPACK's choice can change with the thread count: fix it
    # (largest-magnitude entry of each u column positive) so a cached or recomputed SVD reloads the same adapter.
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    u, v = (u * sign).contiguous(), (v * sign).contiguous()
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"u": u.cpu(), "s": s.cpu(), "v": v.cpu()}, str(tmp))
    return u, s, v


def validate(info: LayerInfo, spec: AdapterSpec, name: str) -> None:
    check_rank(name, f"Spectral slot {spec.slot} needs (slot+1)·rank =", (spec.slot + 1) * spec.rank,
               min(info.out, info.fan_in))


class Spectral(LowRank):
    def __init__(self, info: LayerInfo, spec: AdapterSpec, weight: Tensor, cache_dir: str | Path | None = None):
        super().__init__(info, spec)
        r, lo = spec.rank, spec.slot * spec.rank
        u, s, v = top_singular(weight, lo + r, cache_dir)
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.register_buffer("u1", u[:, lo:].to(**kw), persistent=False)
        self.register_buffer("s1", s[lo:].to(**kw), persistent=False)
        self.register_buffer("v1", v[:, lo:].to(**kw), persistent=False)
        self.rotational = spec.spectral_mode == "rotational"
        if self.rotational:
            self.q_u = nn.Parameter(torch.zeros(r * (r - 1) // 2, **kw))
            self.q_v = nn.Parameter(torch.zeros(r * (r - 1) // 2, **kw))
        else:
            self.a_u = nn.Parameter(torch.zeros(info.out, r, **kw))
            self.a_v = nn.Parameter(torch.zeros(info.fan_in, r, **kw))

    def rotations(self) -> tuple[Tensor, Tensor]:
        r = self.spec.rank
        return Fn.cayley(Fn.skew_from_vector(self.q_u, r)), Fn.cayley(Fn.skew_from_vector(self.q_v, r))

    def _shape(self, mat: Tensor) -> Tensor:
        return mat.reshape(mat.shape[0], self.info.inp, *self.info.kernel) if self.info.is_conv else mat

    def delta(self) -> Tensor:
        if self.rotational:
            d = Fn.spectral_rotational_delta(self.u1, self.s1, self.v1, *self.rotations())
        else:
            d = Fn.spectral_additive_delta(self.u1, self.s1, self.v1, self.a_u, self.a_v)
        return self._shape(d)

    def lora_form(self):
        if self.rotational:
            return self.u1 @ Fn.spectral_rotational_core(self.s1, *self.rotations()), None, self._shape(self.v1.T), 1.0
        up = torch.cat([(self.u1 + self.a_u) * self.s1, self.a_u * self.s1], dim=1)
        down = torch.cat([self.a_v.T, self.v1.T], dim=0)
        return up, None, self._shape(down), 1.0

    @property
    def form_rank(self) -> int:
        return self.spec.rank * (1 if self.rotational else 2)
