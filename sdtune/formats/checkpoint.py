"""Merged single-file checkpoints in the original (LDM/SGM) key layout that A1111, ComfyUI and Forge load.

``to_ldm_state_dict(model)`` converts the pipeline's U-Net, VAE and text encoder(s) to the original names:

  U-Net   ``model.diffusion_model.`` + ``sdtune.names.ldm_unet_path`` of the module (the live config's blocks)
  VAE     ``first_stage_model.``: down_blocks.i.resnets.j -> down.i.block.j, up_blocks.i -> up.(n-1-i) (LDM counts
          decoder blocks from the bottom), mid_block.resnets.j -> mid.block_(j+1), conv_shortcut -> nin_shortcut,
          conv_norm_out -> norm_out; the mid-block attention group_norm/to_q/to_k/to_v/to_out.0 ->
          mid.attn_1.norm/q/k/v/proj_out, whose Linear weights (C, C) become 1×1 conv weights (C, C, 1, 1)
  CLIP    (SD1, SDXL's first encoder) ``cond_stage_model.transformer.text_model.`` /
          ``conditioner.embedders.0.transformer.text_model.`` + the transformers key (without ``text_model.``)
  OpenCLIP (SD2, SDXL's second encoder) ``cond_stage_model.model.`` / ``conditioner.embedders.1.model.``:
          layers.N -> transformer.resblocks.N, layer_norm1/2 -> ln_1/2, mlp.fc1/fc2 -> mlp.c_fc/c_proj,
          q/k/v_proj fused into attn.in_proj_weight/bias (rows q, k, v), token/position embeddings ->
          token_embedding.weight / positional_embedding, final_layer_norm -> ln_final, text_projection
          transposed (OpenCLIP multiplies x @ P)

The layouts are the inverse of diffusers' single-file loader (``diffusers.loaders.single_file_utils``), which the
tests use as the oracle. Every source tensor is consumed exactly once and no target name repeats; anything else is
an error, never a silently dropped tensor. Attached sdtune adapters are looked through: the exported weights are
the base weights (pass adapters to ``save_merged_checkpoint`` to bake them in).

``save_merged_checkpoint`` bakes adapter files / Injections at given strengths into a copy of those weights,
W' = W + Σ wᵢ·ΔWᵢ(W) with every ΔWᵢ taken against the base W (A1111's rule for several networks; DoRA included),
and writes the single file atomically (and, optionally, a diffusers folder).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..adapters.functional import merged_weight
from ..atomic import atomic_dir, atomic_path
from .kohya import DTYPES

if TYPE_CHECKING:
    from ..apply import LayerDelta

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# component -> (text-encoder layout, prefix) per architecture
TEXT_LAYOUTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.text_model.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {"text_encoder": ("clip", "conditioner.embedders.0.transformer.text_model."),
             "text_encoder_2": ("openclip", "conditioner.embedders.1.model.")},
}

# A plan maps each target name to (source keys, op); ops: "copy", "conv1x1" (C,C)->(C,C,1,1), "T", "cat".
Plan = dict[str, tuple[tuple[str, ...], str]]


# ------------------------------------------------------------------------------------------ key layouts

def _unet_plan(keys: Sequence[str], config: Mapping) -> Plan:
    from ..names import ldm_unet_path

    plan: Plan = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        plan[UNET_PREFIX + ldm_unet_path(module, config=config) + "." + param] = ((key,), "copy")
    return plan


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_SAME = re.compile(r"^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)$")
_VAE_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?"
                        r"(resnets|downsamplers|upsamplers|attentions)\.(\d+)\.(.+)\.(weight|bias)$")


def _vae_name(key: str, n_up: int) -> tuple[str, str]:
    if _VAE_SAME.match(key):
        return key, "copy"
    m = re.match(r"^(encoder|decoder)\.conv_norm_out\.(weight|bias)$", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}", "copy"
    m = _VAE_BLOCK.match(key)
    if not m:
        raise ValueError(f"no LDM name for VAE key {key!r}")
    side, block, i, kind, j, part, param = m.groups()
    if kind == "resnets":
        part = _VAE_RESNET.get(part, part)
        if block == "mid_block":
            return f"{side}.mid.block_{int(j) + 1}.{part}.{param}", "copy"
        level = ("down", int(i)) if block == "down_blocks" else ("up", n_up - 1 - int(i))
        return f"{side}.{level[0]}.{level[1]}.block.{j}.{part}.{param}", "copy"
    if kind in ("downsamplers", "upsamplers") and j == "0" and part == "conv":
        level = f"down.{i}.downsample" if kind == "downsamplers" else f"up.{n_up - 1 - int(i)}.upsample"
        return f"{side}.{level}.conv.{param}", "copy"
    if kind == "attentions" and block == "mid_block" and j == "0" and part in _VAE_ATTN:
        op = "conv1x1" if param == "weight" and part != "group_norm" else "copy"
        return f"{side}.mid.attn_1.{_VAE_ATTN[part]}.{param}", op
    raise ValueError(f"no LDM name for VAE key {key!r}")


def _vae_plan(keys: Sequence[str], config: Mapping) -> Plan:
    n_up = len(config["up_block_types"])
    plan: Plan = {}
    for key in keys:
        name, op = _vae_name(key, n_up)
        plan[VAE_PREFIX + name] = ((key,), op)
    return plan


_CLIP_KEY = re.compile(r"^(embeddings\.(token|position)_embedding\.weight|encoder\.layers\.\d+\..+|"
                       r"final_layer_norm\.(weight|bias))$")


def _clip_plan(keys: Sequence[str], prefix: str) -> Plan:
    plan: Plan = {}
    for key in keys:
        short = key.removeprefix("text_model.")       # transformers 5's CLIPTextModel has no text_model level
        if not _CLIP_KEY.match(short):
            raise ValueError(f"no LDM name for CLIP text-encoder key {key!r}")
        plan[prefix + short] = ((key,), "copy")
    return plan


_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": ("token_embedding.weight", "copy"),
                   "embeddings.position_embedding.weight": ("positional_embedding", "copy"),
                   "final_layer_norm.weight": ("ln_final.weight", "copy"),
                   "final_layer_norm.bias": ("ln_final.bias", "copy"),
                   "text_projection.weight": ("text_projection", "T")}
_OPENCLIP_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _openclip_plan(keys: Sequence[str], prefix: str) -> Plan:
    plan: Plan = {}
    fused: dict[str, dict[str, str]] = {}
    for key in keys:
        short = key.removeprefix("text_model.")
        if short in _OPENCLIP_FIXED:
            name, op = _OPENCLIP_FIXED[short]
            plan[prefix + name] = ((key,), op)
            continue
        m = _OPENCLIP_LAYER.match(short)
        if m and m[2] in _OPENCLIP_PARTS:
            plan[f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_PARTS[m[2]]}.{m[3]}"] = ((key,), "copy")
        elif m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            target = f"{prefix}transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"
            fused.setdefault(target, {})[m[2][-6]] = key           # "q" / "k" / "v"
        else:
            raise ValueError(f"no LDM name for OpenCLIP text-encoder key {key!r}")
    for target, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{target}: fusing q/k/v needs all three, found {sorted(parts)}")
        plan[target] = ((parts["q"], parts["k"], parts["v"]), "cat")
    return plan


def component_plan(component: str, keys: Sequence[str], arch: str, config: Mapping | None = None) -> Plan:
    """LDM name -> (diffusers keys, op) for one component's state-dict keys (``config``: the U-Net's or
    VAE's config, needed for those two)."""
    if component == "unet":
        return _unet_plan(keys, config)
    if component == "vae":
        return _vae_plan(keys, config)
    layout = TEXT_LAYOUTS[arch].get(component)
    if layout is None:
        raise ValueError(f"{arch} has no component {component!r}")
    kind, prefix = layout
    return _clip_plan(keys, prefix) if kind == "clip" else _openclip_plan(keys, prefix)


_OPS: dict[str, Callable[..., Tensor]] = {
    "copy": lambda t: t,
    "conv1x1": lambda t: t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t,
    "T": lambda t: t.T.contiguous(),
    "cat": lambda *ts: torch.cat(ts, dim=0),
}


def convert(state_dicts: Mapping[str, Mapping[str, Tensor]], arch: str,
            configs: Mapping[str, Mapping] | None = None) -> dict[str, Tensor]:
    """Convert per-component diffusers state dicts ({"unet": …, "vae": …, "text_encoder": …}) to one LDM dict.

    Raises ValueError if a tensor has no LDM name, is used twice, or two tensors would share a name.
    """
    configs = configs or {}
    out: dict[str, Tensor] = {}
    for component, sd in state_dicts.items():
        plan = component_plan(component, list(sd), arch, configs.get(component))
        used = [k for sources, _ in plan.values() for k in sources]
        if len(used) != len(set(used)) or set(used) != set(sd):
            raise ValueError(f"{component}: {len(sd)} tensors, {len(set(used))} converted "
                             f"(unused: {sorted(set(sd) - set(used))[:5]})")
        clash = set(plan) & set(out)
        if clash:
            raise ValueError(f"{component}: LDM names already taken: {sorted(clash)[:5]}")
        for name, (sources, op) in plan.items():
            out[name] = _OPS[op](*(sd[k] for k in sources))
    return out


# ------------------------------------------------------------------------------------------ live models

def _parts(model) -> dict[str, nn.Module]:
    return {"unet": model.pipeline.unet, "vae": model.pipeline.vae,
            **{k: v for k, v in model.components().items() if k != "unet"}}


def base_state_dicts(parts: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """Per-component diffusers state dicts (detached references, no copies) of the un-adapted weights."""
    from ..inject import plain_layers

    with plain_layers(parts) as adapters:
        sds = {name: dict(module.state_dict()) for name, module in parts.items()}
    for (component, path), adapter in adapters.items():
        sds[component][f"{path}.weight"] = adapter.original_weight().detach()
    return sds


def components_to_ldm(parts: Mapping[str, nn.Module], arch: str) -> dict[str, Tensor]:
    """LDM state dict of live modules ({"unet", "vae", "text_encoder"[, "text_encoder_2"]}; works on meta)."""
    configs = {k: m.config for k, m in parts.items() if k in ("unet", "vae")}
    return convert(base_state_dicts(parts), arch, configs)


def to_ldm_state_dict(model) -> dict[str, Tensor]:
    """The pipeline's U-Net, VAE and text encoder(s) under the original single-file names (tensors are views of
    the live weights: clone before changing them)."""
    return components_to_ldm(_parts(model), model.arch)


# ------------------------------------------------------------------------------------------ merging

def _layers(source, model) -> list[LayerDelta]:
    """The layer updates of one adapter source: a kohya/LyCORIS or native sdtune file (``apply.load``), or an
    Injection attached to this model or to a twin."""
    from ..apply import LoadedFile, injection_layers, load
    from ..inject import Injection

    if isinstance(source, Injection):
        if source.arch != model.arch:
            raise ValueError(f"the injection is for {source.arch}, the model is {model.arch}")
        return list(injection_layers(source).values())
    if isinstance(source, LoadedFile):  # already loaded (e.g. block-weighted, ``blocks.weigh``)
        return list(source.layers.values())
    return list(load(source, model.components(), model.arch).layers.values())


def _entries(adapters: Sequence) -> list[tuple[object, float]]:
    return [(e[0], float(e[1])) if isinstance(e, tuple) else (e, 1.0) for e in adapters]


def merged_state_dicts(model, adapters: Sequence) -> tuple[dict[str, dict[str, Tensor]], int]:
    """(base state dicts with every adapter baked in at its weight, number of changed weights). Changed tensors
    are new float32 (float64 for a float64 model) tensors; the live model is never modified."""
    sds = base_state_dicts(_parts(model))
    sums: dict[tuple[str, str], Tensor] = {}
    for source, weight in _entries(adapters):
        for layer in _layers(source, model):
            key = f"{layer.module_path}.weight"
            w = sds[layer.component].get(key)
            dtype = torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32
            delta = layer.delta(dtype) * weight
            if w is None or tuple(w.shape) != tuple(delta.shape):
                raise ValueError(f"{_label(source)}: {layer.component}.{key} does not fit the model "
                                 f"({None if w is None else tuple(w.shape)} vs ΔW {tuple(delta.shape)})")
            acc = sums.get((layer.component, key))
            sums[(layer.component, key)] = delta.to(w.device) if acc is None else acc + delta.to(acc.device)
    for (component, key), delta in sums.items():
        w = sds[component][key]
        sds[component][key] = merged_weight(w.to(delta.dtype), delta, f"{component}.{key}")
    return sds, len(sums)


def _label(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return str(source.path) if hasattr(source, "layers") and hasattr(source, "path") else type(source).__name__


def save_merged_checkpoint(model, adapters: Sequence = (), out: str | Path = "model.safetensors", *,
                           dtype: torch.dtype | str = torch.float16, diffusers_dir: str | Path | None = None,
                           metadata: Mapping[str, str] | None = None) -> dict:
    """Bake ``adapters`` ([(file path, loaded file or Injection, weight), …]) into a copy of ``model``'s weights and
    write the A1111-layout single file ``out`` (temp file + os.replace) in ``dtype`` ("fp16" | "bf16" | "fp32" or a
    torch dtype); with ``diffusers_dir`` also a diffusers folder (``save_pretrained``, in the model's own dtype).
    Returns a summary: path, tensor count, merged layer count, diffusers folder."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    parts = _parts(model)
    sds, merged = merged_state_dicts(model, adapters)
    ldm = convert(sds, model.arch, {k: parts[k].config for k in ("unet", "vae")})
    expected = sum(len(sd) for sd in sds.values()) - _fused_count(sds, model.arch)
    if len(ldm) != expected:  # convert() already checks each tensor; this guards the count as a whole
        raise AssertionError(f"{len(ldm)} LDM tensors from {expected} expected: a tensor was dropped")
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
               for k, v in ldm.items()}
    meta = {"format": "pt", "sdtune_arch": model.arch, "sdtune_base": str(model.source),
            "sdtune_merged": json.dumps([[_label(src), w] for src, w in _entries(adapters)])}
    meta.update(metadata or {})
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    if diffusers_dir is not None:
        _save_diffusers(model, parts, sds, Path(diffusers_dir))
    return {"path": str(out), "tensors": len(tensors), "merged_layers": merged,
            "diffusers_dir": str(diffusers_dir) if diffusers_dir is not None else None}


def _fused_count(sds: Mapping[str, Mapping[str, Tensor]], arch: str) -> int:
    """Tensors that disappear by fusing OpenCLIP q/k/v (three in, one out)."""
    return sum(2 for c, sd in sds.items() if TEXT_LAYOUTS[arch].get(c, ("",))[0] == "openclip"
               for k in sd if re.search(r"self_attn\.q_proj\.(weight|bias)$", k))


@torch.no_grad()
def _save_diffusers(model, parts: Mapping[str, nn.Module], sds: Mapping[str, Mapping[str, Tensor]], folder: Path):
    """save_pretrained with the merged tensors swapped into the live parameters for the duration (restored after),
    attached adapters unwrapped; written to a temp sibling folder, then moved into place."""
    from ..inject import plain_layers

    swapped = []
    with atomic_dir(folder) as tmp, plain_layers(parts):
        for component, sd in sds.items():
            for key, param in parts[component].named_parameters():
                value = sd[key]
                if value.data_ptr() != param.data_ptr():
                    swapped.append((param, param.data))
                    param.data = value.to(param.dtype)
        try:
            model.pipeline.save_pretrained(str(tmp), safe_serialization=True)
        finally:
            for param, original in swapped:
                param.data = original
