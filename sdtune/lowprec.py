"""The frozen base in low precision under fp32 adapter masters: bf16/fp16 storage, int8/nf4 quantised layers.

``lower_base(components, injection, dtype=..., quant=...)``, called right after ``inject.attach``:
  dtype "bf16" | "fp16": every frozen floating tensor of the components is stored in that dtype (half the memory);
      the adapters' factors (and DoRA's magnitude, Spectral's singular vectors) stay fp32 masters, and the low-rank
      path runs in the input's dtype (``adapters.base.compute_dtype``).
  quant "int8" | "nf4": each adapted layer's base weight is quantised (``adapters.frozen``; nf4 needs
      bitsandbytes) and dequantised per call in the compute dtype.
What the rest of sdtune does with a quantised base: the cost rule never materialises W + ΔW from it in training
(``Adapter.chosen_path``), ``merge`` refuses (merging would re-quantise W + ΔW), and export writes the adapter's own
tensors, so a file rebuilds exactly against the *dequantised* base (``dequantised_state``). DoRA's magnitude is
reset to the lowered weight's norm, so that W′ = W at the start, as with a full-precision base.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .adapters import DoRA
from .adapters import functional as Fn
from .adapters.frozen import QUANT_KINDS, is_quantised, quantise_layer
from .formats.kohya import DTYPES

BASE_QUANTS = ("none", *QUANT_KINDS)


def lower_base(components: Mapping[str, nn.Module], injection, *, dtype: str = "fp32", quant: str = "none") -> None:
    """Store the frozen model in ``dtype`` and quantise the adapted layers' weights by ``quant`` (in place)."""
    if dtype not in DTYPES:
        raise ValueError(f"base dtype {dtype!r}: expected one of {tuple(DTYPES)}")
    if quant not in BASE_QUANTS:
        raise ValueError(f"base quantisation {quant!r}: expected one of {BASE_QUANTS}")
    adapters = list(injection.adapters.values())
    if quant != "none":
        for a in adapters:
            if a.spec.path == "materialise":
                raise ValueError(f"{a.kohya_name}: path = 'materialise' builds W+ΔW, which a quantised base "
                                 "(base_quant = {quant!r}) cannot give; use path = 'auto' or 'bypass'")
        for a in adapters:
            a.base = quantise_layer(a.base, quant)
            a.base.dequant_dtype = DTYPES[dtype]
    target = DTYPES[dtype]
    if target != torch.float32:
        masters = {id(t) for a in adapters for t in (*a.lora.parameters(), *a.lora.buffers(), *a.parameters(False))}
        for comp in components.values():
            for module in comp.modules():
                _cast_frozen(module, target, masters)
    with torch.no_grad():
        for a in adapters:
            if isinstance(a, DoRA):
                w = a.base.weight.float()
                a.magnitude.copy_(Fn.channel_norm(w, a.axis).flatten().to(a.magnitude.dtype))
                a._weight_sq = None


def _cast_frozen(module: nn.Module, dtype: torch.dtype, masters: set[int]) -> None:
    """Cast the module's own floating parameters and buffers to ``dtype``, except adapter masters and a quantised
    layer's quantisation statistics (its scales stay fp32)."""
    for name, p in module._parameters.items():
        if p is not None and p.is_floating_point() and id(p) not in masters:
            p.data = p.data.to(dtype)
    if is_quantised(module):
        return
    for name, b in module._buffers.items():
        if b is not None and b.is_floating_point() and id(b) not in masters:
            module._buffers[name] = b.to(dtype)


def dequantised_state(injection) -> dict[str, Tensor]:
    """{kohya name: the base weight each adapter trained over, fp32}: the base its exported file rebuilds against."""
    return {n: a.base.weight.detach().float() for n, a in injection.adapters.items()}


def frozen_bytes(components: Mapping[str, nn.Module], injection) -> int:
    """Bytes of the frozen model as stored (packed weights for quantised layers), adapters' masters excluded."""
    masters = {id(p) for p in injection.parameters()} | {
        id(t) for a in injection.adapters.values() for t in a.lora.buffers()}
    seen, total = set(), 0
    for comp in components.values():
        for t in (*comp.parameters(), *comp.buffers()):
            if id(t) not in masters and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
