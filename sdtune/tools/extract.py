"""``sdtune extract``: a LoCon file from the difference of two checkpoints of one architecture.

For every Linear / Conv2d that sdtune can name (``names.name_map``: every U-Net layer, the six template layers of
each text-encoder block) ΔW = W_tuned − W_base is matricised to (out, in·kh·kw), factored by a truncated SVD with a
rank rule (``ranks``: fixed ``rank``, LyCORIS's ``threshold`` / ``ratio`` / ``quantile``, or kohya's ``sv_*``) and
written as ``lora_down`` (k, in, kh, kw) / ``lora_up`` (out, k, 1, 1) with α = k (scale 1). Layers whose ΔW is
below ``min_change`` of ‖W_base‖ are skipped (unchanged layers of a partial fine-tune). One layer is differenced and
factored at a time, so the extra memory is one layer's ΔW and its SVD. Parameters that are not adaptable weights
(biases, norms, embeddings) cannot be held by a LoRA: how many changed is reported.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import atomic, names
from . import ranks


@dataclass
class LayerExtract:
    name: str
    shape: tuple[int, ...]
    rank: int
    energy: float            # Σ_{i≤k} σ_i² / Σ σ_i²: the share of ‖ΔW‖² the factors hold
    delta_norm: float        # ‖ΔW‖_F
    relative_change: float   # ‖ΔW‖ / ‖W_base‖


@dataclass
class ExtractResult:
    arch: str
    rule: str
    param: float
    groups: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    layers: list[LayerExtract] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)           # unchanged layers
    other_changed: list[str] = field(default_factory=list)     # changed parameters no LoRA can hold

    def total_energy(self) -> float:
        """Captured share of Σ_layers ‖ΔW‖² over the extracted layers (energy-weighted)."""
        den = sum(r.delta_norm ** 2 for r in self.layers)
        return sum(r.energy * r.delta_norm ** 2 for r in self.layers) / den if den > 0 else 1.0


def _same_architecture(base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module]) -> None:
    if set(base) != set(tuned):
        raise ValueError(f"the checkpoints have different components: {sorted(base)} vs {sorted(tuned)}")
    for c in base:
        a, b = base[c].state_dict(), tuned[c].state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError(f"{c}: the two checkpoints do not share an architecture (parameter names or shapes "
                             f"differ); extract needs a base and a fine-tune of it")


@torch.no_grad()
def extract(base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module], arch: str, rule: str = "rank",
            param: float = 16, *, max_rank: int | None = None, convs: bool = True, text_encoders: bool = True,
            min_change: float = 1e-6, progress: bool = True) -> ExtractResult:
    """LoCon groups of ``tuned − base`` (module docstring); ``convs=False`` leaves out k×k convolutions (a plain
    LoRA), ``text_encoders=False`` keeps the U-Net only."""
    ranks.check_rule(rule, param)
    _same_architecture(base, tuned)
    table = names.name_map(dict(base), arch)
    result = ExtractResult(arch, rule, param)
    adapted = set()
    for name, (component, path) in tqdm(table.items(), desc="extracting", unit="layer", disable=not progress):
        if component != "unet" and not text_encoders:
            continue
        w0 = base[component].get_submodule(path).weight
        if not convs and w0.dim() == 4 and w0.shape[-1] * w0.shape[-2] > 1:
            continue
        adapted.add((component, f"{path}.weight"))
        delta = tuned[component].get_submodule(path).weight.double() - w0.double()
        base_norm, delta_norm = float(w0.double().norm()), float(delta.norm())
        change = delta_norm / base_norm if base_norm > 0 else delta_norm
        if change <= min_change:
            result.skipped.append(name)
            continue
        up, down, s = ranks.truncate_dense(delta.reshape(delta.shape[0], -1), rule, param, max_rank)
        k = down.shape[0]
        result.groups[name] = {"lora_down.weight": down.reshape(k, *w0.shape[1:]).float(),
                               "lora_up.weight": up.reshape(w0.shape[0], k, *[1] * (w0.dim() - 2)).float(),
                               "alpha": torch.tensor(float(k))}
        result.layers.append(LayerExtract(name, tuple(w0.shape), k, ranks.retained(s, k) ** 2, delta_norm, change))
    for c in base:
        tuned_sd = tuned[c].state_dict()
        for key, value in base[c].state_dict().items():
            if (c, key) not in adapted and not torch.equal(value, tuned_sd[key]):
                result.other_changed.append(f"{c}.{key}")
    return result


def format_report(result: ExtractResult, per_layer: bool = True) -> str:
    lines = []
    if per_layer and result.layers:
        width = max(len(r.name) for r in result.layers)
        lines.append(f"{'layer':<{width}}  rank   energy   ‖ΔW‖/‖W‖")
        lines += [f"{r.name:<{width}}  {r.rank:>4}  {r.energy:7.4f}  {r.relative_change:9.3g}" for r in result.layers]
    lines.append(f"{len(result.layers)} layers extracted ({result.rule} {result.param:g}), captured energy "
                 f"{result.total_energy():.4f}; {len(result.skipped)} unchanged layers skipped")
    if result.other_changed:
        lines.append(f"{len(result.other_changed)} changed parameters are not LoRA-able weights and are not in the "
                     f"file: {', '.join(result.other_changed[:6])}" + (" …" if len(result.other_changed) > 6 else ""))
    return "\n".join(lines)


def save_extracted(result: ExtractResult, out, *, dtype: torch.dtype = torch.float16, sources=("", "")) -> Path:
    """Write the LoCon file and ``<out>.extract.json`` (per-layer rank and energy); returns the report path."""
    from ..formats.kohya import save_kohya

    if not result.groups:
        raise ValueError("the checkpoints do not differ in any adaptable layer: nothing to extract")
    out = Path(out)
    summary = {"rule": result.rule, "param": result.param, "layers": len(result.layers),
               "skipped": len(result.skipped), "captured_energy": result.total_energy(),
               "other_changed": len(result.other_changed), "base": str(sources[0]), "tuned": str(sources[1])}
    save_kohya(result.groups, out, arch=result.arch, dtype=dtype, verify=False,
               comment=f"extracted by sdtune from {Path(sources[1]).name} − {Path(sources[0]).name}",
               metadata={"ss_sdtune_extract": json.dumps(summary, sort_keys=True)})
    report = out.with_suffix(".extract.json")
    atomic.write_text(report, json.dumps({"summary": summary, "layers": [asdict(r) for r in result.layers],
                                          "skipped": result.skipped, "other_changed": result.other_changed},
                                         indent=1))
    return report
