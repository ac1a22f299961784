"""Resumable training checkpoints that survive a kill.

A checkpoint is a folder ``checkpoints/step-000050/`` holding ``adapter.sdtune`` (the native adapter state) and
``trainer.pt`` (optimizer, lr scheduler, RNG states, step, samples consumed, the resolved config, and the EMA
weights when the run keeps them). It is written into ``checkpoints/.tmp-…`` first, every file fsynced, then renamed
into place with ``os.replace``: a folder named ``step-*`` is always complete, and a kill during a save leaves only a
``.tmp-`` folder that the next run removes.
``trainer.pt`` holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import replace_dir

PREFIX = "step-"


def rng_state(noise_generator: torch.Generator) -> dict:
    """Python, NumPy, torch (CPU and CUDA) and the trainer's noise generator, as weights_only-safe values."""
    np_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(), "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(np_state["state"]["pos"]), "numpy_gauss": [int(np_state["has_gauss"]),
                                                                        float(np_state["gauss"])],
            "torch": torch.get_rng_state(), "noise": noise_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, noise_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                                                               "pos": state["numpy_pos"]},
                         "has_gauss": state["numpy_gauss"][0], "gauss": state["numpy_gauss"][1]})
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "trainer.pt").is_file() and (p / "adapter.sdtune").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete ``.tmp-*`` folders a killed save left behind; returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".tmp-*")] if folder.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save(folder: str | Path, step: int, injection, state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep`` complete ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    injection.save(tmp / "adapter.sdtune")
    torch.save(state, tmp / "trainer.pt")
    for p in (tmp / "adapter.sdtune", tmp / "trainer.pt", tmp):
        _fsync(p)
    replace_dir(tmp, final)  # the same step may be saved again (e.g. cancelled right after a periodic save)
    _fsync(folder)
    for stale in complete(folder)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


RESUME_HELP = ("auto (the newest complete checkpoint of the run folder if there is one, else start fresh) | latest "
               "(the newest, an error if there is none) | a checkpoint folder")


def resolve(resume: str | Path, folder: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint in ``folder``; ``"auto"`` -> the same, or None (start fresh)
    when there is none; a path -> that checkpoint (folder or trainer.pt)."""
    if str(resume) in ("latest", "auto"):
        found = complete(folder)
        if not found and str(resume) == "latest":
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {folder} (--resume auto starts "
                                    f"fresh when there is none)")
        return found[-1] if found else None
    path = Path(resume)
    if path.name == "trainer.pt":
        path = path.parent
    if not (path / "trainer.pt").is_file() or not (path / "adapter.sdtune").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs trainer.pt and adapter.sdtune)")
    return path


def load(path: Path) -> tuple[dict, dict]:
    """(trainer state, adapter tensors) of a complete checkpoint."""
    from safetensors.torch import load_file

    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True), load_file(path / "adapter.sdtune")


def bytes_needed(num_params: int, keep: int, ema: bool = False, exports: int = 0) -> int:
    """Disk for ``keep`` + 1 checkpoints in flight (adapter fp32 + AdamW's two moments [+ the EMA copy]), the
    final exports and ``exports`` intermediate A1111 files (output.save_every, kept, at most fp32)."""
    per_checkpoint = num_params * 4 * (4 if ema else 3) + 1_000_000
    return per_checkpoint * (keep + 1) + num_params * 4 * (2 + exports) + 10_000_000
