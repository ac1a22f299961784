"""Several concepts in one run (issue 16, point 3): [[data.subsets]] with repeats, per-subset captions and class
prompts, the user's own regularisation images, and kohya's dataset_config TOML mapped key by key."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.config import ConfigError, loads_config
from sdtune.data.dataset import read_instances

ADAPTER = '\n[[adapters]]\npreset = "attn"\nrank = 2\n'


def _folder(root: Path, n: int, caption: str | None, ext: str = ".txt", size=(64, 64)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(root)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        if caption is not None:
            (root / f"{i}{ext}").write_text(caption)
    return root


def test_subsets_have_their_own_repeats_captions_and_class_prompts(tmp_path):
    a = _folder(tmp_path / "a", 2, "star, magenta")
    b = _folder(tmp_path / "b", 3, None)
    reg = _folder(tmp_path / "reg", 2, "a star")
    cfg = loads_config(f"""
[data]
trigger_word = "sks"
[[data.subsets]]
dir = "{a}"
repeats = 3
class_prompt = "a star"
[[data.subsets]]
dir = "{b}"
prompt = "a circle"
trigger_word = "qtz"
[[data.subsets]]
dir = "{reg}"
is_reg = true
repeats = 2
""" + ADAPTER)
    plan = read_instances(cfg.data, 64, None, class_prompt="a shape")
    assert len(plan.instances) == 5 and plan.repeats == [3, 3, 1, 1, 1]
    assert sum(plan.repeats) == 2 * 3 + 3 * 1  # an epoch is Σ images × repeats
    assert len(plan.regs) == 2 * 2
    fixed = [e.policy.apply(e.caption, None) for e in plan.instances]
    assert fixed == ["sks, star, magenta"] * 2 + ["qtz a circle"] * 3
    assert plan.class_prompts == ["a star", "a shape"]  # b names none: prior.class_prompt


def test_subset_keys_are_checked_and_written_back(tmp_path):
    with pytest.raises(ConfigError, match=r"\[data.subsets.0\] unknown key 'num_repeats'; did you mean 'repeats'"):
        loads_config('[data]\n[[data.subsets]]\ndir = "x"\nnum_repeats = 2\n' + ADAPTER)
    with pytest.raises(ConfigError, match=r"instance_dir.*or \[\[data.subsets\]\]"):
        loads_config("[data]\nflip = true\n" + ADAPTER)
    cfg = loads_config('[data]\n[[data.subsets]]\ndir = "x"\nrepeats = 2\n[[data.subsets]]\ndir = "y"\nis_reg = true\n'
                       + ADAPTER)
    again = loads_config(cfg.to_toml())
    assert again == cfg and [s.dir for s in again.data.subsets] == ["x", "y"]


KOHYA = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = 'sks'
  class_tokens = 'sks star'
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = 'qtz'
  class_tokens = 'qtz circle'
  keep_tokens = 2
  caption_dropout_rate = 0.1

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'star'
  num_repeats = 1
"""


def test_a_kohya_dataset_config_maps_key_by_key(tmp_path):
    (tmp_path / "kohya.toml").write_text(KOHYA.replace("batch_size = 2\n", ""))
    cfg = loads_config(f'[data]\ndataset_config = "{tmp_path / "kohya.toml"}"\n' + ADAPTER)
    d = cfg.data
    assert (d.resolution, d.buckets, d.bucket_upscale, d.caption_ext) == (64, True, False, ".caption")  # kohya's
    sks, qtz, reg = d.subsets
    assert (sks.dir, sks.prompt, sks.repeats, sks.shuffle_tags, sks.keep_tags, sks.caption_ext) == (
        str(tmp_path / "sks"), "sks star", 10, True, 1, ".txt")  # [general] reaches every subset
    assert (qtz.keep_tags, qtz.caption_dropout, qtz.repeats) == (2, 0.1, 1)
    assert reg.is_reg and reg.prompt == "star"
    assert d.dataset_config is None and loads_config(cfg.to_toml()) == cfg  # the recorded config stands alone


@pytest.mark.parametrize("edit,message", [
    (("batch_size = 2", "batch_size = 2"), "batch_size: set train.batch_size"),
    (("keep_tokens = 1", "keep_tokens = 1\ncolor_aug = true"), r"\[general\] color_aug is not supported"),
    (("  keep_tokens = 2", "  keep_tokens_separator = '|||'"), r"\[\[datasets.subsets\]\] 0.1 "
                                                                  r"keep_tokens_separator is not supported"),
    (("  num_repeats = 1", "  num_repeats = 1\n  resolution = 128"), "the datasets disagree on resolution"),
])
def test_kohya_keys_sdtune_lacks_are_refused_by_name(tmp_path, edit, message):
    text = KOHYA.replace(*edit)
    if "batch_size" not in edit[0]:
        text = text.replace("batch_size = 2\n", "")
    (tmp_path / "kohya.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        loads_config(f'[data]\ndataset_config = "{tmp_path / "kohya.toml"}"\n' + ADAPTER)


def test_a_kohya_dataset_trains_two_concepts_with_reg_images(tmp_path):
    from sdtune.train.loop import train

    _folder(tmp_path / "sks", 2, "sks star, magenta", size=(128, 64))
    _folder(tmp_path / "qtz", 2, None, size=(64, 128))
    _folder(tmp_path / "reg", 2, None)
    (tmp_path / "kohya.toml").write_text(KOHYA.replace("batch_size = 2\n", "").replace("num_repeats = 10",
                                                                                       "num_repeats = 2"))
    cfg = loads_config(f"""
[data]
dataset_config = "{tmp_path / 'kohya.toml'}"
[train]
steps = 2
batch_size = 2
[output]
dir = "{tmp_path / 'run'}"
""" + ADAPTER)
    result = train(cfg, progress=False)
    assert result.status == "finished" and all(math.isfinite(v) for v in result.losses)
    table = (tmp_path / "run" / "buckets.txt").read_text()
    # sks (wide, 2 repeats) and qtz (tall); the reg images are class images, not in the table
    assert "4 image(s), 6 samples per epoch with repeats, in 2 bucket(s)" in table
    assert "sks/0.png" in table and "qtz/0.png" in table
