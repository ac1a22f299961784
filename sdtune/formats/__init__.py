"""Adapter file formats: A1111/kohya/LyCORIS files (``kohya``: write, ``reader``: read), their metadata, the ΔW
rebuilds (``rebuild``) and merged checkpoints (``checkpoint``). Applying a file to a live model is ``sdtune.apply``."""
from .kohya import DTYPES, export_tensors, load_native, save_kohya
from .reader import AdapterFile, FormatError, ModuleDelta, detect_arch, read_kohya

__all__ = ["DTYPES", "AdapterFile", "FormatError", "ModuleDelta", "detect_arch", "export_tensors", "load_native",
           "read_kohya", "save_kohya"]
