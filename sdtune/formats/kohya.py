"""AUTOMATIC1111 / kohya / LyCORIS adapter files: the writing side (``save_kohya``) and sdtune's native reload
(``load_native``). Reading any file is ``reader.py``; applying it to live weights is ``sdtune.apply``.

A file is a flat safetensors dict ``<kohya_name>.<tensor>`` (names and tensors: ``../shared/LOADER-FACTS.md``)
plus string metadata. Reading never unpickles: only safetensors is accepted, and its header is checked
against the file size before any tensor is read. Every key is consumed or reported; every shape is checked
against the live model before anything is applied.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from .. import atomic
from . import metadata as md_
from . import rebuild
from .reader import FormatError, read_kohya

# The dtypes files are written in (``--dtype`` / ``export_dtype``).
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# ----------------------------------------------------------------------------------------------- writing

def _source_items(source) -> tuple[list[tuple[str, dict[str, Tensor], object | None]], str | None]:
    """(name, group, adapter-or-None) from an Injection, a dict of Adapters / tensor groups, or Adapters."""
    arch = getattr(source, "arch", None)
    if hasattr(source, "adapters"):
        source = source.adapters
    items = source.items() if isinstance(source, Mapping) else ((None, a) for a in source)
    out = []
    for key, value in items:
        if hasattr(value, "kohya_tensors"):
            name = value.kohya_name
            if key is not None and key != name:
                raise ValueError(f"adapter registered as {key!r} has kohya_name {name!r}")
            with torch.no_grad():
                group = {k: v.detach() for k, v in value.kohya_tensors().items()}
            out.append((name, group, value))
        elif isinstance(value, Mapping) and key is not None:
            out.append((key, {k: v.detach() for k, v in value.items()}, None))
        else:
            raise TypeError(f"cannot export {type(value).__name__}: expected an Adapter or a dict of tensors")
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError("two adapters share a kohya name")
    if not out:
        raise ValueError("nothing to export: no adapters")
    return out, arch


def _normalise(name: str, group: dict[str, Tensor], plain_locon: bool) -> dict[str, Tensor]:
    """The portable form of one group: square Tucker core (or folded into down), an explicit 0-dim α,
    and a DoRA magnitude only on the input axis (the one A1111 and ComfyUI both rebuild exactly)."""
    unknown = set(group) - rebuild.KNOWN_KEYS
    if unknown:
        raise ValueError(f"{name}: unknown tensor keys {sorted(unknown)}")
    kind = rebuild.detect_kind(group)
    group = dict(group)
    if kind == "lora":
        group = rebuild.fold_tucker(group) if plain_locon else rebuild.square_tucker(group)
        if "scale" in group:  # express the scale through α, the only thing every loader reads
            group["alpha"] = torch.tensor(rebuild.scale(group) * rebuild.rank(group))
            del group["scale"]
        if "alpha" not in group:
            group["alpha"] = torch.tensor(float(rebuild.rank(group)))
    if "alpha" in group:
        group["alpha"] = group["alpha"].reshape(()).to(torch.float32)
    if "dora_scale" in group:
        shape = rebuild.delta_shape(group)
        if rebuild.dora_axis(group["dora_scale"], shape) != "in" or group["dora_scale"].dim() != len(shape):
            raise ValueError(f"{name}: dora_scale of shape {tuple(group['dora_scale'].shape)} is not input-axis "
                             f"(1, in, 1…); A1111 would load it into wrong weights. Export output-axis DoRA as "
                             f"a full 'diff'.")
    return group


def _verify(name: str, group: dict[str, Tensor], adapter, tol: float = 1e-4) -> None:
    """Rebuild the group the way a loader does and compare with the adapter's own ΔW (float64)."""
    base = adapter.base.weight.detach().double()
    with torch.no_grad():
        ref = adapter.delta_weight().detach().double()
    if getattr(adapter, "merged", False):
        base = base - ref
    got = rebuild.effective_delta(group, base, dtype=torch.float64)
    err = (got - ref).norm().item()
    if err > tol * ref.norm().item() + 1e-12 * base.norm().item():
        raise ValueError(f"{name}: exported tensors rebuild a ΔW with relative error "
                         f"{rebuild.rel_error(got, ref):.3g} against the adapter's (tolerance {tol})")


def _spec_dict(spec) -> dict:
    if dataclasses.is_dataclass(spec):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}
    return dict(spec)


def export_tensors(source, *, dtype: torch.dtype = torch.float16, plain_locon: bool = False,
                   verify: bool = True) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """The flat ``<kohya_name>.<key>`` tensors of an export (α float32, the rest in ``dtype``), plus per module
    its algorithm, rank, α and sdtune spec. Works on meta-device adapters with ``verify=False`` (key sets)."""
    items, _ = _source_items(source)
    tensors: dict[str, Tensor] = {}
    per_module: dict[str, dict] = {}
    for name, group, adapter in items:
        group = _normalise(name, group, plain_locon)
        if verify and adapter is not None:
            _verify(name, group, adapter)
        spec = getattr(adapter, "spec", None)
        per_module[name] = {"algorithm": rebuild.algorithm_name(group), "rank": rebuild.rank(group),
                            "alpha": float(group["alpha"]) if "alpha" in group and group["alpha"].device.type
                            != "meta" else None, "spec": _spec_dict(spec) if spec is not None else None}
        for key, value in group.items():
            value = value if value.device.type == "meta" else value.to("cpu")
            tensors[f"{name}.{key}"] = (value if key == "alpha" else value.to(dtype)).contiguous()
    seen: set[int] = set()
    for key, value in tensors.items():  # safetensors refuses tensors that share memory
        if value.device.type != "meta":
            if value.untyped_storage().data_ptr() in seen:
                tensors[key] = value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
    return tensors, per_module


def save_kohya(source, path, *, arch: str | None = None, dtype: torch.dtype = torch.float16,
               metadata: dict[str, str] | None = None, output_name: str | None = None, resolution=None,
               comment: str | None = None, base_model_name: str | None = None, plain_locon: bool = False,
               verify: bool = True, native_sidecar: bool = False) -> dict[str, str]:
    """Write adapters as an A1111/ComfyUI-loadable ``.safetensors``; returns the metadata written.

    ``source``: an ``Injection``, a dict ``{kohya_name: Adapter}``, an iterable of Adapters, or raw tensor
    groups ``{kohya_name: {"lora_down.weight": …, …}}`` (fusion output). ``plain_locon`` folds Tucker cores
    into ``lora_down`` (diffusers rejects ``lora_mid``). α is stored as float32 whatever ``dtype`` is, so that
    α/``lora_down.shape[0]`` is the exact scale. With ``verify``, each group is rebuilt with the loaders'
    formula and compared with the adapter's ``delta_weight()`` before anything is written.
    With ``native_sidecar`` (an Injection source), the native state is also written next to the file as
    ``<stem>.sdtune`` (``Injection.save``; not ``.safetensors``, so UIs do not list it) for algorithms whose A1111 form is folded (FLoRA,
    Spectral, output-axis DoRA); ``load_native`` uses it.
    The file is written to a temp file in the same directory and moved into place: never half-written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files are written as .safetensors")
    arch = arch or getattr(source, "arch", None)
    if arch is None:
        raise ValueError("arch is required (sd1, sd2 or sdxl) when the source does not carry it")
    tensors, per_module = export_tensors(source, dtype=dtype, plain_locon=plain_locon, verify=verify)
    algos = [m["algorithm"] for m in per_module.values()]
    ranks = [m["rank"] for m in per_module.values()]
    alphas = [m["alpha"] for m in per_module.values()]
    specs: list[dict] = []
    modules: dict[str, list] = {}
    for name, m in per_module.items():
        if m["spec"] is not None:
            if m["spec"] not in specs:
                specs.append(m["spec"])
            modules[name] = [specs.index(m["spec"]), m["algorithm"]]
    md = md_.build(arch=arch, algorithms=algos, ranks=ranks, alphas=alphas,
                   output_name=output_name or path.stem, resolution=resolution, comment=comment,
                   base_model_name=base_model_name, sdtune_modules=modules or None,
                   sdtune_specs=specs or None, export_options={"dtype": str(dtype).removeprefix("torch."),
                                                               "plain_locon": plain_locon},
                   extra=metadata)
    rules = getattr(source, "rules", None)
    if rules:
        md["sdtune_rules"] = json.dumps([[preset, _spec_dict(spec)] for preset, spec in rules], sort_keys=True)
    if native_sidecar:
        if not hasattr(source, "save"):
            raise ValueError("native_sidecar needs an Injection as the source")
        sidecar = path.with_suffix(".sdtune")  # not .safetensors: UIs must not list it as a LoRA
        source.save(sidecar)
        md["sdtune_native_file"] = sidecar.name
        md["sdtune_native_sha256"] = hashlib.sha256(sidecar.read_bytes()).hexdigest()
    data = safetensors.torch.save(tensors, md)  # placeholder hashes of the final length
    md.update(md_.hashes_of(data))
    final = safetensors.torch.save(tensors, md)
    if len(final) != len(data) or md_.hashes_of(final)["sshs_model_hash"] != md["sshs_model_hash"]:
        raise RuntimeError("safetensors serialisation changed the data layout between two identical saves")
    atomic.write_bytes(path, final)
    return md


# ------------------------------------------------------------------------------------------ native reload

def load_native(path, components: Mapping[str, nn.Module], arch: str | None = None, *, svd_cache_dir=None):
    """Re-attach the sdtune adapters a file was exported from (rules in ``sdtune_rules``) and load their state.

    LoCon (plain, Tucker, rsLoRA) and input-axis DoRA over LoCon are loaded exactly from the A1111 tensors.
    Folded forms (FLoRA, Spectral, output-axis DoRA) need the native sidecar written with ``native_sidecar``.
    Either way every adapter's ΔW is checked against the file's (tolerance by the file's dtype).
    Returns the ``Injection``.
    """
    from sdtune.adapters import AdapterSpec
    from sdtune.inject import Injection, attach

    file = read_kohya(path)
    md = file.metadata
    if "sdtune_rules" not in md:
        raise FormatError(f"{path}: not exported by sdtune from an Injection (no sdtune_rules metadata); "
                          f"use read_kohya/apply_file for foreign files")
    file_arch = md.get("sdtune_arch")
    arch = arch or file_arch
    if file_arch and arch != file_arch:
        raise FormatError(f"{path}: adapters were trained for {file_arch}, not {arch}")
    sidecar = md.get("sdtune_native_file")
    if sidecar:
        side = Path(path).with_name(sidecar)
        if not side.exists():
            raise FormatError(f"{path}: native state {side} is missing")
        if hashlib.sha256(side.read_bytes()).hexdigest() != md.get("sdtune_native_sha256"):
            raise FormatError(f"{side} does not belong to {path} (sha256 differs from the recorded one)")
        inj = Injection.load(side, dict(components), arch, svd_cache_dir=svd_cache_dir)
    else:
        rules = [(preset, AdapterSpec.from_dict(spec)) for preset, spec in json.loads(md["sdtune_rules"])]
        inj = attach(dict(components), rules, arch, svd_cache_dir=svd_cache_dir)
        try:
            if set(inj.adapters) != set(file.modules):
                raise FormatError(f"{path}: the rules attach {len(inj.adapters)} adapters, the file has "
                                  f"{len(file.modules)} modules")
            for name, adapter in inj.adapters.items():
                _load_lora_form(adapter, file.modules[name].tensors)
        except BaseException:
            inj.detach()
            raise
    _check_reload(inj, file)
    return inj


@torch.no_grad()
def _load_lora_form(adapter, group: dict[str, Tensor]) -> None:
    """LoCon factors (and the DoRA input-axis magnitude) from A1111 tensors, the scale kept exactly."""
    spec = adapter.spec
    low_rank = spec.dora_base if spec.algorithm == "dora" else spec.algorithm
    if low_rank != "locon" or (spec.algorithm == "dora" and spec.dora_axis != "in"):
        raise FormatError(f"{adapter.kohya_name}: {spec.algorithm} is stored folded in the A1111 form; reloading "
                          f"it natively needs the sidecar (save_kohya(..., native_sidecar=True))")
    lora = adapter.lora
    ratio = rebuild.scale(group) / lora.scale
    up = group["lora_up.weight"].to(lora.up.dtype) * ratio
    for param, value in ((lora.up, up), (lora.down, group["lora_down.weight"]),
                         (lora.mid, group.get("lora_mid.weight"))):
        if (param is None) != (value is None) or param is not None and param.numel() != value.numel():
            raise FormatError(f"{adapter.kohya_name}: file tensors do not fit the {spec} adapter")
        if param is not None:
            param.copy_(value.reshape(param.shape))
    if spec.algorithm == "dora":
        adapter.magnitude.copy_(group["dora_scale"].flatten())


def _check_reload(inj, file) -> None:
    dtypes = {t.dtype for m in file.modules.values() for k, t in m.tensors.items() if k != "alpha"}
    tol = 1e-5 if dtypes <= {torch.float32, torch.float64} else 2e-2
    for name, adapter in inj.adapters.items():
        base = adapter.original_weight().detach()
        with torch.no_grad():
            got = adapter.delta_weight().detach()
        want = file.modules[name].effective_delta(base.float())
        if rebuild.rel_error(got, want) > tol:
            raise FormatError(f"{name}: reloaded adapter's ΔW differs from the file's (relative error "
                              f"{rebuild.rel_error(got, want):.3g})")
