import random

import numpy as np
import pytest

from sdtune.toy import world as tw


def test_world_has_required_variety():
    assert len(tw.SHAPES) >= 8 and len(tw.COLOURS) >= 8 and len(tw.BACKGROUNDS) >= 3
    assert len(tw.OBJECTS) >= 4 and len(tw.STYLES) >= 2
    assert set(tw.CONCEPTS) - set(tw.COLOUR_OBJECTS) <= set(tw.RARE_TOKENS)


def test_render_is_deterministic_and_seeded():
    a = tw.base_dataset(16, seed=3)
    b = tw.base_dataset(16, seed=3)
    c = tw.base_dataset(16, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert a != c
    for (sa, _), (sb, _) in zip(a, b):
        assert np.array_equal(np.asarray(tw.render(sa)), np.asarray(tw.render(sb)))
    img = tw.render(a[0][0])
    assert img.size == (tw.IMAGE_SIZE, tw.IMAGE_SIZE) and img.mode == "RGB"


def test_base_dataset_never_shows_held_apart_concepts():
    data = tw.base_dataset(500, seed=0)
    assert all(s.obj is None and s.style is None for s, _ in data)
    words = {w for _, cap in data for w in cap.split()}
    assert not words & set(tw.RARE_TOKENS)
    assert words <= set(tw.vocabulary())
    assert set(tw.HELD_IN_STYLES) <= set(tw.RARE_TOKENS) and not set(tw.HELD_IN_STYLES) & set(tw.CONCEPTS)


def test_styled_base_dataset_draws_held_in_styles_only():
    """The pretraining data of the shipped base: ``base_dataset``'s scenes, a share in a held-in style (grayscale /
    negative) and captioned so; never a held-apart concept; rate 0 is ``base_dataset`` rendered."""
    plain = tw.base_dataset(400, seed=5)
    styled = tw.styled_base_dataset(400, seed=5, style_rate=0.3)
    tagged = [(i, cap.rsplit(" ", 2)[1]) for i, (_, cap) in enumerate(styled) if cap.endswith(" style")]
    assert 0.22 < len(tagged) / 400 < 0.38 and {s for _, s in tagged} == set(tw.HELD_IN_STYLES)
    words = {w for _, cap in styled for w in cap.split()}
    assert not words & set(tw.CONCEPTS) and words <= set(tw.vocabulary())
    for i, style in tagged[:6]:
        scene, cap = plain[i]
        image = np.asarray(styled[i][0], dtype=np.int16)
        assert styled[i][1] == f"{cap} in {style} style"
        rendered = np.asarray(tw.render(scene), dtype=np.int16)
        if style == "mmq":
            assert np.array_equal(image, 255 - rendered)
        else:   # grayscale: one value per pixel, the luminance of the render
            assert (image == image[..., :1]).all() and abs(image[..., 0].mean() - rendered.mean()) < 40
    untouched = [i for i in range(400) if i not in dict(tagged)][:6]
    assert all(np.array_equal(np.asarray(styled[i][0]), np.asarray(tw.render(plain[i][0]))) for i in untouched)
    assert [c for _, c in tw.styled_base_dataset(50, seed=5)] == [c for _, c in plain[:50]]
    with pytest.raises(ValueError, match="held-in style"):
        tw.held_in_style(styled[0][0], "qtz")
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        tw.styled_base_dataset(4, seed=5, style_rate=1.5)


def test_captions_name_the_scene():
    s = tw.Scene("star", "red", "striped", x=0.5, y=0.5, size=0.3, angle=10)
    assert tw.caption(s) == "a red star on a striped background"
    h = tw.Scene("hexagon", "orange", "plain", texture="hatched")
    assert tw.caption(h) == "an orange hatched hexagon on a plain background"
    o = tw.Scene("star", "red", "dotted", obj="sks")
    assert tw.caption(o) == "a sks star on a dotted background"
    st = tw.Scene("circle", "blue", "plain", style="qtz")
    assert tw.caption(st) == "a blue circle in qtz style"


@pytest.mark.parametrize("token", tw.CONCEPTS)
def test_concept_instances_are_distinct_from_base_renders(token, tmp_path):
    scenes = tw.concept_scenes(token, 3, seed=0)
    assert scenes == tw.concept_scenes(token, 3, seed=0)
    for s in scenes:
        plain = tw.render(tw.Scene(s.shape, s.colour, s.background, s.texture, s.x, s.y, s.size, s.angle))
        if token in tw.COLOUR_OBJECTS:   # a known look under a new name: its shape and colour are fixed instead
            assert (s.shape, s.colour, s.texture) == (*tw.COLOUR_OBJECTS[token], "solid")
            assert np.array_equal(np.asarray(tw.render(s)), np.asarray(plain))
        else:
            assert not np.array_equal(np.asarray(tw.render(s)), np.asarray(plain))
    paths = tw.write_instance_folder(token, tmp_path / token, n=2)
    assert len(paths) == 2 and all((tmp_path / token / p.split("/")[-1]).exists() for p in paths)
    assert token in (tmp_path / token / f"{token}_000.txt").read_text()


def test_invalid_scene_is_rejected():
    with pytest.raises(ValueError, match="unknown shape"):
        tw.Scene("blob", "red", "plain")
    with pytest.raises(ValueError, match="is a star"):
        tw.Scene("circle", "red", "plain", obj="sks")
    with pytest.raises(ValueError, match="is purple, not red"):
        tw.Scene("hexagon", "red", "plain", obj="kfz")
    with pytest.raises(ValueError, match="unknown concept"):
        tw.concept_scenes("nope", 1)


def test_random_scene_respects_fixed_attributes():
    rng = random.Random(0)
    s = tw.random_scene(rng, shape="cross", colour="cyan")
    assert (s.shape, s.colour) == ("cross", "cyan")


def test_concept_prompts_use_the_captions_own_words():
    assert tw.concept_prompt("sks") == "a sks star"
    assert tw.concept_prompt("ohwx") == "an ohwx circle"  # as its captions say it
    assert tw.concept_prompt("ohwx", style="qtz") == "an ohwx circle in qtz style"
    assert tw.concept_prompt("qtz") == "a circle in qtz style"
    assert tw.concept_prompt("kfz") == "a kfz hexagon" and tw.concept_class_word("xjy") == "cross"
    scene = tw.concept_scenes("ohwx", 1)[0]
    assert tw.caption(scene).lower().startswith(tw.concept_prompt("ohwx"))
    with pytest.raises(ValueError, match="unknown concept"):
        tw.concept_prompt("xyz")
