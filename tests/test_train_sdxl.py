"""The trainer on the embedded SDXL base (the ``tiny_sdxl`` fixture: ``assets/tiny-sdxl``), per
algorithm: exactly the trained parts (U-Net, TE1, TE2) change, each text encoder learns at its own rate, frozen
encoders are cached, every image's micro-conditioning reaches the U-Net, and the A1111 file names te1/te2."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sdtune.config import ConfigError, loads_config
from sdtune.toy import world as tw
from sdtune.train.loop import Trainer

RES = 64
# (algorithm, text encoders trained): every component is trained by some case and left frozen by another
CASES = {"locon": ["te1", "te2"], "flora": ["te2"], "dora": ["te1"], "spectral": []}
PRESET = {"spectral": "sample"}  # Spectral SVDs every adapted weight at setup: a few layers keep the test short
COMPONENT = {"te1": "text_encoder", "te2": "text_encoder_2"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two instance images, one of them 96×80, so that original size, crop and target size all differ."""
    folder = tmp_path_factory.mktemp("sdxl-train") / "inst"
    paths = tw.write_instance_folder("sks", folder, n=2)
    Image.open(paths[0]).resize((96, 80)).save(paths[0])
    return folder


def expected_time_ids(path) -> list[float]:
    """(original h, w, crop top, left, target h, w) of the centre crop: short side resized to RES, then cropped."""
    w, h = Image.open(path).size
    s = RES / min(w, h)
    rw, rh = round(w * s), round(h * s)
    return [h, w, (rh - RES) // 2, (rw - RES) // 2, RES, RES]


def config(model_dir, images, out, algo, encoders, prior=False):
    te = f"train_text_encoder = true\ntext_encoders = {encoders!r}".replace("'", '"') if encoders else ""
    extra = f"""
[prior]
enabled = true
class_prompt = "a star"
class_dir = "{out.parent / 'class'}"
num_class_images = 2
sample_steps = 1
""" if prior else ""
    return loads_config(extra + f"""
[model]
path = "{model_dir}"
[data]
instance_dir = "{images}"
resolution = {RES}
[[adapters]]
preset = "{PRESET.get(algo, 'attn')}"
algorithm = "{algo}"
rank = 2
[optim]
lr_unet = 1e-2
lr_text = 1e-3
lr_text_2 = 2e-3
[train]
steps = 1
batch_size = 2
{te}
[output]
dir = "{out}"
export_dtype = "fp32"
""" + ('validation_prompts = ["a sks star"]\nsample_steps = 1\nsample_count = 1\n' if prior else ""))


@torch.no_grad()
def outputs(trainer):
    """Each component's output on fixed inputs: TE1 hidden states, TE2 hidden states + pooled, U-Net prediction."""
    pipe = trainer.model.pipeline
    out = {}
    for key, tok in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        ids = tok(["a sks star"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        o = getattr(pipe, key)(ids, output_hidden_states=True)
        out[key] = torch.cat([o.hidden_states[-2].flatten(), o[0].flatten()])
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    z = torch.randn(1, 4, RES // 4, RES // 4, generator=g)
    hidden = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
    out["unet"] = pipe.unet(z, torch.tensor([500]), encoder_hidden_states=hidden, added_cond_kwargs={
        "text_embeds": pooled, "time_ids": torch.tensor([[RES, RES, 0, 0, RES, RES]])}).sample
    return out


@pytest.mark.parametrize("algo", list(CASES))
def test_sdxl_trains_exactly_the_chosen_parts(algo, tiny_sdxl, images, tmp_path):
    encoders = CASES[algo]
    trained = {"unet", *(COMPONENT[e] for e in encoders)}
    prior = algo == "locon"  # one case also generates class images and previews with the SDXL pipeline
    trainer = Trainer(config(tiny_sdxl.source, images, tmp_path / "run", algo, encoders, prior), progress=False)
    trainer.setup()
    assert {p.component for p in trainer.injection.places.values()} == trained
    frozen = {"text_encoder", "text_encoder_2"} - trained
    assert trainer.encoder.cached_encoders == frozen
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"unet": 1e-2, **({"text": 1e-3} if "te1" in encoders else {}),
                   **({"text2": 2e-3} if "te2" in encoders else {})}

    seen = []
    hook = trainer.model.pipeline.unet.add_time_proj.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].view(-1, 6).tolist()))
    before = outputs(trainer)
    seen.clear()
    result = trainer.run()
    hook.remove()
    after = outputs(trainer)

    for key in ("unet", "text_encoder", "text_encoder_2"):
        assert torch.equal(before[key], after[key]) == (key not in trained), f"{algo}: {key}"
    # the micro-conditioning of each image, from the resize and crop actually applied, reached the U-Net
    expected = [expected_time_ids(p) for p in sorted(images.glob("*.png"))]
    assert expected[0] != expected[1] and len(seen) == (2 if prior else 1)  # the training step (and a preview)
    expected += [[RES, RES, 0, 0, RES, RES]] * 2 if prior else []  # the generated class images: square, uncropped
    assert sorted(seen[0]) == sorted(expected), seen
    if prior:
        assert len(list((tmp_path / "class").glob("class_*.png"))) == 2
        assert result.samples and Image.open(result.samples[-1]).size == (RES, RES)
    # frozen encoders were encoded once and cached (hidden states and, for TE2, the pooled embedding)
    cached = {name for name, _ in trainer.encoder._text}
    assert cached == frozen
    if "text_encoder_2" in frozen:
        assert all(p is not None for (name, _), (_, p) in trainer.encoder._text.items() if name == "text_encoder_2")
    # the A1111 file: te1/te2 names exactly for the trained encoders; TE2 attention adapts q, k, v and out together
    with safe_open(str(result.kohya), "pt") as f:
        keys = set(f.keys())
    for e in ("te1", "te2"):
        assert any(k.startswith(f"lora_{e}_text_model_encoder_layers_") for k in keys) == (e in encoders), e
    if "te1" in encoders:  # TE1's last layer feeds nothing SDXL reads (penultimate states, TE2's pooled): no adapter
        last = trainer.model.pipeline.text_encoder.config.num_hidden_layers - 1
        assert not any(k.startswith(f"lora_te1_text_model_encoder_layers_{last}_") for k in keys)
    if "te2" in encoders:
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_0_self_attn_{part}.lora_down.weight" in keys, part
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)


def test_text_prior_holds_both_encoders_and_the_pooled_embedding(tiny_sdxl, images, tmp_path):
    cfg = config(tiny_sdxl.source, images, tmp_path / "run", "locon", ["te1", "te2"], prior=True)
    cfg = replace(cfg, prior=replace(cfg.prior, text_prior_weight=1.0), train=replace(cfg.train, steps=2),
                  output=replace(cfg.output, validation_prompts=[]))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    texts, h0, p0 = trainer.text_prior
    assert texts == ["a star"] and p0 is not None and float(trainer.text_drift()) == 0.0
    trainer.run()
    h, p = trainer.encoder.text(texts)
    assert not torch.equal(h, h0) and not torch.equal(p, p0)  # both encoders' hidden states and TE2's pooled moved
    assert float(trainer.text_drift()) > 0


def test_text_encoder_choice_is_checked_against_the_model(tmp_path):
    from sdtune.models import load

    sd1 = load().components()
    cfg = config("x", tmp_path, tmp_path / "run", "locon", ["te2"])
    with pytest.raises(ConfigError, match="no te2"):
        cfg.train.trained_text_encoders(sd1)
    assert config("x", tmp_path, tmp_path / "run", "locon", ["te1", "te2"]).train.trained_text_encoders(sd1) == \
        ["text_encoder"]
    with pytest.raises(ConfigError, match="text_encoders"):
        loads_config('[data]\ninstance_dir = "x"\n[[adapters]]\n[train]\nsteps = 1\ntext_encoders = ["te3"]\n')
