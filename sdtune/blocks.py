"""Block weights: per-block strengths for an adapter file, in the notation of A1111's LoRA-block-weight extension.

Every adapted layer belongs to one block, named as that extension names them from the layer's LDM path
(``names.ldm_unet_path`` of the model's own U-Net config): ``BASE`` (the text encoders), ``IN00``…, ``M00`` (alias
``MID``), ``OUT00``…; U-Net layers outside the three block stacks (time / label embedding, ``conv_out``) belong to
no block and keep their strength. A spec is one of
  a preset        ``NONE``, ``ALL``, ``INS``, ``IND``, ``INALL``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL``, ``ALL0.5``
  a vector        17 values (SD1/SD2: BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03…OUT11) or 26 (BASE,
                  IN00…IN11, M00, OUT00…OUT11); SDXL: 12 (BASE, IN04, IN05, IN07, IN08, M00, OUT00…OUT05) or 20 (BASE,
                  IN00…IN08, M00, OUT00…OUT08)
  named values    ``KEY=VALUE,…`` with KEY a block ID above or an sdtune block name: ``te`` (every text encoder),
                  ``text_encoder``, ``text_encoder_2``, ``down_blocks.N``, ``mid_block``, ``up_blocks.N``, ``other``
                  (the layers outside the block stacks); sdtune names win over block IDs
Blocks a spec does not give keep strength 1 (the extension instead sends such layers to BASE's value with an error
message). SD1's presets are the extension's; SDXL's 12-value presets are sdtune's, by the same regions (INS: the
shallow attention inputs IN04/IN05, IND: the deep ones IN07/IN08, MIDD: IN07…OUT02, OUTD: OUT00…OUT02, OUTS:
OUT03…OUT05).

A weighted file scales each layer's effective ΔW (after DoRA, as A1111 applies its multiplier) by its block's
strength and leaves out layers at 0, so those keep the base weight exactly. ``fuse`` and ``merge`` bake the
weighted ΔW into what they write; ``sample`` applies it while sampling.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from torch import nn

from . import names
from .scope import unet_block

BLOCK_IDS: dict[str, dict[int, list[str]]] = {
    "sd1": {
        17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
        26: ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
    },
    "sdxl": {
        12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
        20: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)],
    },
}
BLOCK_IDS["sd2"] = BLOCK_IDS["sd1"]

PRESETS: dict[str, dict[str, str]] = {
    "sd1": {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0", "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "ALL0.5": ",".join(["0.5"] * 17),
    },
    "sdxl": {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0", "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
        "INS": "1,1,1,0,0,0,0,0,0,0,0,0", "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,0,0,0,0,0,0,0", "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
        "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0", "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
        "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1", "ALL0.5": ",".join(["0.5"] * 12),
    },
}
PRESETS["sd2"] = PRESETS["sd1"]

_SDTUNE_NAME = re.compile(r"^(te|text_encoder|text_encoder_2|down_blocks\.\d+|mid_block|up_blocks\.\d+|other)$")
_LDM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)")


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """A parsed spec: strengths by block ID and by sdtune block name (the latter win); ``text`` as given."""

    text: str
    by_id: Mapping[str, float]
    by_name: Mapping[str, float]

    def strength(self, block_id: str | None, sdtune_name: str, component: str) -> float:
        for key in (sdtune_name, component, "te" if component != "unet" else None):
            if key in self.by_name:
                return self.by_name[key]
        return self.by_id.get(block_id, 1.0) if block_id is not None else 1.0


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"block weights {spec!r}: {text!r} is not a number") from None


def parse(spec: str, arch: str) -> BlockWeights:
    """A preset, a vector or named values (module docstring) for ``arch``; one clear error for anything else."""
    text = spec.strip()
    presets = PRESETS[arch]
    if text.upper() in presets:
        text = presets[text.upper()]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts and all("=" in p for p in parts):
        by_id, by_name = {}, {}
        valid = set(BLOCK_IDS[arch][max(BLOCK_IDS[arch])])
        for part in parts:
            key, _, value = part.partition("=")
            key = key.strip()
            upper = "M00" if key.upper() == "MID" else key.upper()
            if upper in valid:
                by_id[upper] = _number(value, spec)
            elif _SDTUNE_NAME.match(key):
                by_name[key] = _number(value, spec)
            else:
                raise ValueError(f"block weights {spec!r}: unknown block {key!r}; use {arch.upper()} block IDs "
                                 f"({', '.join(sorted(valid))}, MID) or sdtune names (te, down_blocks.N, "
                                 f"mid_block, up_blocks.N, other)")
        return BlockWeights(spec, by_id, by_name)
    if any("=" in p for p in parts):
        raise ValueError(f"block weights {spec!r}: mix of a vector and named values")
    lengths = BLOCK_IDS[arch]
    if len(parts) not in lengths:
        raise ValueError(f"block weights {spec!r}: {len(parts)} values; {arch.upper()} takes "
                         f"{' or '.join(map(str, sorted(lengths)))} values, a preset ({', '.join(presets)}) or "
                         f"KEY=VALUE pairs")
    return BlockWeights(spec, dict(zip(lengths[len(parts)], (_number(p, spec) for p in parts))), {})


def block_of(component: str, module_path: str, unet_config: Mapping) -> tuple[str | None, str]:
    """(A1111 block ID or None, sdtune block name) of a layer; ``unet_config``: the model's U-Net config."""
    if component != "unet":
        return "BASE", component
    sdtune_name = unet_block(module_path)
    try:
        ldm = names.ldm_unet_path(module_path, config=unet_config)
    except ValueError:
        return None, sdtune_name
    m = _LDM_BLOCK.match(ldm)
    if m is None:
        return None, sdtune_name
    kind, index = m.group(1), int(m.group(2))
    return {"input_blocks": f"IN{index:02d}", "middle_block": "M00", "output_blocks": f"OUT{index:02d}"}[kind], \
        sdtune_name


def weigh(file, blocks: BlockWeights, components: Mapping[str, nn.Module]):
    """A copy of a loaded file (``sdtune.apply.LoadedFile``, loaded against ``components``) with each layer's ΔW
    scaled by its block's strength; layers at strength 0 are left out."""
    from .apply import LayerDelta

    config = components["unet"].config
    layers = {}
    for name, layer in file.layers.items():
        if layer.component is None:
            raise ValueError(f"{file.path}: block weights need the file loaded against the base model")
        w = blocks.strength(*block_of(layer.component, layer.module_path, config)[:2], layer.component)
        if w == 1.0:
            layers[name] = layer
        elif w != 0.0:
            up, down = layer.factors
            layers[name] = LayerDelta((up * w, down), layer.shape, layer.error, component=layer.component,
                                      module_path=layer.module_path, name=name)
    return dataclasses.replace(file, layers=layers)


def touched(file, blocks: BlockWeights, components: Mapping[str, nn.Module]) -> dict[str, tuple[float, int]]:
    """{block: (strength, layers of the file in it)} for the blocks whose strength is not 1."""
    config = components["unet"].config
    out: dict[str, tuple[float, int]] = {}
    for layer in file.layers.values():
        block_id, sdtune_name = block_of(layer.component, layer.module_path, config)
        w = blocks.strength(block_id, sdtune_name, layer.component)
        if w != 1.0:
            label = block_id or sdtune_name
            out[label] = (w, out.get(label, (w, 0))[1] + 1)
    return dict(sorted(out.items()))


def load_weighted(path, components: Mapping[str, nn.Module], arch: str, spec: str | None):
    """``sdtune.apply.load`` of ``path`` against the model, weighted by ``spec`` when given."""
    from .apply import load

    file = load(path, components, arch)
    return weigh(file, parse(spec, arch), components) if spec else file


def apply_file(components: Mapping[str, nn.Module], arch: str, path, weight: float = 1.0, spec: str | None = None):
    """``sdtune.apply.apply_file`` with block weights: the applied handle (remove it, or use it as a context)."""
    from .apply import AppliedFile

    return AppliedFile(components, load_weighted(path, components, arch, spec), weight).apply()
