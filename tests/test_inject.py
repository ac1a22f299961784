"""Injection on a tiny diffusers U-Net + tiny CLIP text encoder: presets, attach/detach, overrides, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from helpers_adapters import perturb, rel, tiny_outputs
from helpers_formats import tiny_components
from safetensors import safe_open

from sdtune.adapters import Adapter, AdapterSpec
from sdtune.inject import Injection, attach, preset_targets

ALL = [("attn", AdapterSpec(rank=4)), ("resnet", AdapterSpec("flora", rank=4)),
       ("sample", AdapterSpec("spectral", rank=4)), ("te", AdapterSpec("dora", rank=4))]


@pytest.fixture
def comps():
    return tiny_components()


def test_presets_resolve(comps):
    attn = preset_targets("attn", comps)
    paths = {p for _, p in attn}
    assert "down_blocks.0.attentions.0.proj_in" in paths
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in paths
    assert "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj" in paths
    assert "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in paths
    assert len(attn) == 4 * 12                             # 4 transformers × (2 proj + 8 attn + 2 ff)
    resnet = {p for _, p in preset_targets("resnet", comps)}
    assert {"down_blocks.1.resnets.0.conv_shortcut", "mid_block.resnets.1.time_emb_proj"} <= resnet
    sample = [p for _, p in preset_targets("sample", comps)]
    assert sample == ["down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"]   # not the Conv2d_0 alias
    te = preset_targets("te", comps)
    assert len(te) == 2 * 6 and all(c == "text_encoder" for c, _ in te)
    with pytest.raises(ValueError, match="unknown preset 'ff'"):
        preset_targets("ff", comps)


def test_attach_detach_restores_exact_modules(comps, tmp_path):
    before = {c: dict(m.named_modules(remove_duplicate=False)) for c, m in comps.items()}
    y0, h0 = tiny_outputs(comps)
    inj = attach(comps, ALL, "sd1", svd_cache_dir=tmp_path)
    y1, h1 = tiny_outputs(comps)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)     # ΔW = 0 at init: base outputs
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    assert isinstance(comps["unet"].down_blocks[0].attentions[0].proj_in, Adapter)
    assert isinstance(comps["unet"].down_blocks[0].downsamplers[0].conv, Adapter)
    for a in inj.adapters.values():
        perturb(a)
    assert rel(tiny_outputs(comps)[0], y0) > 1e-4
    inj.merge()
    inj.detach()
    after = {c: dict(m.named_modules(remove_duplicate=False)) for c, m in comps.items()}
    assert before.keys() == after.keys()
    for c in before:
        assert before[c].keys() == after[c].keys()
        assert all(before[c][k] is after[c][k] for k in before[c])
    y2, h2 = tiny_outputs(comps)
    torch.testing.assert_close(y2, y0, rtol=1e-5, atol=1e-5)     # detach unmerged first


def test_summary_params_and_trainables(comps, tmp_path):
    inj = attach(comps, ALL, "sd1", svd_cache_dir=tmp_path)
    assert inj.num_params() == sum(p.numel() for p in inj.parameters())
    assert all(p.requires_grad for p in inj.parameters())
    adapter_params = {id(p) for p in inj.parameters()}
    frozen = [p for m in comps.values() for p in m.parameters() if id(p) not in adapter_params]
    assert frozen and not any(p.requires_grad for p in frozen)
    text = inj.summary()
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in text and "flora r4" in text
    assert text.splitlines()[-1].split() == ["total", str(len(inj.adapters)), f"{inj.num_params():,}"]
    assert "unet.down_blocks.0" in text and "text_encoder" in text
    assert list(inj.adapters)[0] == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_per_target_override(comps):
    inj = attach(comps, [("attn", AdapterSpec(rank=4)), ("resnet", AdapterSpec("flora", rank=2)),
                         ("attn", AdapterSpec("dora", rank=2, dora_axis="out"))], "sd1")
    specs = {n: a.spec for n, a in inj.adapters.items()}
    assert specs["lora_unet_mid_block_attentions_0_proj_out"] == AdapterSpec("dora", rank=2, dora_axis="out")
    assert specs["lora_unet_mid_block_resnets_0_conv1"].algorithm == "flora"
    assert {s.algorithm for s in specs.values()} == {"dora", "flora"}


def test_preset_matching_nothing(comps):
    with pytest.raises(ValueError, match="preset 'attn' matches no module"):
        attach({"text_encoder": comps["text_encoder"]}, [("attn", AdapterSpec())], "sd1")
    with pytest.raises(ValueError, match="preset 'te' matches no module"):
        attach({"unet": comps["unet"]}, [("te", AdapterSpec())], "sd1")


def test_validation_before_touching(comps):
    unet = comps["unet"]
    with torch.no_grad():
        unet.up_blocks[1].resnets[0].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lora_unet_up_blocks_1_resnets_0_conv2 \(unet.up_blocks.1.resnets.0.conv2\)"
                                         r": the base weight contains non-finite"):
        attach(comps, [("attn", AdapterSpec()), ("resnet", AdapterSpec())], "sd1")
    assert not any(isinstance(m, Adapter) for m in unet.modules())
    with pytest.raises(ValueError, match="larger than the layer allows"):
        attach(comps, [("attn", AdapterSpec(rank=64))], "sd1")
    assert not any(isinstance(m, Adapter) for m in unet.modules())


def test_attach_twice_errors(comps):
    attach(comps, [("sample", AdapterSpec(rank=2))], "sd1")
    with pytest.raises(ValueError, match="already has an adapter"):
        attach(comps, [("sample", AdapterSpec(rank=2))], "sd1")


def test_native_save_load_roundtrip(comps, tmp_path):
    rules = ALL + [("attn", AdapterSpec("dora", rank=2, dora_base="flora"))]
    inj = attach(comps, rules, "sd1", svd_cache_dir=tmp_path)
    for a in inj.adapters.values():
        perturb(a)
    y1, _ = tiny_outputs(comps)
    sd1 = {k: v.clone() for k, v in inj.state_dict().items()}
    path = tmp_path / "out" / "adapter.safetensors"
    inj.save(path)
    assert not list(path.parent.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["sdtune_format"] == "native-1" and meta["sdtune_arch"] == "sd1"
    assert json.loads(meta["sdtune_rules"])[-1][1]["dora_base"] == "flora"
    assert Injection.specs_from_file(path) == ("sd1", rules)
    inj.detach()
    inj2 = Injection.load(path, comps, "sd1", svd_cache_dir=tmp_path)
    assert list(inj2.adapters) == list(inj.adapters)
    sd2 = inj2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    torch.testing.assert_close(tiny_outputs(comps)[0], y1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained for 'sd1'"):
        Injection.load(path, comps, "sdxl")


def test_load_state_dict_checks(comps):
    inj = attach(comps, [("sample", AdapterSpec(rank=2))], "sd1")
    sd = inj.state_dict()
    key = next(iter(sd))
    with pytest.raises(KeyError, match="missing"):
        inj.load_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        inj.load_state_dict({**sd, key: torch.zeros(1)})
    assert inj.load_state_dict({**sd, "extra": torch.zeros(1)}, strict=False) == ["extra"]


def test_training_step_reaches_all_adapters(comps, tmp_path):
    inj = attach(comps, ALL, "sd1", svd_cache_dir=tmp_path)
    opt = torch.optim.AdamW(inj.parameters(), lr=1e-3)
    y, _ = tiny_outputs(comps)
    y.square().mean().backward()
    missing = [n for n, p in inj.named_parameters() if p.grad is None]
    assert not missing
    opt.step()
