"""Latents on disk: one small file per view, named by everything that decides its value.

    key = sha256(image bytes' sha256, mask bytes' sha256, bucket, resized size, crop, flip, background, VAE
                 fingerprint)
    file = <dir>/<key[:2]>/<key>.safetensors   (latent (C, h, w), and mask (1, h, w) when it has one)

A changed image (or mask) has another content hash and a changed VAE another fingerprint, so a stale file is never
read: it is simply no longer named. Files are written to a temporary name and renamed (``atomic``), so a killed
run leaves no half-written latent, and several runs or subsets over the same images share one folder. Nothing is
kept in memory: every read goes to disk (the OS page cache keeps hot files), so a dataset larger than memory trains.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE encoder's weights (names, shapes, dtypes, first values, sums) and its scaling."""
    h = hashlib.sha256(f"scale={vae.config.scaling_factor}".encode())
    with torch.no_grad():
        for name, p in vae.state_dict().items():
            if name.startswith(("decoder.", "post_quant_conv.")):
                continue  # latents depend on the encoder half only
            head = p.flatten()[:16].double().tolist()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}{head}{p.double().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


class LatentCache:
    """Disk cache of (latent, mask) per view key; ``get`` returns None on a miss."""

    def __init__(self, folder: str | Path, vae_print: str):
        self.folder, self.vae_print = Path(folder), vae_print
        self._hashes: dict[str, tuple[tuple[int, int], str]] = {}  # path -> ((mtime_ns, size), sha256)
        self.hits = self.misses = 0

    def content_hash(self, path: str) -> str:
        """sha256 of the file's bytes, remembered while its mtime and size stay the same."""
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        known = self._hashes.get(path)
        if known is None or known[0] != stamp:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            known = self._hashes[path] = (stamp, h.hexdigest())
        return known[1]

    def path(self, image: str, mask: str | None, geometry: tuple) -> Path:
        """The file of one view: ``geometry`` = (bucket, resized, crop, flip, background)."""
        mask_id = self.content_hash(mask) if mask not in (None, "alpha") else str(mask)
        text = repr((self.content_hash(image), mask_id, geometry, self.vae_print))
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = load_file(path)
        except Exception:  # noqa: BLE001  (a damaged file is a miss: it is rewritten)
            self.misses += 1
            return None
        self.hits += 1
        return t["latent"], t.get("mask")

    def put(self, path: Path, latent: torch.Tensor, mask: torch.Tensor | None) -> None:
        tensors = {"latent": latent.detach().cpu().contiguous()}
        if mask is not None:
            tensors["mask"] = mask.detach().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
