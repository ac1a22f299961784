"""Captions as people write them (issue 16, point 2): cleaning, folder fallback, kept tags, dropout, trigger."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdtune.data.captions import CaptionError, CaptionPolicy, clean_caption, read_caption
from sdtune.data.dataset import DreamBoothDataset, scan_instance_dir, warn_long_captions

TAGS = "sks, star, magenta, lime, striped background, outdoors"


def test_caption_files_are_cleaned_and_refused_when_not_text(tmp_path):
    assert clean_caption("\ufeff a  sks\r\nstar \t") == "a sks star"
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfsks, star\r\n")
    assert read_caption(tmp_path / "a.txt") == "sks, star"
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CaptionError, match="not UTF-8"):
        read_caption(tmp_path / "b.txt")


def test_caption_extension_is_configurable_with_the_folder_prompt_as_fallback(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.caption").write_text("sks, star")
    (tmp_path / "b.caption").write_text("  \n")  # empty: the folder prompt stands in
    (tmp_path / "c.txt").write_text("ignored: not the configured extension")
    found = {e.path.rsplit("/", 1)[-1]: e.caption
             for e in scan_instance_dir(tmp_path, 32, prompt="a sks star", caption_ext=".caption")}
    assert found == {"a.png": "sks, star", "b.png": "a sks star", "c.png": "a sks star"}


def test_shuffle_keeps_the_first_tags_and_moves_the_others():
    policy = CaptionPolicy(shuffle_tags=True, keep_tags=2)
    seen = Counter()
    for i in range(200):
        tags = policy.apply(TAGS, np.random.default_rng(i)).split(", ")
        assert tags[:2] == ["sks", "star"]
        assert sorted(tags) == sorted(TAGS.split(", "))
        seen[tags[2]] += 1
    assert len(seen) == 4 and min(seen.values()) > 20  # every other tag comes third about 1/4 of the time
    assert policy.apply(TAGS, None) == TAGS  # the fixed caption (evaluation) is unshuffled


def test_caption_and_tag_dropout_rates_and_the_trigger_word():
    n = 2000
    drop = CaptionPolicy(caption_dropout=0.25, trigger_word="sks")
    empty = sum(drop.apply("a star", np.random.default_rng(i)) == "" for i in range(n))
    assert abs(empty / n - 0.25) < 0.04
    assert drop.apply("a star", None) == "sks a star"
    assert CaptionPolicy(trigger_word="sks").apply("sks, a star", None) == "sks, a star"  # not twice
    tags = CaptionPolicy(tag_dropout=0.5, keep_tags=1, trigger_word="ohwx")
    kept = []
    for i in range(n):
        out = tags.apply(TAGS, np.random.default_rng(i)).split(", ")
        assert out[:2] == ["ohwx", "sks"]  # trigger first, the kept tag never dropped
        kept.append(len(out) - 2)
    assert abs(np.mean(kept) - 5 * 0.5) < 0.1  # each of the 5 droppable tags survives half the time


def test_views_get_varied_captions_reproducibly(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(TAGS)
    policy = CaptionPolicy(shuffle_tags=True, keep_tags=1)
    (ex,) = scan_instance_dir(tmp_path, 32, prompt=None, policy=policy)
    ds = DreamBoothDataset([ex], None, resolution=32, repeats=8)
    captions = [ds.item(i, 0)[0][1].caption for i in range(8)]
    assert len(set(captions)) > 1 and all(c.startswith("sks, ") for c in captions)
    assert captions == [ds.item(i, 0)[0][1].caption for i in range(8)]  # seeded by (seed, epoch, index)
    assert ds.fixed_views()[0][1].caption == TAGS


def test_an_overlong_caption_is_named_with_its_token_count(tiny_model, tmp_path):
    tok = tiny_model.pipeline.tokenizer
    Image.new("RGB", (32, 32)).save(tmp_path / "long.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "short.png")
    (tmp_path / "long.txt").write_text(", ".join(["a red star"] * 40))
    (tmp_path / "short.txt").write_text("a red star")
    found = scan_instance_dir(tmp_path, 32, prompt=None)
    n = len(tok(", ".join(["a red star"] * 40)).input_ids)
    assert n > tok.model_max_length
    with pytest.warns(UserWarning, match=rf"1 caption\(s\) are longer .* {tok.model_max_length} tokens .*"
                                         rf"long.png \({n} tokens\)"):
        warn_long_captions(tok, found)
