"""Loading base models: a local diffusers folder, a single-file A1111 checkpoint, or the embedded default.

``load()`` is the one entry point. It returns a :class:`BaseModel`: the diffusers pipeline plus the
architecture family (``sd1``, ``sd2`` or ``sdxl``) that decides adapter names and export metadata. The
embedded default ``assets/tiny-sd`` is an SD1-family pipeline pretrained on the toy world
(``python -m sdtune.toy.pretrain``) and needs no network; ``assets/tiny-sdxl`` is its SDXL-family sibling (SDXL's
module tree at toy widths, two text encoders), loaded like any SDXL folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .archs import detect_arch
from .console import hide_pipeline_loading_bar
from .safefile import PICKLE_SUFFIXES, FormatError, check_safetensors
from .resources import ASSETS

def model_multiple(pipeline) -> int:
    """The side multiple a model needs: VAE scale factor × 2^(number of U-Net downsamplers)."""
    down = sum(1 for kind in pipeline.unet.config.down_block_types) - 1  # the last down block keeps the size
    return int(pipeline.vae_scale_factor) * 2 ** down


# SDTUNE_EMBEDDED points the default at another folder (e.g. a micro model while assets/tiny-sd is rebuilt).
EMBEDDED = Path(os.environ.get("SDTUNE_EMBEDDED", ASSETS / "tiny-sd"))


class ModelLoadError(RuntimeError):
    """A base model could not be loaded; the message says why and what to do."""


@dataclass
class BaseModel:
    """A loaded base model: the pipeline, its architecture family and where it came from."""

    pipeline: object
    arch: str
    source: str

    def components(self) -> dict[str, nn.Module]:
        """The adapter-targetable parts: ``unet``, ``text_encoder`` and (SDXL) ``text_encoder_2``."""
        out = {"unet": self.pipeline.unet, "text_encoder": self.pipeline.text_encoder}
        te2 = getattr(self.pipeline, "text_encoder_2", None)
        if te2 is not None:
            out["text_encoder_2"] = te2
        return out

    def fingerprint(self) -> str:
        """A short hash of the adapter-targetable weights (names, shapes, dtypes, first values, sums).

        Identifies the base model behind caches made from its outputs (class images) without hashing every byte:
        one pass of sums over the weights.
        """
        h = hashlib.sha1()
        with torch.no_grad():
            for comp, module in self.components().items():
                for name, p in module.state_dict().items():
                    head = p.flatten()[:16].double().tolist()
                    h.update(f"{comp}.{name}{tuple(p.shape)}{p.dtype}{head}{p.double().sum().item():.6e}".encode())
        return h.hexdigest()[:16]

    @property
    def resolution(self) -> int:
        unet = self.pipeline.unet
        return int(unet.config.sample_size) * int(self.pipeline.vae_scale_factor)


def _pipeline_class(xl: bool):
    """(pipeline class, its extra from_* kwargs): SD1/SD2 pipelines take safety_checker=None, SDXL has none."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return (StableDiffusionXLPipeline, {}) if xl else (StableDiffusionPipeline, {"safety_checker": None})


def _from_folder(folder: Path, dtype: torch.dtype):
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json). Pass a diffusers folder, a single-file "
            f".safetensors checkpoint, or nothing for the embedded model.")
    cls, extra = _pipeline_class("text_encoder_2" in json.loads((folder / "model_index.json").read_text()))
    try:
        return cls.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {e}") from e


def _check_safetensors(path: Path) -> dict:
    """The safetensors header of ``path``; ModelLoadError for a corrupt, truncated or non-safetensors file (the
    checks are ``sdtune.safefile.check_safetensors``'s, shared with adapter files)."""
    try:
        return check_safetensors(path)
    except FormatError as e:
        raise ModelLoadError(str(e)) from None


def _pickle_keys(path: Path) -> set[str]:
    """Tensor names of a pickle checkpoint (only reached with allow_pickle; loads the file once)."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a corrupt or non-weights pickle
        raise ModelLoadError(f"could not read the pickle checkpoint {path}: {e}") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    return set(sd)


def _from_single_file(path: Path, dtype: torch.dtype, config: str | Path | None):
    keys = _pickle_keys(path) if path.suffix.lower() in PICKLE_SUFFIXES else _check_safetensors(path)
    cls, extra = _pipeline_class(any(k.startswith("conditioner.embedders.1") for k in keys))
    kwargs = {"dtype": dtype, **extra}
    if config is not None:
        kwargs["config"] = str(config)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # diffusers raises many types here; one clear message for the user
        hint = "" if config else (" Offline, diffusers needs the architecture's configs: pass config=DIR (a diffusers "
                                  "folder of the same architecture, e.g. assets/tiny-sd for files written from it).")
        raise ModelLoadError(f"could not load the single-file checkpoint {path}: {e}.{hint}") from e


def load(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         allow_pickle: bool = False, config: str | Path | None = None) -> BaseModel:
    """Load a base model.

    ``source``: None (the embedded ``assets/tiny-sd``), a diffusers folder, or a single-file checkpoint
    (``.safetensors``; pickle ``.ckpt``/``.pt`` only with ``allow_pickle=True``, since unpickling runs code).
    ``config``: for single files, a diffusers folder with the matching architecture's configs (needed offline).
    """
    path = EMBEDDED if source is None else Path(source).expanduser()
    hide_pipeline_loading_bar()  # sdtune shows its own progress, not the libraries' loading bars
    if not path.exists():
        hint = " (the embedded model is created by `python -m sdtune.toy.pretrain`)" if source is None else ""
        raise ModelLoadError(f"base model not found: {path}{hint}")
    if path.is_dir():
        pipe = _from_folder(path, dtype)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path.name} is a pickle checkpoint; loading it can run arbitrary code. Convert it to .safetensors, "
                f"or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source.")
        pipe = _from_single_file(path, dtype, config)
    elif path.suffix.lower() == ".safetensors":
        pipe = _from_single_file(path, dtype, config)
    else:
        raise ModelLoadError(f"unsupported model file {path.name}: expected a folder or a .safetensors checkpoint")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    text_encoders = {k: v for k in ("text_encoder", "text_encoder_2") if (v := getattr(pipe, k, None)) is not None}
    return BaseModel(pipe, detect_arch(pipe.unet, text_encoders), str(path))
