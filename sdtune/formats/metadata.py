"""Metadata of A1111 adapter files: the ``ss_*`` keys kohya tools and UIs read, the "addnet" hashes, and the
``sdtune_*`` keys that let sdtune reattach its own adapters.

Hashes (as kohya sd-scripts ``train_util`` and A1111 compute them):
* ``sshs_model_hash``: sha256 of every byte after the safetensors header (8-byte length + JSON).
* ``sshs_legacy_hash``: first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB of the whole file.
Both are computed on the file exactly as written: the header carries hash strings of fixed length, so the
header length, and therefore every data byte and its offset, is known before the hashes are filled in.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from typing import BinaryIO

FORMAT_VERSION = "1"

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}

HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}

_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000


def header_length(f: BinaryIO) -> int:
    """Bytes taken by the safetensors header (the 8-byte length plus the JSON)."""
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file shorter than a safetensors header")
    return 8 + int.from_bytes(raw, "little")


def model_hash(f: BinaryIO) -> str:
    """sha256 of the bytes after the safetensors header (``sshs_model_hash``, the "addnet" hash)."""
    h = hashlib.sha256()
    f.seek(header_length(f))
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def legacy_hash(f: BinaryIO) -> str:
    """First 8 hex digits of sha256 over 64 KiB at offset 1 MiB (``sshs_legacy_hash``)."""
    f.seek(_LEGACY_OFFSET)
    return hashlib.sha256(f.read(_LEGACY_SIZE)).hexdigest()[:8]


def hashes_of(data: bytes) -> dict[str, str]:
    f = io.BytesIO(data)
    return {"sshs_model_hash": model_hash(f), "sshs_legacy_hash": legacy_hash(f)}


def file_hashes(path) -> dict[str, str]:
    with open(path, "rb") as f:
        return {"sshs_model_hash": model_hash(f), "sshs_legacy_hash": legacy_hash(f)}


def _most_common(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "1"
    value = Counter(values).most_common(1)[0][0]
    return str(value)


def _format_alpha(alpha: float) -> str:
    return str(int(alpha)) if float(alpha).is_integer() else repr(float(alpha))


def _resolution(resolution) -> str | None:
    if resolution is None:
        return None
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    return f"({int(resolution[0])}, {int(resolution[1])})"


def build(*, arch: str, algorithms: list[str], ranks: list[int | None], alphas: list[float | None],
          output_name: str, resolution=None, comment: str | None = None, base_model_name: str | None = None,
          sdtune_modules: dict[str, list] | None = None, sdtune_specs: list[dict] | None = None,
          export_options: dict | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata dict (all values str) of an export, with placeholder hashes.

    ``algorithms``/``ranks``/``alphas`` are per module (see ``rebuild.algorithm_name``); ``extra`` adds or
    overrides ``ss_*`` keys (e.g. ``ss_clip_skip``, ``ss_tag_frequency``) but never the hashes or ``sdtune_*``.
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {tuple(BASE_MODEL_VERSION)}")
    plain = all(a in ("lora", "locon") for a in algorithms)
    md: dict[str, str] = {
        "ss_network_module": "networks.lora" if plain else "lycoris.kohya",
        "ss_network_dim": _most_common(ranks),
        "ss_network_alpha": _format_alpha(float(_most_common([a for a in alphas if a is not None] or [1.0]))),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "ss_output_name": output_name,
    }
    if not plain:
        algos = sorted({a.replace("+dora", "") for a in algorithms})
        args = {"algo": algos[0] if len(algos) == 1 else ",".join(algos)}
        if any(a.endswith("+dora") for a in algorithms):
            args["dora_wd"] = "True"
        md["ss_network_args"] = json.dumps(args)
    if (res := _resolution(resolution)) is not None:
        md["ss_resolution"] = res
    if comment:
        md["ss_training_comment"] = comment
    if base_model_name:
        md["ss_sd_model_name"] = base_model_name
    for key, value in (extra or {}).items():
        if key in HASH_KEYS or key.startswith("sdtune_"):
            raise ValueError(f"metadata key {key!r} is computed by sdtune and cannot be set")
        md[key] = value if isinstance(value, str) else json.dumps(value)
    from sdtune import __version__
    md["sdtune_format_version"] = FORMAT_VERSION
    md["sdtune_version"] = __version__
    md["sdtune_arch"] = arch
    if sdtune_modules is not None:
        md["sdtune_modules"] = json.dumps(sdtune_modules, separators=(",", ":"), sort_keys=True)
    if sdtune_specs is not None:
        md["sdtune_specs"] = json.dumps(sdtune_specs, separators=(",", ":"), sort_keys=True)
    if export_options is not None:
        md["sdtune_export"] = json.dumps(export_options, sort_keys=True)
    md.update(PLACEHOLDER)
    return md


def arch_from_metadata(md: dict[str, str]) -> tuple[str | None, str]:
    """(arch, evidence) from ``sdtune_arch`` / ``ss_base_model_version`` / ``ss_v2``; (None, "") if absent."""
    if md.get("sdtune_arch") in BASE_MODEL_VERSION:
        return md["sdtune_arch"], f"metadata sdtune_arch={md['sdtune_arch']}"
    version = md.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl", f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v2"):
        return "sd2", f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v1"):
        return "sd1", f"metadata ss_base_model_version={version}"
    if md.get("ss_v2") == "True":
        return "sd2", "metadata ss_v2=True"
    return None, ""


def sdtune_info(md: dict[str, str]) -> dict | None:
    """The parsed ``sdtune_*`` keys, or None for a file sdtune did not write."""
    if "sdtune_format_version" not in md:
        return None
    info = {"format_version": md["sdtune_format_version"], "version": md.get("sdtune_version"),
            "arch": md.get("sdtune_arch")}
    for key in ("modules", "specs", "export"):
        raw = md.get(f"sdtune_{key}")
        info[key] = json.loads(raw) if raw else None
    return info
