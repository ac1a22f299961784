
import pytest

from sdtune.toy import judge as J
from sdtune.toy import world as tw


def test_judge_accuracy_on_fresh_images(judge_model):
    acc = J.accuracy(judge_model, n=512, seed=2024)
    assert min(acc.values()) >= 0.95, acc


def test_judge_reads_concepts_and_styles(judge_model):
    scenes = [s for tok in tw.CONCEPTS for s in tw.concept_scenes(tok, 8, seed=99)]
    verdicts = J.judge(judge_model, [tw.render(s) for s in scenes])
    correct = sum(v.object == s.obj and v.style == s.style and v.shape == s.shape for s, v in zip(scenes, verdicts))
    assert correct / len(scenes) >= 0.95


def test_judge_labels_ignore_undefined_attributes():
    obj = tw.Scene("star", "red", "plain", obj="sks")
    sketch = tw.Scene("circle", "red", "plain", style="bnp")
    assert J.labels(obj)["colour"] == J.IGNORE and J.labels(obj)["object"] == 1
    assert J.labels(sketch)["background"] == J.IGNORE and J.labels(sketch)["style"] == 2


def test_judge_training_is_seeded_and_learns(tmp_path):
    acc = J.train(steps=60, batch=32, seed=1, out=tmp_path / "j.safetensors", log_every=1000)
    again = J.load(tmp_path / "j.safetensors")
    assert acc == J.accuracy(again)
    assert acc["colour"] > 1 / len(tw.COLOURS) * 2  # far above chance after 60 steps


def test_missing_judge_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sdtune.toy.judge"):
        J.load(tmp_path / "none.safetensors")
