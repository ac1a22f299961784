"""The embedded SDXL-family base (``assets/tiny-sdxl``) and its demo recipe: a complete offline SDXL pipeline with
SDXL's published module tree, within the size budget, and a demo-sdxl file whose every key lands on a layer of the
right shape: in sdtune's strict reader, in LyCORIS's loader and in diffusers' ``load_lora_weights``."""
from __future__ import annotations

import json

import pytest
import torch
from helpers_formats import lycoris_merge
from safetensors import safe_open

from sdtune.config import load_config
from sdtune.formats.reader import read_kohya
from sdtune.models import load
from sdtune.names import name_map
from sdtune.resources import ASSETS, recipe_path
from sdtune.toy import world as tw
from sdtune.train.loop import train

FOLDER = ASSETS / "tiny-sdxl"


def test_embedded_sdxl_is_a_complete_offline_sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    from sdtune.archs import build_unet

    model = load(FOLDER)
    pipe = model.pipeline
    assert model.arch == "sdxl" and isinstance(pipe, StableDiffusionXLPipeline)
    assert model.resolution == tw.IMAGE_SIZE
    published = build_unet("sdxl", device="meta")  # A1111 maps SDXL names by this structure's index arithmetic
    assert [n for n, _ in pipe.unet.named_modules()] == [n for n, _ in published.named_modules()]
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.text_encoder_2.config.projection_dim == pipe.unet.config.projection_class_embeddings_input_dim - 6 * \
        pipe.unet.config.addition_time_embed_dim
    assert sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file()) <= 40e6
    record = json.loads((FOLDER / "PRETRAINING.json").read_text())
    assert record["arch"] == "sdxl" and record["command"].startswith("python -m sdtune.toy.pretrain --arch sdxl")


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-sdxl")
    cfg = load_config(recipe_path("demo-sdxl"), ["prior.enabled=false", "train.steps=2", f"output.dir={out}",
                                                 "output.validation_prompts=[]", "output.checkpoint_every=0",
                                                 "output.export_dtype=fp32"])
    result = train(cfg, progress=False)
    return result.kohya


def test_demo_sdxl_file_uses_every_key_on_the_embedded_sdxl(demo_file):
    model = load(FOLDER)
    comps = model.components()
    with safe_open(str(demo_file), "pt") as f:
        keys = set(f.keys())
    modules = {k.split(".")[0] for k in keys}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"lora_te2_text_model_encoder_layers_0_self_attn_{part}" in modules, part
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules)

    read_kohya(demo_file, comps, "sdxl")  # strict: every key consumed, every ΔW shape fits its layer
    names = name_map(comps, "sdxl")
    used, file_keys = lycoris_merge(demo_file, {n: comps[c].get_submodule(p) for n, (c, p) in names.items()})
    assert used == file_keys, sorted(file_keys - used)[:5]

    fresh = load(FOLDER).pipeline
    fresh.load_lora_weights(str(demo_file))
    peft = sum(1 for c in ("unet", "text_encoder", "text_encoder_2")
               for n, _ in getattr(fresh, c).named_modules() if n.endswith("lora_A"))
    assert peft == len(modules)
