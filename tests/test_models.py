import json

import pytest
import torch

from sdtune import archs
from sdtune.archs import detect_arch
from sdtune.models import EMBEDDED, ModelLoadError, load


def test_embedded_model_loads_offline_and_is_sd1_family(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tiny_model.arch == "sd1"
    assert tiny_model.resolution == 64
    classes = {type(m).__name__ for m in tiny_model.pipeline.unet.modules()}
    assert {"ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D"} <= classes
    words = tiny_model.pipeline.tokenizer.tokenize("a sks star on a striped background")
    assert words == ["a</w>", "sks</w>", "star</w>", "on</w>", "a</w>", "striped</w>", "background</w>"]


def test_embedded_model_size_budget():
    total = sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"assets/tiny-sd is {total / 2**20:.1f} MiB"


def test_load_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load(tmp_path / "nope")


def test_load_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load(tmp_path)


def test_load_refuses_pickle_without_flag(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04junk")
    with pytest.raises(ModelLoadError, match="pickle"):
        load(p)


@pytest.mark.parametrize("content", [b"", b"garbage that is not safetensors at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_load_corrupt_single_file(tmp_path, content):
    p = tmp_path / "model.safetensors"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load(p)


def test_load_truncated_single_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(p)


def test_load_unsupported_suffix(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported"):
        load(p)


def test_load_diffusers_folder_copy(tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(EMBEDDED, dst)
    model = load(dst)
    assert model.arch == "sd1" and model.source == str(dst)
    broken = tmp_path / "broken"
    shutil.copytree(EMBEDDED, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load(broken)


@pytest.mark.parametrize("arch,unet_params,te_params", [
    ("sd1", 859_520_964, {"text_encoder": 123_060_480}),
    ("sd2", 865_910_724, {"text_encoder": 340_387_840}),
    ("sdxl", 2_567_463_684, {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_random_real_architectures(arch, unet_params, te_params):
    m = archs.build_random(arch, device="meta")
    assert sum(p.numel() for p in m.unet.parameters()) == unet_params
    assert {k: sum(p.numel() for p in v.parameters()) for k, v in m.text_encoders.items()} == te_params
    assert detect_arch(m.unet, m.text_encoders) == arch
    names = dict(m.unet.named_modules())
    if arch == "sdxl":
        assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q" in names
        assert "add_embedding.linear_1" in names
        assert "text_model.encoder.layers.31.self_attn.q_proj" in dict(m.text_encoders["text_encoder_2"].named_modules())
    else:
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
        assert "up_blocks.3.resnets.2.conv_shortcut" in names
        assert "encoder.layers.0.self_attn.q_proj" in dict(m.text_encoders["text_encoder"].named_modules())


def test_random_build_is_seeded():
    a = archs.build_text_encoders("sd1", seed=1)["text_encoder"]
    b = archs.build_text_encoders("sd1", seed=1)["text_encoder"]
    assert torch.equal(a.encoder.layers[0].mlp.fc1.weight, b.encoder.layers[0].mlp.fc1.weight)
    with pytest.raises(ValueError, match="unknown architecture"):
        archs.build_unet("sd3")


def test_pretraining_record_is_shipped():
    record = json.loads((EMBEDDED / "PRETRAINING.json").read_text())
    assert record["command"].startswith("python -m sdtune.toy.pretrain")
    # the shipped base knows the held-in styles' construction ("… in rrk style"): every stage names its command
    assert [c["command"].split(" --style-rate ")[-1] for c in record["continued"]] == ["0.3"]
