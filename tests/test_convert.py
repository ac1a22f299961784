"""``sdtune convert``: diffusers/PEFT LoRA files ↔ kohya/A1111 files, checked against diffusers and PEFT themselves.

Oracle: a LoRA built by PEFT on the SD1.5 / SDXL layouts (``archs.build_random(small=True)``: the published block
structure, small widths), U-Net (attention, resnet convs, proj_in) and text encoder(s), with per-module ranks and
alphas (``rank_pattern``/``alpha_pattern``), written by diffusers' own ``save_lora_weights`` with its adapter
metadata. Its merged weights are PEFT's own (base + ``get_delta_weight``).
"""
from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch

from sdtune.apply import apply_file
from sdtune.formats import rebuild
from sdtune.formats.convert import convert_file, detect_format, file_format, read_any

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _small(arch):
    from sdtune.archs import build_random

    return build_random(arch, small=True, seed=0).components()


def _pipeline_class(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def _peft_lora(arch, tmp_path, *, rslora=False):
    """(file written by save_lora_weights, {(component, path): PEFT's merged weight})."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    comps = _small(arch)
    # SDXL's deep transformer stacks repeat the same layer kinds: their first block is enough (and fast)
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"conv1": 2},
                                  alpha_pattern={"proj_in": 3, "to_k": 5}, use_rslora=rslora,
                                  exclude_modules=r".*transformer_blocks\.[1-9].*"),
               **{c: LoraConfig(r=3, lora_alpha=6, target_modules=TE_TARGETS, alpha_pattern={"fc1": 1})
                  for c in comps if c != "unet"}}
    g = torch.Generator().manual_seed(0)
    expected, layers, metadata = {}, {}, {}
    for c, cfg in configs.items():
        inject_adapter_in_model(cfg, comps[c])
        for path, module in comps[c].named_modules():
            if isinstance(module, LoraLayer):
                for factor in (module.lora_A["default"], module.lora_B["default"]):
                    factor.weight.data = torch.randn(factor.weight.shape, generator=g) * 0.2
                expected[c, path] = (module.base_layer.weight + module.get_delta_weight("default")).detach()
        state = get_peft_model_state_dict(comps[c])
        layers[f"{c}_lora_layers"] = convert_state_dict_to_diffusers(state)
        metadata[f"{c}_lora_adapter_metadata"] = cfg.to_dict()
    _pipeline_class(arch).save_lora_weights(tmp_path / "peft", **layers, **metadata)
    return tmp_path / "peft" / "pytorch_lora_weights.safetensors", expected


def _weights(comps, keys):
    return {(c, p): comps[c].get_submodule(p).weight.detach().clone() for c, p in keys}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_lora_converts_to_kohya_and_back_exactly(arch, tmp_path):
    """diffusers → kohya: sdtune's merged weights of the kohya file equal PEFT's merged weights on every adapted
    layer (relative error < 1e-6: float32 rounding of W + ΔW), the file has SDXL's LDM / ``lora_te1_``/``lora_te2_``
    names, and the factors are copied bit for bit. kohya → diffusers: the pipeline's ``load_lora_weights`` takes
    every module (one PEFT layer each, no key left) and after ``fuse_lora`` the weights equal PEFT's again."""
    src, expected = _peft_lora(arch, tmp_path)
    assert file_format(src) == "diffusers"
    kohya = tmp_path / "kohya.safetensors"
    conv = convert_file(src, kohya, "kohya")
    assert conv.arch == arch and not conv.unmappable and len(conv.groups) == len(expected)
    assert file_format(kohya) == "kohya"
    sd = safetensors.torch.load_file(str(kohya))
    if arch == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in sd)
        assert {k.split("_text_model")[0] for k in sd if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    src_sd = safetensors.torch.load_file(str(src))
    assert {k: v for k, v in src_sd.items() if k.endswith("conv1.lora_A.weight")}  # convs are in the file
    for name, (c, p) in conv.paths.items():  # bit-exact factors
        down = next(src_sd[f"{c}.{p}.{s}.weight"] for s in ("lora_A", "lora.down", "lora_linear_layer.down")
                    if f"{c}.{p}.{s}.weight" in src_sd)
        assert torch.equal(sd[f"{name}.lora_down.weight"], down), name

    fresh = _small(arch)
    base = _weights(fresh, expected)
    with apply_file(fresh, arch, kohya):
        got = _weights(fresh, expected)
    for key, want in expected.items():
        assert rebuild.rel_error(got[key], want) < 1e-6, (key, rebuild.rel_error(got[key], want))
        assert rebuild.rel_error(base[key], want) > 1e-3, key

    back = tmp_path / "back.safetensors"
    convert_file(kohya, back, "diffusers")
    assert file_format(back) == "diffusers"
    fresh = _small(arch)
    pipe = _pipeline_class(arch)(**_pipeline_kwargs(arch), **fresh)
    pipe.load_lora_weights(str(back))
    n_layers = sum(1 for m in fresh.values() for n, _ in m.named_modules() if n.endswith("lora_A"))
    assert n_layers == len(expected)
    pipe.fuse_lora(components=list(fresh))
    pipe.unload_lora_weights()
    got = _weights(fresh, expected)
    for key, want in expected.items():
        assert rebuild.rel_error(got[key], want) < 1e-6, (key, rebuild.rel_error(got[key], want))


def _pipeline_kwargs(arch):
    common = dict(vae=None, tokenizer=None, scheduler=None)
    if arch == "sdxl":
        return dict(common, tokenizer_2=None)
    return dict(common, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_rslora_and_old_diffusers_spellings(tmp_path):
    """rsLoRA metadata (PEFT scale lora_alpha/√r) becomes kohya α = lora_alpha·√r, so that α/r keeps it; the older
    ``.lora.down``/``.lora.up`` spelling without metadata has scale 1, as diffusers loads it."""
    src, expected = _peft_lora("sd1", tmp_path, rslora=True)
    kohya = tmp_path / "rs.safetensors"
    convert_file(src, kohya, "kohya")
    fresh = _small("sd1")
    with apply_file(fresh, "sd1", kohya):
        got = _weights(fresh, expected)
    assert max(rebuild.rel_error(got[k], w) for k, w in expected.items()) < 1e-6

    w = fresh["unet"].get_submodule("down_blocks.0.attentions.0.proj_in").weight
    down, up = torch.randn(2, w.shape[1]), torch.randn(w.shape[0], 2)
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": down,
                                 "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": up}, str(old))
    assert file_format(old) == "diffusers"
    conv = read_any(old)
    group = conv.groups["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert torch.allclose(rebuild.group_delta(group), up @ down)


def test_unmappable_keys_are_reported_not_dropped(tmp_path):
    """A DiT ``transformer.`` prefix, a module the layout does not have and a DoRA magnitude are listed with a
    reason; without ``partial`` nothing is written, with it the rest is written and the file says what was left."""
    from sdtune.safefile import FormatError

    w = _small("sd1")["unet"].get_submodule("down_blocks.0.attentions.0.proj_in").weight
    sd = {f"unet.down_blocks.0.attentions.0.{m}.lora_{f}.weight": torch.randn(*s)
          for m in ("proj_in", "proj_out") for f, s in (("A", (2, w.shape[1])), ("B", (w.shape[0], 2)))}
    sd |= {"unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": torch.randn(w.shape[0]),
          "unet.no_such_block.0.lora_A.weight": torch.randn(2, 4),
          "unet.no_such_block.0.lora_B.weight": torch.randn(4, 2),
          "transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 4),
          "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(4, 2)}
    src = tmp_path / "mixed.safetensors"
    safetensors.torch.save_file(sd, str(src))
    out = tmp_path / "out.safetensors"
    with pytest.raises(FormatError, match="7 key"):
        convert_file(src, out, "kohya", arch="sd1")
    assert not out.exists()
    conv = convert_file(src, out, "kohya", arch="sd1", partial=True)
    assert set(conv.unmappable) == set(sd) - {k for k in sd if "proj_out.lora_" in k}
    assert "transformer" in conv.unmappable["transformer.blocks.0.attn.to_q.lora_A.weight"]
    assert "DoRA" in conv.unmappable["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"]
    with safetensors.safe_open(str(out), "pt") as f:
        note = json.loads(f.metadata()["ss_sdtune_convert"])
        assert set(f.keys()) == {f"lora_unet_down_blocks_0_attentions_0_proj_out.{k}"
                                 for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert len(note["left_out"]) == 7


def test_detect_format_and_cli_inspect(tmp_path, capsys):
    from sdtune.cli import main

    assert detect_format(["lora_unet_conv_in.lora_down.weight"]) == "kohya"
    assert detect_format(["unet.conv_in.lora_A.weight"]) == "diffusers"
    assert detect_format(["base_model.model.conv_in.lora_A.weight"]) == "peft"
    assert detect_format(["text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight"]) == "diffusers"
    src, _ = _peft_lora("sd1", tmp_path)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "format          diffusers" in text and "lora ×" in text
    out = tmp_path / "k.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--to", "kohya"]) == 0
    assert "diffusers file, SD1" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "format          kohya" in capsys.readouterr().out


def test_peft_file_round_trip(tmp_path):
    """kohya → PEFT (``base_model.model.…`` keys, the config in the header) → kohya gives the same tensors and α;
    a file with two components is refused as PEFT (one component per file)."""
    from sdtune.safefile import FormatError

    w = _small("sd1")["unet"].get_submodule("down_blocks.0.attentions.0.proj_out").weight
    src = tmp_path / "k.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_out"
    safetensors.torch.save_file({f"{name}.lora_down.weight": torch.randn(3, w.shape[1]),
                                 f"{name}.lora_up.weight": torch.randn(w.shape[0], 3),
                                 f"{name}.alpha": torch.tensor(1.5)}, str(src))
    peft, back = tmp_path / "p.safetensors", tmp_path / "b.safetensors"
    convert_file(src, peft, "peft", arch="sd1")
    assert file_format(peft) == "peft"
    convert_file(peft, back, "kohya", arch="sd1")
    a, b = safetensors.torch.load_file(str(src)), safetensors.torch.load_file(str(back))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    two, _ = _peft_lora("sd1", tmp_path)
    with pytest.raises(FormatError, match="one component"):
        convert_file(two, tmp_path / "x.safetensors", "peft")
