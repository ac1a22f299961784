"""Multi-adapter fusion: ``api`` (check, fuse, report, write), ``math`` (per-layer maths on factors), ``zip`` (the
learned merge), ``capture`` (activations to measure on). Inputs come from ``sdtune.apply.load``."""
from .api import (
    METHODS,
    OPTIONS,
    FuseOptions,
    FusionError,
    FusionResult,
    LayerReport,
    OrthogonalOptions,
    RegmeanOptions,
    SumOptions,
    check_compatible,
    format_report,
    fuse,
    fuse_on_model,
    merge_into,
    method_options,
    prompt_sets,
    remeasure,
    save_fused,
    zip_merger,
)
from .capture import capture_activations
from .zip import ZipOptions

__all__ = ["METHODS", "OPTIONS", "FuseOptions", "FusionError", "FusionResult", "LayerReport", "OrthogonalOptions",
           "RegmeanOptions", "SumOptions", "ZipOptions", "capture_activations", "check_compatible", "format_report",
           "fuse", "fuse_on_model", "merge_into", "method_options", "prompt_sets", "remeasure", "save_fused",
           "zip_merger"]
