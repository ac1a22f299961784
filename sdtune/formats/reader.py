"""Reading A1111 / kohya / LyCORIS adapter files (``read_kohya``) into per-module tensor groups mapped to the live
model (applying them is ``sdtune.apply``'s job).

Only safetensors is read, never a pickle; the header is checked against the file size before any tensor is
loaded. Each module's algorithm is read off its key set (``rebuild.detect_kind``); names map to the live
model through ``sdtune.names.name_map``; every key is consumed or reported and every shape is checked
before anything is applied.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from ..archs import detect_arch as detect_model_arch
from ..safefile import FormatError, check_safetensors
from . import metadata as md_
from . import rebuild


@dataclass
class ModuleDelta:
    """One module of a file: its tensors, where it maps in the live model, and its rebuilt ΔW on demand."""

    name: str
    tensors: dict[str, Tensor]
    component: str | None = None
    module_path: str | None = None

    @property
    def kind(self) -> str:
        return rebuild.detect_kind(self.tensors)

    @property
    def algorithm(self) -> str:
        return rebuild.algorithm_name(self.tensors)

    @property
    def rank(self) -> int | None:
        return rebuild.rank(self.tensors)

    @property
    def alpha(self) -> float | None:
        return float(self.tensors["alpha"].item()) if "alpha" in self.tensors else None

    @property
    def scale(self) -> float:
        return rebuild.scale(self.tensors)

    @property
    def dora_scale(self) -> Tensor | None:
        return self.tensors.get("dora_scale")

    @property
    def shape(self) -> tuple[int, ...]:
        return rebuild.delta_shape(self.tensors)

    def num_params(self) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if k != "alpha")

    def delta(self, target_shape=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The scaled ΔW without DoRA (reshaped to ``target_shape`` if given)."""
        return rebuild.group_delta(self.tensors, target_shape, dtype)

    def effective_delta(self, weight: Tensor, multiplier: float = 1.0, dtype=torch.float32) -> Tensor:
        """What applying the module at ``multiplier`` adds to ``weight`` (DoRA-aware)."""
        return rebuild.effective_delta(self.tensors, weight, multiplier, dtype)


@dataclass
class AdapterFile:
    path: Path
    metadata: dict[str, str]
    arch: str | None
    arch_evidence: str
    modules: dict[str, ModuleDelta]
    unmapped: list[str] = field(default_factory=list)  # module names the model has no layer for
    unknown_keys: list[str] = field(default_factory=list)  # keys that are not adapter tensors

    @property
    def sdtune(self) -> dict | None:
        return md_.sdtune_info(self.metadata)

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())


_ATTN_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_HIDDEN = {768: "sd1", 1024: "sd2"}


def detect_arch(groups: Mapping[str, dict[str, Tensor]], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(arch, evidence) of a file: its metadata, else SDXL-only names, else layer widths; (None, …) if unsure."""
    arch, why = md_.arch_from_metadata(dict(metadata))
    if arch:
        return arch, why
    for name in groups:
        if name.startswith(("lora_te1_", "lora_te2_")):
            return "sdxl", f"SDXL text-encoder name {name}"
        if name.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")):
            return "sdxl", f"LDM-style U-Net name {name} (kohya writes these for SDXL)"
    for name, group in groups.items():
        try:
            width = rebuild.delta_shape(group)[1]
        except rebuild.RebuildError:
            continue
        if name.startswith("lora_unet_") and name.endswith(("attn2_to_k", "attn2_to_v")) and width in _ATTN_CONTEXT:
            return _ATTN_CONTEXT[width], f"{name} reads a {width}-wide text context"
        if name.startswith("lora_te_") and name.endswith("q_proj") and width in _TE_HIDDEN:
            return _TE_HIDDEN[width], f"{name} has text width {width}"
    return None, "no metadata and no telling names or widths"


def model_arch(components: Mapping[str, nn.Module]) -> str:
    """Architecture family of live components (``sdtune.archs.detect_arch``)."""
    return detect_model_arch(components["unet"], {k: v for k, v in components.items() if k != "unet"})


def target_layer(components: Mapping[str, nn.Module], component: str, module_path: str) -> nn.Module:
    """The Linear/Conv2d a file module applies to (the frozen base when an sdtune Adapter wraps it)."""
    module = components[component].get_submodule(module_path)
    if not isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "base", None), nn.Module):
        module = module.base
    if not hasattr(module, "weight"):
        raise FormatError(f"{component}.{module_path} is a {type(module).__name__} without a weight")
    return module


def read_kohya(path, components: Mapping[str, nn.Module] | None = None, arch: str | None = None, *,
               strict: bool = True) -> AdapterFile:
    """Read an adapter file (kohya, LyCORIS or sdtune) into per-module groups.

    With ``components``, names are mapped to ``(component, module_path)`` through ``sdtune.names.name_map``
    of the live model, and every ΔW shape is checked against the layer's weight (all mismatches in one
    error). A file for another architecture is an error. Keys that are not adapter tensors and modules the
    model has no layer for are errors with ``strict``, else warned about and listed in ``unknown_keys`` /
    ``unmapped``.
    """
    path = Path(path)
    check_safetensors(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise FormatError(f"{path}: unreadable safetensors file: {e}") from None
    raw: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        if suffix in rebuild.KNOWN_KEYS:
            raw.setdefault(name, {})[suffix] = value
        else:
            unknown.append(key)
    if any(k.endswith(("lora_A.weight", "lora_B.weight")) for k in unknown):
        raise FormatError(f"{path}: a diffusers/PEFT-format LoRA (lora_A/lora_B keys), not a kohya/A1111 file")
    modules: dict[str, ModuleDelta] = {}
    bad = []
    for name, group in raw.items():
        try:
            rebuild.detect_kind(group)
            rebuild.delta_shape(group)
        except rebuild.RebuildError as e:
            bad.append(f"{name}: {e}")
            continue
        modules[name] = ModuleDelta(name, group)
    if bad:
        raise FormatError(f"{path}: {len(bad)} malformed module(s):\n  " + "\n  ".join(bad[:20]))
    file_arch, evidence = detect_arch(raw, metadata)
    out = AdapterFile(path, metadata, file_arch, evidence, modules, unknown_keys=sorted(unknown))
    if components is not None:
        arch = arch or model_arch(components)
        if file_arch is not None and file_arch != arch:
            raise FormatError(f"{path}: this file is for {file_arch.upper()} ({evidence}); the model is "
                              f"{arch.upper()}")
        _map_modules(out, components, arch)
    problems = []
    if out.unknown_keys:
        problems.append(f"{len(out.unknown_keys)} key(s) that are not adapter tensors: "
                        f"{', '.join(out.unknown_keys[:8])}")
    if out.unmapped:
        problems.append(f"{len(out.unmapped)} module(s) with no matching layer in the model: "
                        f"{', '.join(out.unmapped[:8])}")
    if problems:
        message = f"{path}: " + "; ".join(problems)
        if strict:
            raise FormatError(message + " (strict=False to load the rest)")
        warnings.warn(message, stacklevel=2)
    return out


def _map_modules(out: AdapterFile, components: Mapping[str, nn.Module], arch: str) -> None:
    from sdtune import names

    table = names.name_map(dict(components), arch)
    mismatched = []
    for name, module in list(out.modules.items()):
        if name not in table:
            out.unmapped.append(name)
            continue
        module.component, module.module_path = table[name]
        weight_shape = tuple(target_layer(components, *table[name]).weight.shape)
        if not rebuild.fits(module.shape, weight_shape):
            mismatched.append(f"{name}: ΔW {module.shape} vs weight {weight_shape}")
        elif module.dora_scale is not None:
            try:
                rebuild.dora_axis(module.dora_scale, weight_shape)
            except rebuild.RebuildError as e:
                mismatched.append(f"{name}: {e}")
    out.unmapped.sort()
    if mismatched:
        raise FormatError(f"{out.path}: {len(mismatched)} module(s) do not fit the model's layers (a file for "
                          f"another base model?):\n  " + "\n  ".join(mismatched[:20]))
