"""``sdtune inspect FILE``: what an adapter file contains, as a JSON-able dict (``inspect_file``) and as text
(``format_inspection``)."""
from __future__ import annotations

import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

from .formats import metadata as md_
from .formats.reader import read_kohya

_BLOCK_RES = [
    (re.compile(r"^lora_unet_(down_blocks|up_blocks|input_blocks|output_blocks)_(\d+)_"), "unet.{0}.{1}"),
    (re.compile(r"^lora_unet_(mid_block|middle_block)_"), "unet.{0}"),
    (re.compile(r"^lora_(te\d?)_text_model_encoder_layers_(\d+)_"), "{0}.layers.{1}"),
    (re.compile(r"^lora_unet_(.+)$"), "unet.{0}"),
]


def block_of(name: str) -> str:
    """A coarse block label of a kohya module name (``unet.down_blocks.1``, ``te.layers.3``, …)."""
    for pattern, fmt in _BLOCK_RES:
        m = pattern.match(name)
        if m:
            return fmt.format(*m.groups())
    return name.split("_", 2)[0] if "_" in name else name


def inspect_file(path, model=None) -> dict:
    """Summary of an adapter file; with ``model`` (a dict of components or an object with ``components()``),
    names are mapped to its layers and unmapped modules are listed instead of raising. ``format`` names the
    format seen (``formats.convert.file_format``); a diffusers/PEFT file is described through its kohya
    conversion, with the keys that have none listed as unknown."""
    from .formats.convert import convert_file, file_format

    components = model.components() if hasattr(model, "components") else model
    fmt = file_format(path)
    if fmt in ("diffusers", "peft"):
        with tempfile.TemporaryDirectory() as tmp:
            kohya = Path(tmp) / "converted.safetensors"
            conv = convert_file(path, kohya, "kohya", components=components, partial=True)
            info = inspect_file(kohya, components)
        actual = md_.file_hashes(path)
        return info | {"path": str(Path(path)), "size_bytes": Path(path).stat().st_size, "format": fmt,
                       "arch_evidence": f"{info['arch_evidence']} (as converted to kohya names)",
                       "unknown_keys": sorted(conv.unmappable),
                       "hashes": {"stored": dict.fromkeys(md_.HASH_KEYS), "actual": actual, "ok": True}}
    with warnings.catch_warnings():  # unmapped modules and unknown keys are part of the report
        warnings.simplefilter("ignore")
        f = read_kohya(path, components, strict=False)
    md = f.metadata
    algorithms = Counter(m.algorithm for m in f.modules.values())
    ranks = Counter(m.rank for m in f.modules.values() if m.rank is not None)
    scales = Counter(round(m.scale, 6) for m in f.modules.values())
    alphas = Counter(m.alpha for m in f.modules.values() if m.alpha is not None)
    blocks = Counter(block_of(n) for n in f.modules)
    block_ranks: dict[str, Counter] = {}
    for n, m in f.modules.items():
        block_ranks.setdefault(block_of(n), Counter())[m.rank] += 1
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for m in f.modules.values() for k, t in m.tensors.items()
                     if k != "alpha")
    stored = {k: md.get(k) for k in md_.HASH_KEYS}
    actual = md_.file_hashes(path)
    info = {
        "path": str(Path(path)),
        "size_bytes": Path(path).stat().st_size,
        "format": fmt,
        "arch": f.arch,
        "arch_evidence": f.arch_evidence,
        "base_model_version": md.get("ss_base_model_version"),
        "network_module": md.get("ss_network_module"),
        "modules": len(f.modules),
        "algorithms": dict(algorithms),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in sorted(alphas.items())},
        "scales": {str(k): v for k, v in sorted(scales.items())},
        "blocks": dict(sorted(blocks.items())),
        "block_ranks": {b: {str(r): c[r] for r in sorted(c, key=lambda r: (r is None, r))}
                        for b, c in sorted(block_ranks.items())},
        "dtypes": dict(dtypes),
        "num_params": f.num_params(),
        "unmapped": list(f.unmapped),
        "unknown_keys": list(f.unknown_keys),
        "hashes": {"stored": stored, "actual": actual,
                   "ok": all(stored[k] in (None, actual[k]) for k in md_.HASH_KEYS)},
        "sdtune": f.sdtune,
        "metadata": {k: v for k, v in md.items() if k.startswith("ss_") and len(v) < 200},
    }
    return info


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items()) or "—"


def format_inspection(info: dict) -> str:
    """Human-readable text of ``inspect_file``'s dict."""
    lines = [
        f"{info['path']}  ({info['size_bytes'] / 1e6:.2f} MB)",
        f"  format          {info['format']}",
        f"  architecture    {info['arch'] or 'unknown'}  ({info['arch_evidence']})",
        f"  base model      {info['base_model_version'] or '—'}   network module {info['network_module'] or '—'}",
        f"  modules         {info['modules']}   parameters {info['num_params']:,}   dtypes {_counts(info['dtypes'])}",
        f"  algorithms      {_counts(info['algorithms'])}",
        f"  ranks           {_counts(info['ranks'])}",
        f"  alpha           {_counts(info['alphas'])}",
        f"  scale (α/r)     {_counts(info['scales'])}",
        "  blocks          " + _counts(info["blocks"]),
        "  ranks by block  " + "; ".join(f"{b} " + ", ".join(f"r{r} ×{n}" for r, n in c.items())
                                         for b, c in info["block_ranks"].items()),
    ]
    hashes = info["hashes"]
    lines.append(f"  sshs_model_hash {hashes['actual']['sshs_model_hash'][:16]}…  "
                 + ("(matches metadata)" if hashes["ok"] else "(MISMATCH with the stored value)"))
    if info["sdtune"]:
        lines.append(f"  written by      sdtune {info['sdtune'].get('version')} (format "
                     f"{info['sdtune'].get('format_version')})")
    for label, items in (("unmapped", info["unmapped"]), ("unknown keys", info["unknown_keys"])):
        if items:
            shown = ", ".join(items[:10]) + (f", … ({len(items)} in all)" if len(items) > 10 else "")
            lines.append(f"  {label:<15} {shown}")
    return "\n".join(lines)
