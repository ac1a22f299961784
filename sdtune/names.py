"""kohya / A1111 module names ("lora_unet_…", "lora_te…") for sdtune's architectures, and the reverse map.

Rules (../shared/LOADER-FACTS.md):
- SD1.x / SD2.x U-Net: ``lora_unet_`` + the diffusers module path with "." -> "_" (equal to kohya's names).
- SDXL U-Net: kohya's LDM/SGM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), which every
  UI maps. The diffusers -> LDM layout is derived from the block structure in ``sdtune.archs.UNET_CONFIGS``:
  conv_in is input_blocks.0.0; down block i, layer j is input_blocks.(1 + i·(L+1) + j) with the resnet at .0 and
  the transformer at .1, its downsampler input_blocks.((i+1)·(L+1)).0.op; the mid block is middle_block.0/1/2
  (resnet, transformer, resnet); up block i, layer j is output_blocks.(i·(L+1) + j) (.0 resnet, .1 transformer)
  and its upsampler output_blocks.(i·(L+1) + L).(2 if the block has transformers else 1).conv; resnet parts
  conv1 -> in_layers.2, conv2 -> out_layers.3, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection;
  time_embedding.linear_1/2 -> time_embed.0/2, add_embedding.linear_1/2 -> label_emb.0.0/0.2, conv_out -> out.2.
- Text encoders: the fixed template ``<prefix>_text_model_encoder_layers_<i>_<part>`` built from the layer index and
  the sub-module (prefix lora_te for SD1/SD2, lora_te1 / lora_te2 for SDXL's text_encoder / text_encoder_2), never
  from the module path (transformers 5's CLIPTextModel has no ``text_model`` level).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from .archs import ARCHS, UNET_CONFIGS

TE_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": "lora_te"},
    "sd2": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
TE_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_TE_RE = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(" + "|".join(re.escape(p) for p in TE_PARTS) + r")$")
_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?$")


def _resnet(prefix: str, rest: str | None, path: str) -> str:
    if rest is None:
        return prefix
    head, _, tail = rest.partition(".")
    if head not in _RESNET_PARTS:
        raise ValueError(f"no LDM name for resnet part {head!r} in {path!r}")
    return f"{prefix}.{_RESNET_PARTS[head]}" + (f".{tail}" if tail else "")


def ldm_unet_path(path: str, arch: str = "sdxl", config: Mapping | None = None) -> str:
    """The LDM/SGM module path of a diffusers U-Net module path (e.g. down_blocks.1.attentions.0.proj_in ->
    input_blocks.4.1.proj_in) for ``arch``'s published block structure, or for the block structure of
    ``config`` (a U-Net config with ``layers_per_block`` and ``up_block_types``, e.g. a live model's) when given."""
    cfg = UNET_CONFIGS[arch] if config is None else config
    if not isinstance(cfg["layers_per_block"], int):
        raise ValueError(f"no LDM layout for per-block layers_per_block {cfg['layers_per_block']!r}")
    per = cfg["layers_per_block"] + 1          # resnets per up block; input_blocks per down block
    if path in _FIXED:
        return _FIXED[path]
    m = _MID_RE.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return "middle_block.1" + (f".{rest}" if rest else "")
        return _resnet(f"middle_block.{2 * j}", rest, path)
    m = _BLOCK_RE.match(path)
    if not m:
        raise ValueError(f"no LDM name for U-Net module {path!r}")
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    sub = (f".{rest}" if rest else "")
    if side == "down_blocks":
        if kind == "downsamplers":
            if rest != "conv":
                raise ValueError(f"no LDM name for downsampler part {path!r}")
            return f"input_blocks.{(i + 1) * per}.0.op"
        index = 1 + i * per + j
        return _resnet(f"input_blocks.{index}.0", rest, path) if kind == "resnets" else f"input_blocks.{index}.1{sub}"
    if kind == "upsamplers":
        has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        return f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}{sub}"
    index = i * per + j
    return _resnet(f"output_blocks.{index}.0", rest, path) if kind == "resnets" else f"output_blocks.{index}.1{sub}"


def kohya_name(component: str, module_path: str, arch: str) -> str:
    """The A1111/kohya name of one module (without the tensor suffix)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    if component == "unet":
        path = ldm_unet_path(module_path, arch) if arch == "sdxl" else module_path
        return "lora_unet_" + path.replace(".", "_")
    prefix = TE_PREFIXES[arch].get(component)
    if prefix is None:
        raise ValueError(f"{arch} has no text-encoder component {component!r}; expected one of "
                         f"{sorted(TE_PREFIXES[arch])}")
    m = _TE_RE.search(module_path)
    if m is None:
        raise ValueError(f"{component}.{module_path}: not an adaptable text-encoder module (expected "
                         f"encoder.layers.<i>.<{'|'.join(TE_PARTS)}>)")
    return f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"


def adaptable_modules(root: nn.Module):
    """(path, module) for every nn.Linear / nn.Conv2d under ``root``, attached adapters reported as their layer.

    diffusers' Downsample2D registers its conv twice (``Conv2d_0`` and ``conv``); the ``conv`` path (the one its
    forward uses and kohya names) is reported.
    """
    from .adapters import Adapter

    entries = list(root.named_modules(remove_duplicate=False))
    wrapped = {id(mod.base) for _, mod in entries if isinstance(mod, Adapter)}
    seen: dict[int, str] = {}
    for path, mod in entries:
        if id(mod) in wrapped:                      # an adapter's own frozen layer (``<path>.base``)
            continue
        if not isinstance(mod, (Adapter, nn.Linear, nn.Conv2d)):
            continue
        if id(mod) in seen and not path.endswith(".conv"):
            continue
        seen[id(mod)] = path
    return [(path, _get(root, path)) for path in seen.values()]


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def name_map(components: dict[str, nn.Module], arch: str) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module path) for every nameable Linear/Conv2d of the live model (every U-Net
    Linear/Conv2d; the six template modules of each text-encoder layer). Raises if two modules share a name."""
    out: dict[str, tuple[str, str]] = {}
    for component, root in components.items():
        for path, _ in adaptable_modules(root):
            if component != "unet" and not _TE_RE.search(path):
                continue
            name = kohya_name(component, path, arch)
            if name in out:
                raise ValueError(f"kohya name {name} is shared by {out[name]} and {(component, path)}")
            out[name] = (component, path)
    return out
