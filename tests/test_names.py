"""kohya / A1111 names: SD1.5 diffusers-style, SDXL LDM-style, text encoders from the fixed template."""
from __future__ import annotations

import re

import pytest

from sdtune.archs import build_random
from sdtune.inject import preset_targets
from sdtune.names import TE_PARTS, adaptable_modules, kohya_name, name_map


@pytest.fixture(scope="module")
def sd1():
    return build_random("sd1", device="meta").components()


@pytest.fixture(scope="module")
def sdxl():
    return build_random("sdxl", device="meta").components()


def test_sd1_unet_names_are_diffusers_paths(sd1):
    mods = adaptable_modules(sd1["unet"])
    assert len(mods) > 250
    for path, _ in mods:
        assert kohya_name("unet", path, "sd1") == "lora_unet_" + path.replace(".", "_")
    assert "Conv2d_0" not in " ".join(p for p, _ in mods)
    nm = name_map(sd1, "sd1")
    assert nm["lora_unet_down_blocks_0_attentions_0_proj_in"] == ("unet", "down_blocks.0.attentions.0.proj_in")
    assert nm["lora_unet_down_blocks_0_downsamplers_0_conv"] == ("unet", "down_blocks.0.downsamplers.0.conv")


LDM_FORM = re.compile(r"^lora_unet_(input_blocks_\d+_[01]|middle_block_[012]|output_blocks_\d+_[012]|time_embed_[02]|"
                      r"label_emb_0_[02]|out_2)(_|$)")


def test_sdxl_names_ldm_unique(sdxl):
    names = {}
    for preset in ("attn", "resnet", "sample"):
        for comp, path in preset_targets(preset, sdxl):
            name = kohya_name(comp, path, "sdxl")
            assert LDM_FORM.match(name), name
            assert not re.search(r"down_blocks|up_blocks|mid_block|resnets|attentions|samplers", name), name
            assert name not in names, (name, path, names.get(name))
            names[name] = path
    assert len(names) > 700
    nm = name_map(sdxl, "sdxl")                              # every Linear/Conv2d, unique, reversible
    assert all(nm[n] == ("unet", p) for n, p in names.items())


@pytest.mark.parametrize("path,name", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("mid_block.attentions.0.proj_in", "middle_block_1_proj_in"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks_3_0_op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_2_conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks_1_0_in_layers_2"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks_2_0_out_layers_3"),
    ("down_blocks.1.resnets.0.time_emb_proj", "input_blocks_4_0_emb_layers_1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks_4_0_skip_connection"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "input_blocks_8_1_transformer_blocks_9_ff_net_2"),
    ("mid_block.resnets.1.conv2", "middle_block_2_out_layers_3"),
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0", "output_blocks_2_1_transformer_blocks_0_attn2_to_out_0"),
    ("up_blocks.2.resnets.2.conv1", "output_blocks_8_0_in_layers_2"),
    ("add_embedding.linear_1", "label_emb_0_0"),
    ("time_embedding.linear_2", "time_embed_2"),
    ("conv_in", "input_blocks_0_0"),
])
def test_sdxl_examples(path, name):
    assert kohya_name("unet", path, "sdxl") == "lora_unet_" + name


def test_te_names_from_template(sd1, sdxl):
    for comps, arch, prefixes in ((sd1, "sd1", {"text_encoder": ("lora_te", 12)}),
                                  (sdxl, "sdxl", {"text_encoder": ("lora_te1", 12), "text_encoder_2": ("lora_te2", 32)})):
        nm = name_map(comps, arch)
        for comp, (prefix, layers) in prefixes.items():
            got = {n: p for n, (c, p) in nm.items() if c == comp}
            want = {f"{prefix}_text_model_encoder_layers_{i}_{part.replace('.', '_')}" for i in range(layers)
                    for part in TE_PARTS}
            assert set(got) == want
            for n, p in got.items():                          # reversible to the live module path
                assert comps[comp].get_submodule(p) is not None
    # CLIPTextModelWithProjection keeps the text_model level, CLIPTextModel (transformers 5) does not: same names
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.3.mlp.fc2", "sdxl") == \
        "lora_te2_text_model_encoder_layers_3_mlp_fc2"
    assert kohya_name("text_encoder", "encoder.layers.3.self_attn.out_proj", "sd2") == \
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj"


def test_name_errors():
    with pytest.raises(ValueError, match="has no text-encoder component 'text_encoder_2'"):
        kohya_name("text_encoder_2", "encoder.layers.0.mlp.fc1", "sd1")
    with pytest.raises(ValueError, match="not an adaptable text-encoder module"):
        kohya_name("text_encoder", "text_projection", "sd1")
    with pytest.raises(ValueError, match="no LDM name"):
        kohya_name("unet", "down_blocks.0.resnets.0.nonsense", "sdxl")
    with pytest.raises(ValueError, match="unknown architecture"):
        kohya_name("unet", "conv_in", "sd3")


def test_name_map_on_attached_model(tmp_path):
    from helpers_formats import tiny_components

    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach

    comps = tiny_components()
    before = name_map(comps, "sd1")
    inj = attach(comps, [("sample", AdapterSpec(rank=2)), ("te", AdapterSpec(rank=2))], "sd1")
    assert name_map(comps, "sd1") == before
    assert set(inj.adapters) <= set(before)
