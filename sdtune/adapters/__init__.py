"""sdtune adapters: LoCon (+Tucker, rsLoRA), FLoRA, DoRA and Spectral on frozen nn.Linear / nn.Conv2d layers."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from . import flora, locon, spectral
from .base import (
    ALGORITHMS,
    PRESETS,
    Adapter,
    AdapterSpec,
    LayerInfo,
    choose_path,
    layer_info,
)
from .dora import DoRA
from .functional import all_finite

__all__ = ["ALGORITHMS", "PRESETS", "Adapter", "AdapterSpec", "DoRA", "choose_path", "build_adapter", "make_adapter", "validate_layer"]

_LOW_RANK = {"locon": locon, "flora": flora, "spectral": spectral}


def _low_rank_kind(spec: AdapterSpec) -> str:
    return spec.dora_base if spec.algorithm == "dora" else spec.algorithm


def validate_layer(base_layer: nn.Module, spec: AdapterSpec, kohya_name: str) -> LayerInfo:
    """Every check ``make_adapter`` makes, without building anything: layer type, ranks, finite weights."""
    info = layer_info(base_layer, kohya_name)
    _LOW_RANK[_low_rank_kind(spec)].validate(info, spec, kohya_name)
    w = base_layer.weight
    if w.device.type != "meta" and not all_finite(w):
        raise ValueError(f"{kohya_name}: the base weight contains non-finite values")
    return info


def make_adapter(base_layer: nn.Module, spec: AdapterSpec, kohya_name: str, *,
                 svd_cache_dir: str | Path | None = None) -> Adapter:
    """Wrap one frozen layer; the adapter's tensors live on the base weight's device and dtype. ΔW = 0 at start."""
    return build_adapter(base_layer, spec, kohya_name, validate_layer(base_layer, spec, kohya_name),
                         svd_cache_dir=svd_cache_dir)


def build_adapter(base_layer: nn.Module, spec: AdapterSpec, kohya_name: str, info: LayerInfo, *,
                  svd_cache_dir: str | Path | None = None) -> Adapter:
    """``make_adapter`` for a layer that ``validate_layer`` has already accepted (returned ``info``)."""
    kind = _low_rank_kind(spec)
    w = base_layer.weight.detach()
    if kind == "locon":
        lora = locon.LoCon(info, spec, w)
    elif kind == "flora":
        lora = flora.FLoRA(info, spec, w)
    else:
        lora = spectral.Spectral(info, spec, w, svd_cache_dir)
    cls = DoRA if spec.algorithm == "dora" else Adapter
    return cls(base_layer, spec, kohya_name, lora)
