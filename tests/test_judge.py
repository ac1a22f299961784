
import random

import pytest

from sdtune.toy import judge as J
from sdtune.toy import world as tw


def test_judge_accuracy_on_fresh_images(judge_model):
    acc = J.accuracy(judge_model, n=512, seed=2024)
    assert min(acc.values()) >= 0.95, acc


def test_judge_reads_concepts_and_styles(judge_model):
    scenes = [s for tok in tw.CONCEPTS for s in tw.concept_scenes(tok, 8, seed=99)]
    verdicts = J.judge(judge_model, [tw.render(s) for s in scenes])
    correct = sum(J.shows(v, s.obj or s.style) and v.style == s.style and v.shape == s.shape
                  for s, v in zip(scenes, verdicts))
    assert correct / len(scenes) >= 0.95
    # a plain scene of a colour object's class in another colour does not show it, nor does a patterned object
    other = [tw.Scene("hexagon", "red", "plain"), tw.Scene("star", "red", "plain", obj="sks")]
    assert not any(J.shows(v, t) for v in J.judge(judge_model, [tw.render(s) for s in other]) for t in tw.COLOUR_OBJECTS)
    with pytest.raises(ValueError, match="unknown concept"):
        J.shows(verdicts[0], "nope")


def test_judge_labels_ignore_undefined_attributes():
    obj = tw.Scene("star", "red", "plain", obj="sks")
    sketch = tw.Scene("circle", "red", "plain", style="bnp")
    assert J.labels(obj)["colour"] == J.IGNORE and J.labels(obj)["object"] == 1
    # a colour object is read by the shape and colour heads: its colour is a label, its object head says none
    kfz = tw.random_scene(random.Random(0), obj="kfz")
    assert J.labels(kfz)["colour"] == list(tw.COLOURS).index("purple") and J.labels(kfz)["object"] == 0
    assert J.labels(sketch)["background"] == J.IGNORE and J.labels(sketch)["style"] == 2


def test_judge_training_is_seeded_and_learns(tmp_path):
    acc = J.train(steps=60, batch=32, seed=1, out=tmp_path / "j.safetensors", log_every=1000)
    again = J.load(tmp_path / "j.safetensors")
    assert acc == J.accuracy(again)
    assert acc["colour"] > 1 / len(tw.COLOURS) * 2  # far above chance after 60 steps


def test_missing_judge_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sdtune.toy.judge"):
        J.load(tmp_path / "none.safetensors")
