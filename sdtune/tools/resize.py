"""``sdtune resize``: lower the rank of an adapter file layer by layer (maths in ``ranks``).

Every LoRA / LoCon / Tucker-LoCon module (sdtune's, kohya's, LyCORIS's), with or without DoRA, is truncated in its
own form; α is rewritten to scale·k so that α/k keeps the file's scale; a DoRA magnitude is refitted so that the
merged weight stays as close as possible to the original file's (that needs the base weights: ``components``).
LoHa, LoKr and full modules have no rank to cut and are copied unchanged. The per-layer report (rank before and
after, retained Frobenius share of ΔW, and for DoRA the merged-weight error) is printed, written beside the output
as ``<out>.resize.json`` and summarised in the file's metadata (``ss_sdtune_resize``).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import atomic
from ..formats import rebuild
from . import ranks

# metadata the writer computes itself; every other ss_* key of the source is carried over
_COMPUTED = {"ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args", "ss_base_model_version",
             "ss_v2", "ss_output_name"}


@dataclass
class LayerResize:
    name: str
    algorithm: str
    rank_before: int | None
    rank_after: int | None
    retained: float                     # ‖ΔW′‖ / ‖ΔW‖ of the low-rank update (1.0: unchanged)
    merged_error: float | None = None   # DoRA: ‖W″ − W′‖ / ‖W′ − W‖ after the magnitude refit


@dataclass
class ResizeResult:
    source: Path
    arch: str
    rule: str
    param: float
    max_rank: int | None
    groups: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    layers: list[LayerResize] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _mat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def resize_group(group: Mapping[str, Tensor], rule: str, param: float, max_rank: int | None = None, *,
                 weight: Tensor | None = None, name: str = "") -> tuple[dict[str, Tensor], LayerResize]:
    """One module's tensors resized (float64 out; see the module docstring). ``weight``: the base weight, needed
    for DoRA groups."""
    algorithm = rebuild.algorithm_name(group)
    if rebuild.detect_kind(group) != "lora":
        return dict(group), LayerResize(name, algorithm, rebuild.rank(group), rebuild.rank(group), 1.0)
    g = {k: v.double() for k, v in group.items()}
    scale, rank = rebuild.scale(g), rebuild.rank(g)
    up, down = g["lora_up.weight"], g["lora_down.weight"]
    if "lora_mid.weight" in g:
        new_up, mid, new_down, share = ranks.truncate_tucker(_mat(up), g["lora_mid.weight"], _mat(down), rule,
                                                             param, max_rank)
        k = mid.shape[0]
        out = {"lora_up.weight": new_up.reshape(up.shape[0], k, *up.shape[2:]), "lora_mid.weight": mid,
               "lora_down.weight": new_down.reshape(k, *down.shape[1:])}
    else:
        new_up, new_down, share = ranks.truncate_lora(_mat(up), _mat(down), rule, param, max_rank)
        k = new_down.shape[0]
        out = {"lora_up.weight": new_up.reshape(up.shape[0], k, *up.shape[2:]),
               "lora_down.weight": new_down.reshape(k, *down.shape[1:])}
    if k >= rank:
        return dict(group), LayerResize(name, algorithm, rank, rank, 1.0)
    out["alpha"] = torch.tensor(scale * k)
    report = LayerResize(name, algorithm, rank, k, share)
    if "dora_scale" in g:
        if weight is None:
            raise ValueError(f"{name}: a DoRA module's merged weight depends on the base weight; pass the base "
                             f"model (--model)")
        w = weight.double()
        target = rebuild.dora_weight(w, rebuild.group_delta(g, tuple(w.shape), torch.float64), g["dora_scale"])
        axis = rebuild.dora_axis(g["dora_scale"], tuple(w.shape))
        delta = rebuild.group_delta(out, tuple(w.shape), torch.float64)
        out["dora_scale"] = ranks.refit_magnitude(w, delta, target, axis).reshape(g["dora_scale"].shape)
        merged = rebuild.dora_weight(w, delta, out["dora_scale"])
        report.merged_error = rebuild.rel_error(merged - w, target - w)
    return out, report


def resize_file(path, rule: str, param: float, *, max_rank: int | None = None,
                components: Mapping[str, nn.Module] | None = None, arch: str | None = None,
                progress: bool = True) -> ResizeResult:
    """Resize every module of an adapter file (any file ``sdtune.apply.load`` reads; native sdtune files and DoRA
    need ``components``). One layer at a time; nothing is written."""
    from ..apply import load

    ranks.check_rule(rule, param)
    file = load(path, components, arch)
    file_arch = file.arch or arch
    if file_arch is None:
        raise ValueError(f"{path}: the file does not say which architecture it is for; pass the base model (--model)")
    result = ResizeResult(Path(path), file_arch, rule, param, max_rank,
                          metadata={k: v for k, v in file.metadata.items()
                                    if k.startswith("ss_") and k not in _COMPUTED})
    for name, layer in tqdm(file.layers.items(), desc="resizing", unit="layer", disable=not progress):
        group, report = resize_group(layer.group, rule, param, max_rank, weight=layer.weight, name=name)
        result.groups[name] = group
        result.layers.append(report)
    return result


def _dtype(path) -> torch.dtype:
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        dtypes = Counter(f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha"))
    name = dtypes.most_common(1)[0][0] if dtypes else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(name, torch.float32)


def summary(result: ResizeResult) -> dict:
    changed = [r for r in result.layers if r.rank_after != r.rank_before]
    return {"rule": result.rule, "param": result.param, "max_rank": result.max_rank, "source": result.source.name,
            "layers": len(result.layers), "resized": len(changed),
            "ranks_before": dict(Counter(str(r.rank_before) for r in result.layers)),
            "ranks_after": dict(Counter(str(r.rank_after) for r in result.layers)),
            "min_retained": min((r.retained for r in result.layers), default=1.0)}


def save_resized(result: ResizeResult, out, *, dtype: torch.dtype | None = None) -> Path:
    """Write the resized file (in the source's dtype unless given) and ``<out>.resize.json``; returns the report
    path."""
    from ..formats.kohya import save_kohya

    out = Path(out)
    info = summary(result)
    comment = (f"resized by sdtune: {result.rule} {result.param:g}"
               + (f", max rank {result.max_rank}" if result.max_rank else "") + f" from {result.source.name}")
    old = result.metadata.get("ss_training_comment")
    metadata = dict(result.metadata, ss_training_comment=f"{old}; {comment}" if old else comment,
                    ss_sdtune_resize=json.dumps(info, sort_keys=True))
    save_kohya(result.groups, out, arch=result.arch, dtype=dtype or _dtype(result.source), metadata=metadata,
               verify=False)
    report = out.with_suffix(".resize.json")
    atomic.write_text(report, json.dumps({"summary": info, "layers": [asdict(r) for r in result.layers]}, indent=1))
    return report


def format_report(result: ResizeResult, per_layer: bool = True) -> str:
    lines = []
    if per_layer:
        width = max((len(r.name) for r in result.layers), default=10)
        lines.append(f"{'layer':<{width}}  algorithm    rank  →  new   retained" + "  merged err")
        for r in result.layers:
            lines.append(f"{r.name:<{width}}  {r.algorithm:<11} {str(r.rank_before):>5}  → {str(r.rank_after):>4}"
                         f"   {r.retained:8.4f}" + (f"  {r.merged_error:10.3g}" if r.merged_error is not None else ""))
    info = summary(result)
    lines.append(f"{info['resized']} of {info['layers']} layers resized ({result.rule} {result.param:g}); ranks "
                 f"{info['ranks_before']} → {info['ranks_after']}; lowest retained share {info['min_retained']:.4f}")
    return "\n".join(lines)
