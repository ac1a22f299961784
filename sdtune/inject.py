"""Which modules get which adapter: presets, attach / detach / merge / unmerge, trainable state, native files.

Presets name module classes the way users know them (matched with isinstance, never by class-name strings):
  attn   Transformer2DModel: proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2
  resnet ResnetBlock2D: conv1, conv2, conv_shortcut, time_emb_proj
  sample Downsample2D / Upsample2D: conv
  te     CLIPAttention q/k/v/out_proj, CLIPMLP fc1/fc2 of every text encoder given (q, k, v and out together:
         A1111 and diffusers ignore partial attention sets, see LOADER-FACTS.md); on SDXL not TE1's last layer,
         whose output SDXL never reads
``attach(components, [(preset, spec), …], arch)`` resolves and validates every target before touching the model,
then swaps each layer for its ``Adapter`` with setattr on the parent; a later rule overrides an earlier one for the
same module, so per-target overrides are one table:
    attach(pipe_components, [("attn", AdapterSpec("dora", rank=8)), ("resnet", AdapterSpec("flora", rank=8))], "sd1")
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from . import scope as block_scope
from .adapters import PRESETS, Adapter, AdapterSpec, build_adapter, validate_layer
from .atomic import atomic_path
from .names import kohya_name

FORMAT = "native-1"

# (container class, child attribute paths) per preset; a missing or None child is skipped.
_PRESET_TABLE: dict[str, list[tuple[type, tuple[str, ...]]]] = {
    "attn": [(Transformer2DModel, ("proj_in", "proj_out")),
             (Attention, ("to_q", "to_k", "to_v", "to_out.0")),
             (FeedForward, ("net.0.proj", "net.2"))],
    "resnet": [(ResnetBlock2D, ("conv1", "conv2", "conv_shortcut", "time_emb_proj"))],
    "sample": [(Downsample2D, ("conv",)), (Upsample2D, ("conv",))],
    "te": [(CLIPAttention, ("q_proj", "k_proj", "v_proj", "out_proj")), (CLIPMLP, ("fc1", "fc2"))],
}


def _child(module: nn.Module, attr_path: str) -> nn.Module | None:
    for part in attr_path.split("."):
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if isinstance(module, (nn.ModuleList, nn.Sequential)) else None)
        if module is None:
            return None
    return module


def preset_targets(preset: str, components: dict[str, nn.Module], arch: str | None = None) -> list[tuple[str, str]]:
    """(component, module path) of every layer ``preset`` names, in module order. With ``arch`` "sdxl", "te" leaves
    out TE1's last layer: SDXL reads TE1's penultimate hidden states and not its pooled output, so that layer's
    output is never used and adapters there would never train. A scoped preset (``attn@down_blocks.1,mid_block``,
    ``te@layers.0-5``; ``sdtune.scope``) keeps the layers of those blocks / text-encoder layers only."""
    preset, scope_items = block_scope.split(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
    out: list[tuple[str, str]] = []
    for component, root in components.items():
        if (component == "unet") == (preset == "te"):
            continue
        scopes = [(p, m) for p, m in root.named_modules() if isinstance(m, Transformer2DModel)] \
            if preset == "attn" else [("", root)]
        for scope_path, scope in scopes:
            for sub, mod in scope.named_modules():
                path = ".".join(p for p in (scope_path, sub) if p)
                for cls, children in _PRESET_TABLE[preset]:
                    if not isinstance(mod, cls):
                        continue
                    for child in children:
                        target = _child(mod, child)
                        if target is None or isinstance(target, (nn.AvgPool2d, nn.Identity)):
                            continue             # e.g. Downsample2D without a conv: nothing to adapt
                        out.append((component, f"{path}.{child}" if path else child))
    if preset == "te" and arch == "sdxl" and "text_encoder" in components:
        last = f"encoder.layers.{components['text_encoder'].config.num_hidden_layers - 1}."
        out = [(c, p) for c, p in out if not (c == "text_encoder" and last in f"{p}.")]
    return [(c, p) for c, p in out if block_scope.covers(scope_items, c, p)]


@dataclass
class _Place:
    component: str
    path: str
    parent: nn.Module
    attr: str


def _place(components: dict[str, nn.Module], component: str, path: str) -> _Place:
    parent_path, _, attr = path.rpartition(".")
    root = components[component]
    return _Place(component, path, root.get_submodule(parent_path) if parent_path else root, attr)


def attach(components: dict[str, nn.Module], rules: Sequence[tuple[str, AdapterSpec]], arch: str, *,
           svd_cache_dir: str | Path | None = None) -> "Injection":
    """Attach adapters per (preset, spec) rules; see the module docstring. Nothing is changed if any check fails."""
    if not rules:
        raise ValueError("attach: no rules given")
    table: dict[tuple[str, str], AdapterSpec] = {}
    for preset, spec in rules:
        if not isinstance(spec, AdapterSpec):
            raise TypeError(f"attach: rule for preset {preset!r} has {type(spec).__name__}, expected AdapterSpec")
        targets = preset_targets(preset, components, arch)
        if not targets:
            raise ValueError(f"preset {preset!r} matches no module in components {sorted(components)}")
        for key in targets:
            table[key] = spec
    checked: list[tuple] = []
    seen: dict[str, tuple[str, str]] = {}
    for (component, path), spec in table.items():
        place = _place(components, component, path)
        layer = getattr(place.parent, place.attr) if not place.attr.isdigit() else place.parent[int(place.attr)]
        if isinstance(layer, Adapter):
            raise ValueError(f"{component}.{path} already has an adapter ({layer.kohya_name}); detach it first")
        name = kohya_name(component, path, arch)
        if name in seen:
            raise ValueError(f"{name}: kohya name shared by {seen[name]} and {(component, path)}")
        seen[name] = (component, path)
        info = validate_layer(layer, spec, f"{name} ({component}.{path})")
        checked.append((name, place, spec, layer, info))
    adapters = {name: build_adapter(layer, spec, name, info, svd_cache_dir=svd_cache_dir)
                for name, place, spec, layer, info in checked}
    for name, place, *_ in checked:
        _set(place, adapters[name])
    return Injection(arch, adapters, {name: place for name, place, *_ in checked}, list(rules))


def _set(place: _Place, module: nn.Module) -> None:
    if place.attr.isdigit():
        place.parent[int(place.attr)] = module
    else:
        setattr(place.parent, place.attr, module)


@contextmanager
def plain_layers(components: Mapping[str, nn.Module]) -> Iterator[dict[tuple[str, str], Adapter]]:
    """Put every attached sdtune Adapter's frozen base layer back in its place for the block, so that state_dict()
    and save_pretrained() see the plain model (merged weights included, if merged); yields {(component, path):
    adapter}, and re-wraps on exit."""
    found = {(c, p): m for c, root in components.items() for p, m in root.named_modules() if isinstance(m, Adapter)}
    places = {key: _place(dict(components), *key) for key in found}
    try:
        for key, adapter in found.items():
            _set(places[key], adapter.base)
        yield found
    finally:
        for key, adapter in found.items():
            _set(places[key], adapter)


class Injection:
    """The adapters attached to one model: ``adapters`` maps kohya name -> Adapter, in attach order."""

    def __init__(self, arch: str, adapters: dict[str, Adapter], places: dict[str, _Place],
                 rules: list[tuple[str, AdapterSpec]]):
        self.arch = arch
        self.adapters = adapters
        self.places = places
        self.rules = rules
        self.attached = True

    # --- life cycle --------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Put the original layer objects back (unmerging first where merged)."""
        for name, adapter in self.adapters.items():
            if adapter.merged:
                adapter.unmerge()
            _set(self.places[name], adapter.base)
        self.attached = False

    def merge(self) -> None:
        for adapter in self.adapters.values():
            adapter.merge()

    def unmerge(self) -> None:
        for adapter in self.adapters.values():
            adapter.unmerge()

    # --- parameters and state ----------------------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.{n}", p) for name, a in self.adapters.items() for n, p in a.trainable_named_parameters()]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters() if p.requires_grad]

    def num_params(self) -> int:
        return sum(a.num_params() for a in self.adapters.values())

    def state_dict(self) -> dict[str, Tensor]:
        """"<kohya_name>.<param>" -> the native (un-folded) trainable tensors, detached."""
        return {k: p.detach() for k, p in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> list[str]:
        """Copy tensors in; shapes must match. strict: missing or unexpected keys raise. Returns unused keys."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(sd))
        unexpected = sorted(set(sd) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"adapter state mismatch: missing {missing[:5]}{'…' if len(missing) > 5 else ''} "
                           f"({len(missing)}), unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''} "
                           f"({len(unexpected)})")
        for key, value in sd.items():
            if key in params:
                if tuple(value.shape) != tuple(params[key].shape):
                    raise ValueError(f"{key}: shape {tuple(value.shape)} in the state, "
                                     f"{tuple(params[key].shape)} in the model")
                params[key].copy_(value)
        return unexpected

    # --- native files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Native safetensors file (atomic: temp file in the same folder, then os.replace)."""
        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        metadata = {"sdtune_format": FORMAT, "sdtune_arch": self.arch,
                    "sdtune_rules": json.dumps([[preset, spec.to_dict()] for preset, spec in self.rules])}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @staticmethod
    def specs_from_file(path: str | Path) -> tuple[str, list[tuple[str, AdapterSpec]]]:
        """(arch, rules) stored in a native file."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("sdtune_format") != FORMAT:
            raise ValueError(f"{path}: not an sdtune native adapter file (sdtune_format="
                             f"{meta.get('sdtune_format')!r}, expected {FORMAT!r})")
        rules = [(preset, AdapterSpec.from_dict(spec)) for preset, spec in json.loads(meta["sdtune_rules"])]
        return meta["sdtune_arch"], rules

    @classmethod
    def load(cls, path: str | Path, components: dict[str, nn.Module], arch: str | None = None, *,
             svd_cache_dir: str | Path | None = None) -> "Injection":
        """Re-attach the file's rules to ``components`` and load its tensors exactly."""
        file_arch, rules = cls.specs_from_file(path)
        if arch is not None and arch != file_arch:
            raise ValueError(f"{path}: adapters were trained for {file_arch!r}, not {arch!r}")
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        inj = attach(components, rules, file_arch, svd_cache_dir=svd_cache_dir)
        inj.load_state_dict(sd, strict=True)
        return inj

    # --- report ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """Which module got which adapter, then parameters per block and in total."""
        rows = [("module", "layer", "adapter", "params")]
        blocks: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, a in self.adapters.items():
            place = self.places[name]
            kind = f"{type(a.base).__name__}{tuple(a.base.weight.shape)}"
            s = a.spec
            algo = s.algorithm + (f"[{s.dora_base},{s.dora_axis}]" if s.algorithm == "dora" else "") + \
                (f"[{s.spectral_mode},slot {s.slot}]" if s.algorithm == "spectral" else "") + \
                ("+tucker" if s.tucker else "")
            rows.append((name, kind, f"{algo} r{s.rank}", f"{a.num_params():,}"))
            parts = place.path.split(".")
            block = place.component + ("." + ".".join(parts[:2]) if place.component == "unet" and len(parts) > 1
                                       and parts[1].isdigit() else "." + parts[0] if place.component == "unet"
                                       else "")
            blocks[block][0] += 1
            blocks[block][1] += a.num_params()
        rows.append(("", "", "", ""))
        rows.append(("block", "adapters", "", "params"))
        rows += [(b, str(n), "", f"{p:,}") for b, (n, p) in blocks.items()]
        rows.append(("total", str(len(self.adapters)), "", f"{self.num_params():,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                         .rstrip() for r in rows)
