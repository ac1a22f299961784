"""Aspect-ratio buckets (issue 16, point 1): the table, placement, batches within a bucket, views, and a short
training run on non-square images with SDXL-style micro-conditioning recorded per image."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data.buckets import TooSmall, make_buckets, place
from sdtune.models import model_multiple
from sdtune.data.dataset import DreamBoothDataset, Example, masked_mean, scan_instance_dir


def test_the_side_multiple_comes_from_the_vae_and_the_unet(tiny_model):
    pipe = tiny_model.pipeline
    assert model_multiple(pipe) == pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1) == 16


@pytest.mark.parametrize("resolution,multiple", [(64, 16), (512, 64), (1024, 64)])
def test_bucket_table_sides_area_and_aspect(resolution, multiple):
    buckets = make_buckets(resolution, multiple, max_aspect=2.0)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % multiple == 0 and h % multiple == 0
        assert w * h <= resolution ** 2
        assert max(w / h, h / w) <= 2.0
        assert (h, w) in buckets
    if resolution == 512:  # kohya's familiar SD 1.x table
        assert {(384, 640), (448, 576), (576, 448), (640, 384)} <= set(buckets)
    with pytest.raises(ValueError, match="not a multiple of"):
        make_buckets(resolution, multiple, step=multiple + 8)


def test_placement_never_upscales_and_crops_the_least():
    buckets = make_buckets(512, 64)
    for size in [(1024, 512), (512, 1024), (3000, 2000), (600, 600), (700, 1400), (1920, 1080)]:
        p = place(size, buckets)
        (w, h), (bw, bh), (rw, rh) = size, p.bucket, p.resized
        assert bw <= w and bh <= h                      # no upscaling
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, one side exact
        assert abs(rw / rh - w / h) < 0.02              # the resize keeps the aspect
        best = min(abs(math.log(w / h) - math.log(b[0] / b[1])) for b in buckets if b[0] <= w and b[1] <= h)
        assert abs(math.log(w / h) - math.log(bw / bh)) == pytest.approx(best)
        left, top = p.crop(None)
        assert left == (rw - bw) // 2 and top == (rh - bh) // 2
    with pytest.raises(TooSmall, match="nearest bucket 640×384"):
        place((300, 200), buckets)
    assert place((300, 200), buckets, upscale=True).bucket == (640, 384)  # 1.67 is nearest 1.5


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a sks star {name}")
    return root


SIZES = {"wide0": (128, 64), "wide1": (160, 80), "wide2": (128, 64), "tall0": (64, 128), "tall1": (64, 128),
         "square": (64, 64)}


def test_batches_lie_within_one_bucket_and_cover_every_sample(tmp_path):
    buckets = make_buckets(64, 16)
    found = scan_instance_dir(_folder(tmp_path / "inst", SIZES), 64, prompt=None, buckets=buckets)
    ds = DreamBoothDataset(found, None, resolution=64, buckets=buckets, repeats=2, seed=3)
    bucket_of = {Path(e.path).stem: ds.placement(e).bucket for e in found}
    assert bucket_of["wide0"] == (80, 48) and bucket_of["tall0"] == (48, 80) and bucket_of["square"] == (64, 64)
    assert ds.num_batches(2) == 3 + 2 + 1
    for epoch in range(3):
        batches = ds.batches(epoch, 2)
        assert len(batches) == ds.num_batches(2) and all(len(b) == 2 for b in batches)
        assert {q for b in batches for q in b} == set(range(len(ds)))  # every sample (×repeats) is drawn
        for b in batches:
            assert len({ds.placement(ds.instances[ds.samples[q]]).bucket for q in b}) == 1
    assert ds.batches(0, 2) == ds.batches(0, 2) and ds.batches(0, 2) != ds.batches(1, 2)
    table = ds.bucket_table()
    assert "80×48 (1.67): 3" in table and "48×80 (0.60): 2" in table and "64×64 (1.00): 1" in table


def test_views_keep_size_crop_and_flip_for_micro_conditioning(tmp_path):
    buckets = make_buckets(64, 16)
    found = scan_instance_dir(_folder(tmp_path / "inst", {"wide": (160, 80)}), 64, prompt=None, buckets=buckets)
    ds = DreamBoothDataset(found, None, resolution=64, buckets=buckets, crop="random", flip=True, seed=0)
    views = [ds.item(0, e)[0] for e in range(12)]
    crops = {v[3] for v in views}
    assert len(crops) > 1 and all(0 <= left <= 96 - 80 and top == 0 for left, top in crops)  # resized 96×48
    assert {v[2] for v in views} == {False, True}
    key, ex, flip, crop = views[0]
    x, m = ds.pixels(ex, flip, crop)
    assert x.shape == (3, 48, 80) and m is None and -1 <= float(x.min()) and float(x.max()) <= 1
    ids = ds.time_ids(views[:2])
    assert ids.shape == (2, 6)
    # original (h, w), crop (top, left), target (h, w); a flipped view's left edge is measured from the right
    assert ids[0].tolist() == [80, 160, crop[1], 96 - 80 - crop[0] if flip else crop[0], 48, 80]
    other = next(v for v in views if v[2] != flip)  # the other flip state
    assert ds.time_ids([other])[0, 3] == (96 - 80 - other[3][0] if other[2] else other[3][0])


def test_zero_mask_gives_zero_loss_and_zero_gradient_from_that_region():
    pred = torch.randn(2, 4, 6, 8, requires_grad=True)
    target = torch.randn(2, 4, 6, 8)
    mask = torch.ones(2, 1, 6, 8)
    mask[0, :, :, :4] = 0
    mask[1] = 0
    per = masked_mean((pred - target) ** 2, mask)
    per.sum().backward()
    assert per[1].item() == 0
    assert torch.all(pred.grad[0, :, :, :4] == 0) and torch.all(pred.grad[1] == 0)
    assert torch.all(pred.grad[0, :, :, 4:] != 0)
    expect = ((pred[0, :, :, 4:] - target[0, :, :, 4:]) ** 2).mean()
    assert torch.allclose(per[0], expect)
    assert torch.allclose(masked_mean((pred - target) ** 2, None), ((pred - target) ** 2).mean(dim=(1, 2, 3)))


def test_training_on_mixed_aspect_images_with_class_images(tiny_model, tmp_path):
    """Non-square buckets with class images: one run, class images per bucket, bucket table written, loss finite."""
    from sdtune.config import loads_config
    from sdtune.train.loop import Trainer

    inst = _folder(tmp_path / "inst", SIZES)
    cls = _folder(tmp_path / "cls", {f"c{i}": (64, 64) for i in range(2)})
    for p in cls.glob("*.png"):
        p.rename(p.with_name("class_" + p.name.replace("c", "0000")))
    out = tmp_path / "run"
    cfg = loads_config(f"""
[data]
instance_dir = "{inst}"
flip = true
[prior]
enabled = true
class_prompt = "a star"
class_dir = "{cls}"
num_class_images = 2
[[adapters]]
preset = "attn"
rank = 2
[train]
steps = 3
batch_size = 2
[output]
dir = "{out}"
""")
    (cls / "prompt.txt").write_text("a star\n")
    (cls / "model.txt").write_text(tiny_model.fingerprint() + "\n")
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    assert trainer.dataset.num_batches(2) == 2 + 1 + 1
    # class images drawn at each instance bucket's shape (2 asked, at least one per bucket), paired by bucket:
    # every micro-batch is one latent shape, one U-Net call
    assert sorted(p.name for p in cls.glob("class_*.png")) == [
        "class_00000.png", "class_00001.png", "class_48x80_00000.png", "class_80x48_00000.png"]
    assert Image.open(cls / "class_80x48_00000.png").size == (80, 48)
    for k in range(trainer.dataset.num_batches(2)):
        views = trainer.micro_batch(k)
        assert len(views) == 4 and len(trainer.dataset.groups(views)) == 1
    result = trainer.run()
    assert result.status == "finished" and all(math.isfinite(v) for v in result.losses)
    assert "80×48" in (out / "buckets.txt").read_text()
    assert math.isfinite(trainer.eval_loss())
    # kohya's bucket keys in the export, as A1111's metadata viewer reads them
    import json

    from safetensors import safe_open

    with safe_open(out / "adapter.safetensors", "pt") as f:
        md = f.metadata()
    info = json.loads(md["ss_bucket_info"])
    assert md["ss_enable_bucket"] == "True" and md["ss_bucket_no_upscale"] == "True"
    assert sum(b["count"] for b in info["buckets"].values()) == len(trainer.dataset) == len(SIZES)
    assert {tuple(b["resolution"]) for b in info["buckets"].values()} == {
        trainer.dataset.placement(e).bucket for e in trainer.dataset.instances}
    wide = abs(2.0 - 80 / 48)  # 128×64 and 160×80 in the 80×48 bucket
    assert 0 < info["mean_img_ar_error"] <= wide


def test_sample_takes_width_and_height(tiny_model):
    from sdtune.sample import SampleRequest, generate

    (s,) = generate(tiny_model, SampleRequest(prompts=["a star"], steps=2, width=80, height=48), progress=False)
    assert s.image.size == (80, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        generate(tiny_model, SampleRequest(prompts=["a star"], steps=2, width=72, height=48), progress=False)


def _concept_pixels(x: torch.Tensor) -> int:
    """Pixels of the sks star's magenta or lime in a (3, h, w) view in [-1, 1]."""
    rgb = ((x + 1) * 127.5).permute(1, 2, 0).numpy()
    magenta = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] > 150)
    lime = (rgb[..., 0] < 170) & (rgb[..., 1] > 190) & (rgb[..., 2] < 100)
    return int((magenta | lime).sum())


def test_framed_toy_scenes_lose_the_concept_to_a_centre_square_crop_but_not_to_buckets(tmp_path):
    """The toy world's non-square instance set: a centre square crop cuts part of the star off in at least a
    third of the images; the bucket view keeps (almost) all of it."""
    from sdtune.toy import world as tw

    tw.write_framed_instance_folder("sks", tmp_path / "inst", n=12)
    buckets = make_buckets(64, 16)
    found = scan_instance_dir(tmp_path / "inst", 64, prompt=None, buckets=buckets)
    with_buckets = DreamBoothDataset(found, None, resolution=64, buckets=buckets)
    square = DreamBoothDataset(found, None, resolution=64, upscale=True)  # 48 px short sides: classic resize
    assert {with_buckets.placement(e).bucket for e in found} == {(80, 48), (48, 80)}
    cut = 0
    for ex in found:
        (w, h) = ex.size
        whole = _concept_pixels(torch.from_numpy(np.asarray(Image.open(ex.path), np.float32)).permute(2, 0, 1)
                                / 127.5 - 1) * (64 / min(w, h)) ** 2  # concept area at the square's scale
        kept_square = _concept_pixels(square.pixels(ex, False, None)[0])
        kept_bucket = _concept_pixels(with_buckets.pixels(ex, False, None)[0]) * (64 / 48) ** 2
        cut += kept_square < 0.8 * whole
        assert kept_bucket > 0.75 * whole
    assert cut >= len(found) / 3


def test_class_images_are_shared_out_over_the_instance_buckets():
    from sdtune.data.classes import class_image_shapes

    ex = [Example(f"{k}.png", "", size=size) for k, size in enumerate([(128, 64)] * 3 + [(64, 128), (64, 64)])]
    buckets = make_buckets(64, 16)
    assert class_image_shapes(ex, [1] * 5, 10, 64, buckets) == {(48, 80): 2, (64, 64): 2, (80, 48): 6}
    assert class_image_shapes(ex, [1, 1, 1, 4, 1], 16, 64, buckets) == {(48, 80): 8, (64, 64): 2, (80, 48): 6}
    assert class_image_shapes(ex, [1] * 5, 2, 64, buckets) == {(48, 80): 1, (64, 64): 1, (80, 48): 1}  # ≥ 1 each
    assert class_image_shapes(ex, [1] * 5, 10, 64, None) == {(64, 64): 10}  # no buckets: all square
