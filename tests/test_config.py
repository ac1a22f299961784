"""The training config schema: loading, validation messages, --set overrides, the shipped recipes."""
from __future__ import annotations

from pathlib import Path

import pytest

from sdtune.adapters import AdapterSpec
from sdtune.config import (
    ConfigError,
    TrainConfig,
    apply_override,
    describe,
    load_config,
    loads_config,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = """
[data]
instance_dir = "inst"
instance_prompt = "a sks star"

[[adapters]]
preset = "attn"
rank = 4

[train]
steps = 10
"""


def test_minimal_config_has_defaults():
    cfg = loads_config(BASE)
    assert cfg.train.steps == 10 and cfg.train.batch_size == 1 and cfg.optim.optimizer == "adamw"
    assert cfg.rules() == [("attn", AdapterSpec("locon", rank=4))]


@pytest.mark.parametrize("extra, words", [
    ("[train]\nstpes = 3", ["[train]", "'stpes'", "did you mean 'steps'"]),
    ("[optim]\nlr_unt = 1e-4", ["[optim]", "'lr_unt'", "did you mean 'lr_unet'"]),
    ("[trian]\nsteps = 3", ["unknown section [trian]", "did you mean [train]"]),
    ("[[adapters]]\npreset = 'resnet'\nrnak = 2", ["[adapters.1]", "'rnak'", "did you mean 'rank'"]),
])
def test_unknown_key_names_it_and_suggests(extra, words):
    text = BASE.replace("[train]\nsteps = 10", "") + extra
    if "stpes" not in extra and "trian" not in extra:
        text += "\n[train]\nsteps = 10"
    with pytest.raises(ConfigError) as e:
        loads_config(text)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("train.steps='ten'", ["[train] steps", "expected an integer", "got str"]),
    ("train.batch_size=1.5", ["[train] batch_size", "expected an integer"]),
    ("data.flip=1", ["[data] flip", "expected true/false"]),
    ("optim.lr_unet=true", ["[optim] lr_unet", "expected a number"]),
    ("output.validation_prompts='one'", ["validation_prompts", "a list of a string"]),
])
def test_wrong_type_is_named(override, words):
    with pytest.raises(ConfigError) as e:
        loads_config(BASE, [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("override, words", [
    ("optim.optimizer=adamw9bit", ["[optim] optimizer", "did you mean 'adamw8bit'"]),
    ("train.mixed_precision=fp8", ["mixed_precision", "'fp16'"]),
    ("data.crop=centre", ["[data] crop", "did you mean 'center'"]),
    ("optim.lr_unet=-1", ["lr_unet", "positive"]),
    ("data.resolution=63", ["resolution", "multiple of 8"]),
    ("adapters.0.algorithm=lora", ["algorithm", "expected one of"]),
    ("adapters.0.scale=2", ["scale is FLoRA's"]),           # strict AdapterSpec: scale only for flora
    ("train.epochs=2", ["exactly one of steps and epochs"]),
    ("prior.enabled=true", ["class_prompt", "required"]),
    ("output.save_every=-100", ["[output] save_every", "expected >= 0"]),
    ("train.text_encoder_steps=0", ["[train] text_encoder_steps", "expected >= 1"]),
    ("prior.text_prior_weight=-1", ["[prior] text_prior_weight", "expected >= 0"]),
])
def test_bad_values_are_explained(override, words):
    with pytest.raises(ConfigError) as e:
        loads_config(BASE, [override])
    for w in words:
        assert w in str(e.value)


def test_te_rule_needs_train_text_encoder():
    text = BASE + "\n[[adapters]]\npreset = 'te'\n"
    with pytest.raises(ConfigError, match="train_text_encoder"):
        loads_config(text)
    cfg = loads_config(text, ["train.train_text_encoder=true"])
    assert [p for p, _ in cfg.rules()] == ["attn", "te"]
    # without an explicit te rule, the text encoder gets the first rule's settings
    cfg = loads_config(BASE, ["train.train_text_encoder=true"])
    assert cfg.rules()[-1] == ("te", AdapterSpec("locon", rank=4))


def test_set_overrides_are_typed_by_the_schema():
    cfg = loads_config(BASE, ["train.steps=25", "optim.lr_unet=3e-4", "optim.lr_text=1", "data.flip=true",
                              "data.instance_prompt=a photo of sks star", "output.dir=2024",
                              "output.validation_prompts=['a sks star', 'a star']", "adapters.rank=2",
                              "adapters.0.alpha=1", "train.min_snr_gamma=5", "train.min_snr_gamma=none"])
    assert cfg.train.steps == 25 and cfg.optim.lr_unet == 3e-4
    assert cfg.optim.lr_text == 1.0 and isinstance(cfg.optim.lr_text, float)
    assert cfg.data.flip is True and cfg.data.instance_prompt == "a photo of sks star"
    assert cfg.output.dir == "2024"  # a string field keeps "2024" as the folder name
    assert cfg.output.validation_prompts == ["a sks star", "a star"]
    assert cfg.adapters[0].rank == 2 and cfg.adapters[0].alpha == 1.0
    assert cfg.train.min_snr_gamma is None


def test_set_errors():
    for bad, word in [("train.steps", "section.key=value"), ("trian.steps=3", "did you mean 'train'"),
                      ("adapters.3.rank=2", "0..0")]:
        with pytest.raises(ConfigError, match=word):
            apply_override({"adapters": [{}]}, bad)


def test_resolved_toml_round_trips():
    cfg = loads_config(BASE, ["adapters.0.algorithm=flora", "adapters.0.flora_ranks=[2, 2, 1, 1]",
                              "output.validation_prompts=['a \"quoted\" sks star']", "optim.grad_clip=none"])
    again = loads_config(cfg.to_toml())
    assert again == cfg
    assert isinstance(again, TrainConfig)


def test_describe_lists_every_key():
    text = describe()
    for key in ("instance_dir", "prior_loss_weight", "min_snr_gamma", "keep_checkpoints", "spectral_mode"):
        assert key in text


@pytest.mark.parametrize("name", ["demo", "locon", "flora", "dora", "spectral"])
def test_shipped_recipes_load_and_open_with_their_command(name):
    path = ROOT / "train_configs" / f"{name}.toml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sdtune train train_configs/") or first.startswith("# accelerate launch")
    assert f"train_configs/{name}.toml" in first
    cfg = load_config(path)
    assert cfg.adapters and cfg.rules()


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
