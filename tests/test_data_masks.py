"""Masked loss (issue 16, point 4): masks from a folder with the images' stems, or the alpha channel; a region
whose mask is zero contributes no loss and no gradient to the adapters."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.dataset import DataError, scan_instance_dir


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a sks star")


def test_mask_folder_pairs_by_stem_and_names_missing_or_misshapen_masks(tmp_path):
    inst, masks = tmp_path / "inst", tmp_path / "masks"
    _images(inst, ["a", "b", "c"])
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "a.png")   # half size, same aspect: fine
    Image.new("L", (64, 32), 255).save(masks / "c.jpg")   # wrong aspect
    with pytest.raises(DataError) as err:
        scan_instance_dir(inst, 64, prompt=None, mask_dir=str(masks))
    msg = str(err.value)
    assert "2 of 3" in msg and "b.png: no mask with its name" in msg and "c.png: mask c.jpg is 64×32" in msg
    with pytest.raises(DataError, match="mask folder not found"):
        scan_instance_dir(inst, 64, prompt=None, mask_dir=str(tmp_path / "nope"))


def test_masked_loss_zero_region_gives_zero_gradient(tmp_path):
    """Two images with identical pixels: one masked to zero on its right half. Its loss only sees the left
    half; one masked to zero everywhere gives exactly zero loss and zero adapter gradient."""
    from sdtune.config import loads_config
    from sdtune.train.loop import Trainer

    inst, masks = tmp_path / "inst", tmp_path / "masks"
    _images(inst, ["half", "none"])
    masks.mkdir()
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    Image.fromarray(half).save(masks / "half.png")
    Image.new("L", (64, 64), 0).save(masks / "none.png")
    cfg = loads_config(f"""
[data]
instance_dir = "{inst}"
mask_dir = "{masks}"
[[adapters]]
preset = "attn"
rank = 2
[train]
steps = 1
[output]
dir = "{tmp_path / 'run'}"
""")
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    views = trainer.dataset.fixed_views()
    z0, mask = trainer.encoder.latents(views, trainer.dataset)
    assert mask.shape == (2, 1, *z0.shape[-2:])
    assert torch.all(mask[0, :, :, : mask.shape[-1] // 2] == 1) and torch.all(mask[0, :, :, mask.shape[-1] // 2:] == 0)
    assert torch.all(mask[1] == 0)
    by_name = {Path(v[1].path).stem: v for v in views}
    for name, expect_zero in (("none", True), ("half", False)):
        for p in trainer.params:
            p.grad = None
        per = trainer.per_sample_loss([by_name[name]], torch.Generator().manual_seed(0))
        per.sum().backward()
        grad = sum(float(p.grad.abs().sum()) for p in trainer.params if p.grad is not None)
        assert (per.item() == 0 and grad == 0) if expect_zero else (per.item() > 0 and grad > 0)


def test_toy_world_masks_cover_the_object_and_nothing_else(tmp_path):
    from sdtune.toy import world as tw

    tw.write_masked_instance_folder("sks", tmp_path / "inst", tmp_path / "masks", n=3)
    found = scan_instance_dir(tmp_path / "inst", 64, prompt=None, mask_dir=str(tmp_path / "masks"))
    assert [e.caption for e in found] == ["a sks star"] * 3
    for e in found:
        rgb = np.asarray(Image.open(e.path)).astype(int)
        mask = np.asarray(Image.open(e.mask)) > 127
        magenta_or_lime = (np.abs(rgb - (230, 30, 200)).sum(-1) < 60) | (np.abs(rgb - (120, 230, 40)).sum(-1) < 60)
        assert magenta_or_lime[mask].mean() > 0.8 and not magenta_or_lime[~mask].any()  # edges are blended
