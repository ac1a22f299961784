"""Adapter file formats: A1111/kohya/LyCORIS files (``kohya``: write, ``reader``: read and apply), their
metadata, the ΔW rebuilds (``rebuild``) and merged checkpoints (``checkpoint``)."""
from .kohya import export_tensors, load_native, save_kohya
from .reader import (
                     AdapterFile,
                     AppliedFile,
                     FormatError,
                     ModuleDelta,
                     apply_file,
                     detect_arch,
                     iter_deltas,
                     read_kohya,
)

__all__ = ["AdapterFile", "AppliedFile", "FormatError", "ModuleDelta", "apply_file", "detect_arch",
           "export_tensors", "iter_deltas", "load_native", "read_kohya", "save_kohya"]
