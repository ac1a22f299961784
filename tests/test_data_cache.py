"""The latent disk cache (issue 16, point 6): keyed by content, bucket, crop, flip and VAE; reused, invalidated,
written atomically, never held in memory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data import latent_cache
from sdtune.data.buckets import make_buckets
from sdtune.data.dataset import DreamBoothDataset, Encoder, scan_instance_dir
from sdtune.data.latent_cache import LatentCache, vae_fingerprint


def _data(folder: Path, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, (w, h) in {"wide": (128, 64), "square": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    buckets = make_buckets(64, 16)
    found = scan_instance_dir(folder, 64, prompt="a sks star", buckets=buckets)
    return DreamBoothDataset(found, None, resolution=64, buckets=buckets, flip=True)


def _encoder(model, folder: Path) -> Encoder:
    disk = LatentCache(folder, vae_fingerprint(model.pipeline.vae))
    return Encoder(model, cache_latents=True, cache_text=False, device=torch.device("cpu"), disk=disk)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def test_latents_are_written_once_reused_by_the_next_run_and_match_a_fresh_encoding(tiny_model, tmp_path):
    ds = _data(tmp_path / "inst")
    views = ds.fixed_views()
    first = _encoder(tiny_model, tmp_path / "cache")
    z1 = [first.latents([v], ds)[0] for v in views]
    assert (first.disk.hits, first.disk.misses) == (0, 2) and len(_files(tmp_path / "cache")) == 2
    assert not first._latents  # nothing kept in memory
    second = _encoder(tiny_model, tmp_path / "cache")  # a new run over the same folder
    z2 = [second.latents([v], ds)[0] for v in views]
    assert (second.disk.hits, second.disk.misses) == (2, 0)
    fresh = Encoder(tiny_model, cache_latents=False, cache_text=False, device=torch.device("cpu"))
    for a, b, v in zip(z1, z2, views):
        assert torch.equal(a, b) and torch.allclose(a, fresh.latents([v], ds)[0])
    assert z1[0].shape[-2:] != z1[1].shape[-2:]  # a wide bucket and the square one
    flipped = (v := views[0])[0], v[1], True, v[3]
    second.latents([flipped], ds)
    assert len(_files(tmp_path / "cache")) == 3  # a flip is another view, another file
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_a_changed_image_or_vae_is_a_miss(fresh_tiny_model, tmp_path):
    ds = _data(tmp_path / "inst")
    views = ds.fixed_views()
    enc = _encoder(fresh_tiny_model, tmp_path / "cache")
    before = enc.latents(views[:1], ds)[0]
    _data(tmp_path / "inst", seed=1)  # same names and sizes, new pixels
    ds = _data(tmp_path / "inst", seed=1)
    enc2 = _encoder(fresh_tiny_model, tmp_path / "cache")
    after = enc2.latents(ds.fixed_views()[:1], ds)[0]
    assert enc2.disk.misses == 1 and not torch.allclose(before, after)
    vae = fresh_tiny_model.pipeline.vae
    print_before = vae_fingerprint(vae)
    with torch.no_grad():
        next(p for n, p in vae.named_parameters() if n.startswith("decoder.")).add_(1.0)
    assert vae_fingerprint(vae) == print_before  # latents depend on the encoder only
    with torch.no_grad():
        next(p for n, p in vae.named_parameters() if n.startswith("encoder.")).add_(0.01)
    enc3 = _encoder(fresh_tiny_model, tmp_path / "cache")
    assert enc3.disk.vae_print != print_before
    enc3.latents(ds.fixed_views()[:1], ds)
    assert (enc3.disk.hits, enc3.disk.misses) == (0, 1)


def test_a_failed_write_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    ds = _data(tmp_path / "inst")
    enc = _encoder(tiny_model, tmp_path / "cache")

    def broken(tensors, path):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(latent_cache, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        enc.latents(ds.fixed_views()[:1], ds)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
