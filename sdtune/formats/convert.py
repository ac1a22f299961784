"""``sdtune convert``: LoRA files between diffusers/PEFT names and kohya/A1111 names (SD1, SD2, SDXL), exactly.

The factors are copied bit for bit; only names and the scale's bookkeeping change. Both sides scale a module's
update by alpha / r with r = the stored rank (A1111: ``alpha`` tensor over ``lora_down.shape[0]``; PEFT:
``lora_alpha`` (or its ``alpha_pattern`` entry) over the module's rank), so a module's kohya ``alpha`` equals its
PEFT ``lora_alpha``; rsLoRA files (alpha / √r) are written with alpha·√r. A diffusers file without adapter
metadata has scale 1 (diffusers loads it with lora_alpha = r).

Formats read (``detect_format``):
  kohya       ``lora_unet_…`` / ``lora_te…`` keys, ``lora_down``/``lora_up``/``alpha`` (also LyCORIS's files)
  diffusers   ``<component>.<module path>.lora_A.weight`` / ``lora_B.weight`` (``save_lora_weights``, PEFT under a
              component prefix), also the older ``.lora.down``/``.lora.up``, ``.lora_linear_layer.down``/``up``
              and attention-processor ``processor.to_q_lora.down`` forms, with optional ``<module>.alpha`` keys;
              PEFT's scale settings from the ``lora_adapter_metadata`` header entry
  peft        ``base_model.model.<module path>.lora_A.weight`` (one component: ``PeftModel.save_pretrained``)
Names map through a module tree (``layout``): the base model's when given, else the published U-Net and
text-encoder layouts of the architecture (built on the meta device, nothing allocated), plus the embedded model's
for SD1. A key that maps to no module of that tree, a prefix that is no component of the architecture (e.g.
``transformer``, a DiT's), and a module kohya files cannot hold in diffusers' LoRA form (DoRA, LoHa, LoKr, full)
is reported, never silently dropped.
"""
from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .. import atomic, names
from . import rebuild
from ..safefile import FormatError, check_safetensors
from .reader import read_kohya

FORMATS = ("kohya", "diffusers", "peft")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry holding each component's LoraConfig
PEFT_PREFIX = "base_model.model."

# <module>.<factor>.weight in its diffusers/PEFT spellings -> "down" / "up"
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                     r"lora_linear_layer\.up)\.weight$")
# attention-processor form: <attn>.processor.to_q_lora.down.weight (U-Net), <attn>.to_q_lora.down.weight (TE)
_PROCESSOR = re.compile(r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)"
                        r"\.weight$")
_PROCESSOR_PATH = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "te": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_DOWN = {"lora_A", "lora.down", "lora_linear_layer.down", "down"}


@dataclass
class Conversion:
    """A converted file before it is written: kohya groups (or diffusers tensors), what could not be mapped."""

    source_format: str
    arch: str
    groups: dict[str, dict[str, Tensor]]                     # kohya name -> {lora_down, lora_up, alpha}
    paths: dict[str, tuple[str, str]]                        # kohya name -> (component, module path)
    unmappable: dict[str, str] = field(default_factory=dict)  # key -> why
    folded: list[str] = field(default_factory=list)          # Tucker modules folded into lora_down

    def summary(self) -> str:
        comps = Counter(c for c, _ in self.paths.values())
        lines = [f"{self.source_format} file, {self.arch.upper()}: {len(self.groups)} modules "
                 f"({', '.join(f'{c} {n}' for c, n in sorted(comps.items()))})"]
        if self.folded:
            lines.append(f"  {len(self.folded)} Tucker module(s) folded into lora_down (exact up to rounding)")
        if self.unmappable:
            lines.append(f"  {len(self.unmappable)} key(s) not converted:")
            lines += [f"    {k}: {why}" for k, why in list(self.unmappable.items())[:30]]
            if len(self.unmappable) > 30:
                lines.append(f"    … ({len(self.unmappable)} in all)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ detection

def detect_format(keys: Iterable[str]) -> str:
    """``kohya`` | ``diffusers`` | ``peft`` from a file's tensor names (``unknown`` when none fits)."""
    keys = list(keys)
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(_FACTOR.match(k) or _PROCESSOR.match(k) for k in keys):
        return "diffusers"
    if any(k.partition(".")[2] in rebuild.KNOWN_KEYS for k in keys):
        return "kohya"
    return "unknown"


def file_format(path) -> str:
    """The format of an adapter file (``detect_format`` of its header's tensor names)."""
    header = check_safetensors(Path(path))
    return detect_format(k for k in header if k != "__metadata__")


# --------------------------------------------------------------------------------------------------- layouts

def _meta_components(arch: str) -> dict[str, nn.Module]:
    from ..archs import build_random

    return build_random(arch, device="meta").components()


def _embedded_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    from ..models import EMBEDDED

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(EMBEDDED / "unet"))


def layout(arch: str, components: Mapping[str, nn.Module] | None = None) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module path) of ``components``, or of ``arch``'s published layout (and, for SD1,
    the embedded model's U-Net); module paths are those of the installed diffusers/transformers classes."""
    if components is not None:
        return names.name_map(dict(components), arch)
    return dict(_published_layout(arch))


@functools.lru_cache(maxsize=None)
def _published_layout(arch: str) -> dict[str, tuple[str, str]]:
    table = names.name_map(_meta_components(arch), arch)
    if arch == "sd1":
        table.update(names.name_map({"unet": _embedded_unet()}, arch))
    return table


def _component_arch(components: Iterable[str], unet_paths: set[str]) -> tuple[str, str]:
    """(arch, evidence) of a diffusers file from its components and U-Net module paths."""
    if "text_encoder_2" in components:
        return "sdxl", "a text_encoder_2 component"
    if not unet_paths:
        return "sd1", "text encoder only (SD1 and SD2 share the names)"
    fits = [a for a in ("sdxl", "sd1") if unet_paths <= {p for c, p in layout(a).values() if c == "unet"}]
    if fits == ["sdxl"]:
        return "sdxl", "its U-Net modules exist only in SDXL's layout"
    return "sd1", "its U-Net modules fit the SD1/SD2 layout (both share the names)"


# ------------------------------------------------------------------------------------------ diffusers side

def _pattern_value(patterns: Mapping[str, float], path: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key k with path ~ ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _adapter_config(metadata: Mapping[str, str], component: str) -> dict:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    return {k.removeprefix(component + "."): v for k, v in packed.items() if k.startswith(component + ".")}


def _split(key: str, fmt: str, peft_component: str) -> tuple[str, str, str] | None:
    """(component, module path, "down"|"up"|"alpha") of a diffusers/PEFT key, or None."""
    if fmt == "peft":
        if not key.startswith(PEFT_PREFIX):
            return None
        component, rest = peft_component, key.removeprefix(PEFT_PREFIX)
    else:
        component, _, rest = key.partition(".")
    if rest.endswith(".alpha"):
        return component, rest.removesuffix(".alpha"), "alpha"
    m = _FACTOR.match(rest)
    if m:
        return component, m["module"], "down" if m["factor"] in _DOWN else "up"
    m = _PROCESSOR.match(rest)
    if m:
        proj = _PROCESSOR_PATH["unet" if component == "unet" else "te"][m["proj"]]
        return component, f"{m['attn']}.{proj}", m["side"]
    return None


def read_diffusers(state: Mapping[str, Tensor], metadata: Mapping[str, str], *, fmt: str = "diffusers",
                   peft_component: str = "unet", arch: str | None = None,
                   components: Mapping[str, nn.Module] | None = None) -> Conversion:
    """A diffusers/PEFT state dict as kohya groups (tensors shared, not copied)."""
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    keys_of: dict[tuple[str, str], list[str]] = {}
    unmappable: dict[str, str] = {}
    for key, value in state.items():
        module, _, tail = key.rpartition(".lora_magnitude_vector")
        if module and tail in ("", ".weight"):      # PEFT DoRA: its norm axis has no exact kohya form
            split = _split(module + ".alpha", fmt, peft_component)
            split = split and (split[0], split[1], "magnitude")
        else:
            split = _split(key, fmt, peft_component)
        if split is None:
            unmappable[key] = "not a LoRA factor (a bias, or another algorithm)"
            continue
        component, path, side = split
        parts.setdefault((component, path), {})[side] = value
        keys_of.setdefault((component, path), []).append(key)
    if arch is None:
        arch, _ = _component_arch({c for c, _ in parts}, {p for c, p in parts if c == "unet"})
    table = layout(arch, components)
    known = set(table.values())
    te_prefixes = names.TE_PREFIXES[arch]
    groups: dict[str, dict[str, Tensor]] = {}
    paths: dict[str, tuple[str, str]] = {}
    configs = {c: _adapter_config(metadata, c) for c in {c for c, _ in parts}}
    for (component, path), tensors in parts.items():
        why = None
        if component != "unet" and component not in te_prefixes:
            why = f"component {component!r} is not part of {arch.upper()} (unet, {', '.join(te_prefixes)})"
        elif "magnitude" in tensors:
            why = "DoRA (lora_magnitude_vector): PEFT's output-axis norm has no exact A1111 form"
        elif "down" not in tensors or "up" not in tensors:
            why = "only one of the two LoRA factors"
        if why is None:
            try:
                name = names.kohya_name(component, path, arch)
            except ValueError as e:
                name, why = None, str(e)
            if name is not None and component == "unet" and (component, path) not in known:
                why = f"no module {path!r} in the {arch.upper()} U-Net layout"
        if why is not None:
            unmappable.update({k: why for k in keys_of[(component, path)]})
            continue
        down, up = tensors["down"], tensors["up"]
        rank = down.shape[0]
        config = configs[component]
        if "alpha" in tensors:
            alpha = float(tensors["alpha"])
        elif config:
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)))
            if config.get("use_rslora"):
                alpha *= math.sqrt(rank)          # PEFT scales by alpha/√r; kohya files by alpha/r
        else:
            alpha = float(rank)                   # diffusers' default for files without metadata: scale 1
        groups[name] = {"lora_down.weight": down, "lora_up.weight": up,
                        "alpha": torch.tensor(alpha, dtype=torch.float32)}
        paths[name] = (component, path)
    return Conversion(fmt, arch, groups, paths, unmappable)


def diffusers_tensors(conv: Conversion, fmt: str = "diffusers") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a diffusers (``<component>.<path>.lora_A/B.weight`` plus the PEFT config of
    each component in ``lora_adapter_metadata``) or PEFT (``base_model.model.<path>…``, one component) file."""
    tensors: dict[str, Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    for name, group in conv.groups.items():
        component, path = conv.paths[name]
        prefix = PEFT_PREFIX if fmt == "peft" else f"{component}."
        tensors[f"{prefix}{path}.lora_A.weight"] = group["lora_down.weight"]
        tensors[f"{prefix}{path}.lora_B.weight"] = group["lora_up.weight"]
        rank = int(group["lora_down.weight"].shape[0])
        alpha = rebuild.scale(group) * rank       # the PEFT lora_alpha that gives the same alpha/r
        per_component.setdefault(component, {})[path] = (rank, alpha)
    if fmt == "peft" and len(per_component) > 1:
        raise FormatError(f"a PEFT file holds one component; this file has {sorted(per_component)} (write "
                          f"--to diffusers, or one PEFT file per component)")
    packed = {}
    for component, modules in per_component.items():
        config = peft_config(modules)
        packed.update({f"{component}.{k}": v for k, v in config.items()} if fmt == "diffusers" else config)
    key = METADATA_KEY if fmt == "diffusers" else "peft_config"
    return tensors, {"format": "pt", key: json.dumps(packed, sort_keys=True)}


def peft_config(modules: Mapping[str, tuple[int, float]]) -> dict:
    """LoraConfig fields for {module path: (rank, alpha)}: the most common rank/alpha, the rest as patterns keyed
    by the full module path, target_modules the exact paths."""
    r = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {p: rk for p, (rk, _) in modules.items() if rk != r},
            "alpha_pattern": {p: a for p, (_, a) in modules.items() if a != alpha},
            "peft_type": "LORA", "use_dora": False, "use_rslora": False, "lora_dropout": 0.0, "bias": "none"}


# ---------------------------------------------------------------------------------------------- kohya side

def read_kohya_groups(path, arch: str | None = None, components: Mapping[str, nn.Module] | None = None
                      ) -> Conversion:
    """A kohya/A1111 file as groups mapped to diffusers module paths; Tucker cores are folded into ``lora_down``
    (diffusers' LoRA form has no core); DoRA, LoHa, LoKr and full modules are reported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # unknown keys are reported below
        file = read_kohya(path, strict=False)
    arch = arch or file.arch or ("sdxl" if any(n.startswith("lora_unet_input_blocks") for n in file.modules)
                                 else "sd1")
    table = layout(arch, components)
    unmappable = {k: "not an adapter tensor" for k in file.unknown_keys}
    groups, paths, folded = {}, {}, []
    for name, module in file.modules.items():
        why = None
        if module.kind != "lora" or module.dora_scale is not None:
            why = f"{module.algorithm} has no diffusers LoRA form"
        elif name not in table:
            why = f"no module of the {arch.upper()} layout has this name"
        if why is not None:
            unmappable.update({f"{name}.{k}": why for k in module.tensors})
            continue
        group = dict(module.tensors)
        if "lora_mid.weight" in group:
            group = rebuild.fold_tucker(group)
            folded.append(name)
        if "scale" in group or float(group.get("alpha", torch.tensor(0.0))) == 0.0:
            group["alpha"] = torch.tensor(rebuild.scale(group) * group["lora_down.weight"].shape[0])
            group.pop("scale", None)
        groups[name], paths[name] = group, table[name]
    return Conversion("kohya", arch, groups, paths, unmappable, folded)


# ------------------------------------------------------------------------------------------------- files

def read_any(path, *, arch: str | None = None, components: Mapping[str, nn.Module] | None = None,
             peft_component: str = "unet") -> Conversion:
    """Any supported LoRA file as a ``Conversion`` (format from its keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if arch is None and components is not None:
        from .reader import model_arch

        arch = model_arch(components)
    fmt = file_format(path)
    if fmt == "kohya":
        return read_kohya_groups(path, arch, components)
    if fmt == "unknown":
        raise FormatError(f"{path}: no LoRA tensors in a format sdtune knows (kohya lora_down/lora_up, diffusers "
                          f"lora_A/lora_B or .lora.down, PEFT base_model.model.…)")
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    state = safetensors.torch.load_file(str(path))
    if fmt == "peft" and "peft_config" in metadata:
        metadata = {METADATA_KEY: json.dumps({f"{peft_component}.{k}": v
                                              for k, v in json.loads(metadata["peft_config"]).items()})}
    return read_diffusers(state, metadata, fmt=fmt, peft_component=peft_component, arch=arch,
                          components=components)


def convert_file(src, out, to: str, *, arch: str | None = None, components: Mapping[str, nn.Module] | None = None,
                 partial: bool = False, peft_component: str = "unet") -> Conversion:
    """Convert ``src`` (any supported format) to ``to`` (``FORMATS``) at ``out``. Keys that cannot be converted
    are an error listing them, unless ``partial`` (then they are left out and listed in the result and in the
    written file's metadata). Tensors keep their dtype."""
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected one of {FORMATS}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: adapter files are written as .safetensors")
    conv = read_any(src, arch=arch, components=components, peft_component=peft_component)
    if conv.unmappable and not partial:
        raise FormatError(f"{src}: {len(conv.unmappable)} key(s) cannot be converted (--partial writes the "
                          f"rest):\n  " + "\n  ".join(f"{k}: {w}" for k, w in list(conv.unmappable.items())[:20]))
    if not conv.groups:
        raise FormatError(f"{src}: nothing to convert")
    note = {"converted_from": conv.source_format, "source": Path(src).name,
            "left_out": sorted(conv.unmappable)} if conv.unmappable else \
        {"converted_from": conv.source_format, "source": Path(src).name}
    if to == "kohya":
        from .kohya import save_kohya

        dtypes = {t.dtype for g in conv.groups.values() for k, t in g.items() if k != "alpha"}
        save_kohya(conv.groups, out, arch=conv.arch, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
                   metadata={"ss_sdtune_convert": json.dumps(note)}, verify=False)
    else:
        tensors, metadata = diffusers_tensors(conv, to)
        metadata["sdtune_convert"] = json.dumps(note)
        atomic.write_bytes(out, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata))
    return conv
