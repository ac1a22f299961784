"""Applying adapter files to a live model: the one place where a file's ΔW meets the base weights.

    file ──load()──► LoadedFile {kohya name: LayerDelta}
                        ├─ AppliedFile      W ← W + w·ΔW, removable exactly        (sampling)
                        ├─ LowRankHook      out += up·(down·x) per call, switchable (composed sampling, zip's fit)
                        └─ LayerDelta.delta / .factors                              (fusion, merged checkpoints)

``load`` is the one loader from a file to per-layer updates: sdtune native files (re-attached to the model to read
their exact ΔW, then detached) and every kohya / A1111 / LyCORIS file ``formats.reader.read_kohya`` accepts. Given
the model's components, each layer is mapped to its (component, module path) and shape-checked, and a file without
metadata takes the model's architecture. The merge itself, W + ΔW with the finiteness check, is
``adapters.functional.merged_weight``, shared with ``Adapter.merge``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .adapters import functional as Fn
from .adapters.functional import Factors, merged_weight
from .formats import rebuild
from .formats.reader import FormatError, model_arch, read_kohya, target_layer
from .names import name_map


# ------------------------------------------------------------------------------------------------ layers

def lora_factors(group: Mapping[str, Tensor]) -> Factors:
    """(up (out, r), down (r, d)) in float64 of a LoRA / LoCon / Tucker group, its scale folded into ``up``:
    ΔW.reshape(out, d) = up @ down exactly (Tucker: down = the folded core, ``functional.fold_tucker``)."""
    g = {k: v.double() for k, v in group.items()}
    up, mid, down = rebuild.lora_chain(g)
    if mid is not None:
        down = Fn.fold_tucker(mid, down)
    return up * rebuild.scale(g), down.reshape(down.shape[0], -1)


class LayerDelta:
    """One layer's update ΔW from a file, at the base weight's ``shape``; ``component``/``module_path`` say where it
    goes in the model (None when the file was loaded without one).

    ``group``: the file's kohya tensors; ``weight``: the base weight W, needed where ΔW depends on it (DoRA: ΔW =
    W′ − W). ``factors`` = (up (out, r), down (r, d)) in float64 with ΔW.reshape(out, d) = up @ down, d = in·kh·kw:
    exact for LoRA-form groups, else the SVD at numerical rank (``error``: the relative error of dropping its numerical
    zeros), computed on first use. A LayerDelta can also be built from factors alone: ``LayerDelta((up, down), shape)``.
    """

    def __init__(self, factors: Factors | None = None, shape: tuple[int, ...] | None = None, error: float = 0.0, *,
                 group: Mapping[str, Tensor] | None = None, weight: Tensor | None = None,
                 component: str | None = None, module_path: str | None = None, name: str = ""):
        if factors is None and group is None:
            raise ValueError("LayerDelta needs factors or a kohya tensor group")
        self.name, self.group, self.weight = name, group, weight
        self.component, self.module_path = component, module_path
        if shape is None:
            shape = tuple(weight.shape) if weight is not None else rebuild.delta_shape(group)
        self.shape = tuple(shape)
        self._factors, self._error = factors, error

    @property
    def is_dora(self) -> bool:
        return self.group is not None and "dora_scale" in self.group

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ΔW in ``shape`` and ``dtype``; DoRA: W′ − W against ``weight`` (A1111's rule, α/r before the norm)."""
        if self.group is None:
            return (self._factors[0] @ self._factors[1]).reshape(self.shape).to(dtype)
        if self.weight is not None:
            return rebuild.effective_delta(self.group, self.weight, 1.0, dtype)
        if self.is_dora:
            raise FormatError(f"{self.name}: a DoRA module's ΔW depends on the base weight; pass the base model "
                              f"(--model)")
        return rebuild.group_delta(self.group, self.shape, dtype)

    @property
    def factors(self) -> Factors:
        if self._factors is None:
            if rebuild.detect_kind(self.group) == "lora" and not self.is_dora:
                self._factors = lora_factors(self.group)
            else:
                delta = self.delta(torch.float64)
                up, down, self._error = Fn.factorize(delta.reshape(delta.shape[0], -1))
                self._factors = (up, down)
        return self._factors

    @property
    def error(self) -> float:
        self.factors  # noqa: B018 (factoring sets the error)
        return self._error


@dataclass
class LoadedFile:
    """An adapter file as per-layer updates. ``arch``: the file's architecture, or the model's when the file does
    not say (no metadata, no telling names) and it was loaded against a model."""

    label: str
    path: Path
    arch: str | None
    metadata: dict[str, str]
    layers: dict[str, LayerDelta]
    native: bool = False


def is_native(path) -> bool:
    """True for an sdtune native adapter file (``Injection.save``); False for anything else, including files that are
    missing or unreadable (``load`` says what is wrong with those)."""
    from .inject import FORMAT

    path = Path(path)
    if path.suffix == ".sdtune":
        return True
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("sdtune_format") == FORMAT
    except Exception:  # safetensors raises its own error types for missing and corrupt files
        return False


def base_weight(components: Mapping[str, nn.Module], component: str, module_path: str) -> Tensor:
    """The un-adapted weight W of a layer (looking through an attached sdtune Adapter, merged or not), detached."""
    module = components[component].get_submodule(module_path)
    if hasattr(module, "original_weight"):
        return module.original_weight().detach()
    return target_layer(components, component, module_path).weight.detach()


def injection_layers(injection) -> dict[str, LayerDelta]:
    """The layers of a live ``inject.Injection`` as they export (``kohya_tensors``), against their base weights."""
    with torch.no_grad():
        return {name: LayerDelta(group=a.kohya_tensors(), weight=a.original_weight().detach(), name=name,
                                 component=injection.places[name].component, module_path=injection.places[name].path)
                for name, a in injection.adapters.items()}


def load(path, components: Mapping[str, nn.Module] | None = None, arch: str | None = None, *,
         strict: bool = True) -> LoadedFile:
    """Read an adapter file into per-layer updates (see the module docstring).

    ``components``: the live model's ``{"unet", "text_encoder"[, "text_encoder_2"]}``; without it, layers are not
    mapped, a native file cannot be read and DoRA layers cannot be rebuilt. ``arch`` defaults to the model's.
    ``strict`` as in ``read_kohya``. Errors are ``FormatError`` (``FileNotFoundError`` for a missing file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if is_native(path):
        from .inject import Injection

        if components is None:
            raise FormatError(f"{path}: a native sdtune file needs the base model to rebuild its ΔW (--model)")
        injection = Injection.load(path, dict(components), arch)
        try:
            layers = injection_layers(injection)
        finally:
            injection.detach()
        return LoadedFile(path.stem, path, injection.arch, {}, layers, native=True)
    file = read_kohya(path, components, arch, strict=strict)
    layers = {}
    for name, module in file.modules.items():
        mapped = components is not None and module.component is not None
        weight = base_weight(components, module.component, module.module_path) if mapped else None
        layers[name] = LayerDelta(group=module.tensors, weight=weight, name=name, component=module.component,
                                  module_path=module.module_path)
    file_arch = file.arch
    if file_arch is None and components is not None:
        file_arch = arch or model_arch(components)
    return LoadedFile(path.stem, path, file_arch, file.metadata, layers)


def find_layers(components: Mapping[str, nn.Module], arch: str, names: Sequence[str]) -> dict[str, nn.Module]:
    """{kohya name: the model's Linear/Conv2d}; a FormatError naming up to five names the model lacks."""
    table = name_map(dict(components), arch)
    missing = [n for n in names if n not in table]
    if missing:
        raise FormatError(f"{len(missing)} layer(s) are not in the base model: {', '.join(missing[:5])}")
    return {n: target_layer(components, *table[n]) for n in names}


# ------------------------------------------------------------------------------------------ into weights

class AppliedFile:
    """A file's ΔW added into live weights at a strength, W ← W + w·ΔW, removable again (``remove`` or ``with``).

    Each weight gets a new tensor (``param.data``), computed and checked for every layer before any is swapped in;
    ``remove`` puts the original tensor back, so the restore is exact. Files on shared layers come off in reverse
    order: removing a file whose tensor was since replaced (by a later file) or changed in place is an error, not a
    silent mix.
    """

    def __init__(self, components: Mapping[str, nn.Module], file: LoadedFile, weight: float = 1.0):
        self.components, self.file, self.weight = components, file, float(weight)
        self._saved: dict[str, tuple[nn.Parameter, Tensor, Tensor, int]] = {}  # param, original, ours, version

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    @torch.no_grad()
    def apply(self) -> AppliedFile:
        if self._saved:
            raise RuntimeError(f"{self.file.path} is already applied")
        new = {}
        for name, layer in self.file.layers.items():
            if layer.component is None:
                continue
            param = target_layer(self.components, layer.component, layer.module_path).weight
            dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
            value = merged_weight(param.detach().to(dtype), layer.delta(dtype) * self.weight,
                                  f"{self.file.path}: {name}")
            new[name] = (param, value.to(param.dtype))
        for name, (param, value) in new.items():
            self._saved[name] = (param, param.data, value, param._version)
            param.data = value
        return self

    @torch.no_grad()
    def remove(self) -> None:
        later = [n for n, (p, _, ours, _) in self._saved.items() if p.data_ptr() != ours.data_ptr()]
        if later:
            raise RuntimeError(f"files applied after {self.file.path} still touch {', '.join(later[:4])}; remove "
                               f"applied files in reverse order")
        changed = [n for n, (p, _, _, v) in self._saved.items() if p._version != v]
        if changed:
            raise RuntimeError(f"layers were changed by something else after {self.file.path} was applied "
                               f"({', '.join(changed[:4])}); not restoring over those changes")
        for param, original, _, _ in self._saved.values():
            param.data = original
        self._saved.clear()

    def __enter__(self) -> AppliedFile:
        return self if self._saved else self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_file(components: Mapping[str, nn.Module], arch: str | None, path, weight: float = 1.0, *,
               strict: bool = True) -> AppliedFile:
    """``load`` ``path`` against the live model and add its ΔW × ``weight``; returns the (applied) handle."""
    return AppliedFile(components, load(path, components, arch, strict=strict), weight).apply()


# ------------------------------------------------------------------------------------------------ hooks

def hook_parts(components: Mapping[str, nn.Module], arch: str, files: Sequence[LoadedFile],
               weights: Sequence[float] | None = None) -> dict[str, tuple[nn.Module, list[tuple[int, Factors]]]]:
    """{kohya name: (the model's layer, [(file index i, (w_i·up_i, down_i))])} for every layer a file adapts:
    what ``LowRankHook`` takes."""
    weights = [1.0] * len(files) if weights is None else [float(w) for w in weights]
    found = find_layers(components, arch, list(dict.fromkeys(n for f in files for n in f.layers)))
    return {name: (layer, [(i, (w * f.layers[name].factors[0], f.layers[name].factors[1]))
                           for i, (f, w) in enumerate(zip(files, weights)) if name in f.layers])
            for name, layer in found.items()}


class LowRankHook:
    """A forward hook on one base Linear/Conv2d adding low-rank updates, switchable between calls.

    parts: [(i, (up_i (out, r), down_i (r, d)))], each input's weight already in ``up``. ``mode`` None: off; an
    int i: input i alone; "fused": Σ_i up_i (down_i diag(m_i)) with ``merger`` m_i (d,), 1 unless changed (zip).
    """

    def __init__(self, layer: nn.Module, parts: list[tuple[int, Factors]]):
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("low-rank hooks (zip, composed sampling): grouped convolutions are not supported")
        self.layer, self.mode = layer, None
        dev, dt = layer.weight.device, layer.weight.dtype
        self.parts = {i: (up.to(dev, dt), down.to(dev, dt)) for i, (up, down) in parts}
        self.merger = {i: torch.ones(down.shape[1], device=dev, dtype=dt) for i, (_, down) in parts}
        self.handle = layer.register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    def _apply(self, x: Tensor, up: Tensor, down: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(x, down.reshape(down.shape[0], *layer.weight.shape[1:]), None, layer.stride, layer.padding,
                         layer.dilation)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    def _hook(self, _module, args, out):
        if self.mode is None:
            return out
        if self.mode != "fused":
            if self.mode not in self.parts:
                return out
            return out + self._apply(args[0], *self.parts[self.mode])
        for i, (up, down) in self.parts.items():
            out = out + self._apply(args[0], up, down * self.merger[i])
        return out
