"""Checks on a safetensors file before any tensor is read: pickles refused, header and size checked.

Shared by base-model loading (``sdtune.models``) and the adapter-file reader (``sdtune.formats.reader``); it sits
below both so that neither imports the other.
"""
from __future__ import annotations

import json
from pathlib import Path

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
MAX_HEADER = 100 * 1024 * 1024


class FormatError(ValueError):
    """A file sdtune will not read (a pickle, not safetensors, truncated), or an adapter file that does not fit the
    model it is applied to."""


def check_safetensors(path: Path) -> dict:
    """Refuse pickles, non-safetensors and truncated files with one clear message each, reading only the
    header; returns the parsed header."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: {path.suffix} files are pickles and can run code when loaded; sdtune only "
                          f"reads .safetensors (convert the file with a tool you trust)")
    size = path.stat().st_size
    pickled = FormatError(f"{path}: this is a pickled PyTorch file, not safetensors; sdtune never unpickles")
    with open(path, "rb") as f:
        head = f.read(8)
        # pickle / torch-zip magic, only where the bytes are no valid header length (a safetensors header length
        # may itself start with 0x80)
        is_pickle = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"
        if len(head) < 8:
            raise pickled if is_pickle else FormatError(f"{path}: not a safetensors file ({size} bytes, shorter "
                                                        f"than a header)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise pickled if is_pickle else FormatError(f"{path}: not a safetensors file, or truncated (header "
                                                        f"length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise pickled if is_pickle else FormatError(f"{path}: not a safetensors file (header is not JSON: "
                                                        f"{e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise FormatError(f"{path}: not a safetensors file (malformed tensor entries)") from None
    if 8 + n + end != size:
        raise FormatError(f"{path}: truncated or padded file: the header describes {end} bytes of tensor "
                          f"data, the file holds {size - 8 - n}")
    return header
