"""A1111/kohya adapter files: rebuild formulas, writer, reader, loaders' cross-checks, bad input.

Oracles: lycoris-lora 4.1.3's own modules and loader, diffusers' ``load_lora_weights``, kohya's naming rule,
and the standard formulas written out in float64 here. Models are tiny diffusers/transformers models with the
real SD1 layout (tests/helpers_formats.py), or the real SD1.5/SDXL architectures built on the meta device.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from helpers_adapters import perturb, perturb_all
from helpers_formats import layers, lycoris_merge, rand, tiny_components, tiny_unet
from torch import nn

from sdtune.formats import FormatError, read_kohya, rebuild, save_kohya
from sdtune.formats import metadata as md_
from sdtune.apply import AppliedFile, apply_file, load

# ------------------------------------------------------------------------------------------------ rebuild


def _lyco_delta(cls, group, weight_shape):
    """ΔW as LyCORIS 4.1.3's module class rebuilds it from a state dict (the oracle for the formulas)."""
    layer = nn.Linear(weight_shape[1], weight_shape[0], bias=False) if len(weight_shape) == 2 else \
        nn.Conv2d(weight_shape[1], weight_shape[0], weight_shape[2:], bias=False)
    from lycoris.modules import get_module, make_module

    sd = {f"m.{k}": v for k, v in group.items()}
    found, params = get_module(sd, "m")
    assert found is cls, (found, cls)
    module = make_module(found, params, "m", layer)
    return module.get_diff_weight(1.0, weight_shape)[0]


def _handmade_groups():
    """(name, group, weight shape, lycoris class) covering LoRA, LoCon, Tucker, LoHa, LoKr, full diff."""
    from lycoris.modules import FullModule, LoConModule, LohaModule, LokrModule

    r = 3
    a = torch.tensor(2.0)
    return [
        ("lora_linear", {"lora_down.weight": rand(r, 20), "lora_up.weight": rand(12, r), "alpha": a}, (12, 20),
         LoConModule),
        ("locon_3x3", {"lora_down.weight": rand(r, 6, 3, 3), "lora_up.weight": rand(8, r, 1, 1), "alpha": a},
         (8, 6, 3, 3), LoConModule),
        ("tucker_3x3", {"lora_down.weight": rand(r, 6, 1, 1), "lora_mid.weight": rand(r, r, 3, 3),
                        "lora_up.weight": rand(8, r, 1, 1), "alpha": a}, (8, 6, 3, 3), LoConModule),
        ("loha_linear", {"hada_w1_a": rand(12, r), "hada_w1_b": rand(r, 20), "hada_w2_a": rand(12, r),
                         "hada_w2_b": rand(r, 20), "alpha": a}, (12, 20), LohaModule),
        ("loha_conv", {"hada_w1_a": rand(8, r), "hada_w1_b": rand(r, 54), "hada_w2_a": rand(8, r),
                       "hada_w2_b": rand(r, 54), "alpha": a}, (8, 6, 3, 3), LohaModule),
        ("loha_tucker", {"hada_w1_a": rand(r, 8), "hada_w1_b": rand(r, 6), "hada_t1": rand(r, r, 3, 3),
                         "hada_w2_a": rand(r, 8), "hada_w2_b": rand(r, 6), "hada_t2": rand(r, r, 3, 3),
                         "alpha": a}, (8, 6, 3, 3), LohaModule),
        ("lokr_full", {"lokr_w1": rand(3, 4), "lokr_w2": rand(4, 5), "alpha": a}, (12, 20), LokrModule),
        # LoKr shapes follow LyCORIS's own factorisation so that its loader keeps the factored layout
        ("lokr_lowrank", {"lokr_w1": rand(8, 8), "lokr_w2_a": rand(8, 2), "lokr_w2_b": rand(2, 8), "alpha": a},
         (64, 64), LokrModule),
        ("lokr_conv", {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(4, 1), "lokr_w2_b": rand(1, 36),
                       "alpha": a}, (16, 16, 3, 3), LokrModule),
        ("lokr_tucker", {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(1, 4), "lokr_w2_b": rand(1, 4),
                         "lokr_t2": rand(1, 1, 3, 3), "alpha": a}, (16, 16, 3, 3), None),  # LyCORIS's loader
        # reads the rank of a Tucker LoKr from lokr_w2_a.shape[1] (the output factor), so it cannot be the oracle
        ("full", {"diff": rand(12, 20)}, (12, 20), FullModule),
    ]


def _standard_delta(name, g):
    """The textbook formulas, written out independently in float64."""
    g = {k: v.double() for k, v in g.items()}
    alpha = g["alpha"].item() if "alpha" in g else None
    if name == "lora_linear":
        return alpha / 3 * g["lora_up.weight"] @ g["lora_down.weight"]
    if name == "locon_3x3":
        return alpha / 3 * torch.einsum("or,rikl->oikl", g["lora_up.weight"][:, :, 0, 0], g["lora_down.weight"])
    if name == "tucker_3x3":
        return alpha / 3 * torch.einsum("om,mnkl,ni->oikl", g["lora_up.weight"][:, :, 0, 0], g["lora_mid.weight"],
                                        g["lora_down.weight"][:, :, 0, 0])
    if name in ("loha_linear", "loha_conv"):
        d = (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"]) * alpha / 3
        return d if name == "loha_linear" else d.reshape(8, 6, 3, 3)
    if name == "loha_tucker":
        f1 = torch.einsum("abkl,ao,bi->oikl", g["hada_t1"], g["hada_w1_a"], g["hada_w1_b"])
        f2 = torch.einsum("abkl,ao,bi->oikl", g["hada_t2"], g["hada_w2_a"], g["hada_w2_b"])
        return f1 * f2 * alpha / 3
    if name == "lokr_full":  # both sides full: scale 1 whatever alpha says
        return torch.kron(g["lokr_w1"], g["lokr_w2"])
    if name == "lokr_lowrank":
        return torch.kron(g["lokr_w1"], g["lokr_w2_a"] @ g["lokr_w2_b"]) * alpha / 2
    if name == "lokr_conv":
        # LyCORIS stores a conv w2_b flattened (r, in₂·kh·kw): kron of the matrices, then reshape
        return torch.kron(g["lokr_w1"], g["lokr_w2_a"] @ g["lokr_w2_b"]).reshape(16, 16, 3, 3) * alpha / 1
    if name == "lokr_tucker":
        w2 = torch.einsum("abkl,ao,bi->oikl", g["lokr_t2"], g["lokr_w2_a"], g["lokr_w2_b"])
        return torch.kron(g["lokr_w1"][:, :, None, None], w2) * alpha / 1
    return g["diff"]


def test_rebuild_matches_standard_formulas_and_lycoris():
    torch.manual_seed(0)
    for name, group, shape, cls in _handmade_groups():
        got = rebuild.group_delta(group, shape, torch.float64)
        want = _standard_delta(name, group).reshape(shape)
        assert rebuild.rel_error(got, want) < 1e-12, name
        # LyCORIS 4.1.3's LoHa and LoKr modules multiply by α/r twice (get_weight and get_diff_weight both
        # scale); A1111 and ComfyUI scale once. So the factor products are compared at α = r (scale 1).
        if cls is None:
            continue
        r = rebuild.rank(group)
        unit = dict(group, alpha=torch.tensor(float(r))) if r is not None and "alpha" in group else group
        lyco = _lyco_delta(cls, unit, shape)
        assert rebuild.rel_error(got.float() / rebuild.scale(group), lyco) < 1e-5, name
        assert rebuild.delta_shape(group)[0] == shape[0] and rebuild.fits(rebuild.delta_shape(group), shape)


def test_dora_input_axis_matches_a1111_formula_and_lycoris():
    """A1111: W' = dora_scale·(W+ΔW)/‖W+ΔW‖ per input channel, then multiplier·(W'−W).
    Oracle: LyCORIS's functional ``apply_dora_scale`` (input axis) and its module with ``wd_on_out=False``."""
    from lycoris.functional.general import apply_dora_scale
    from lycoris.modules import LoConModule

    torch.manual_seed(0)
    for shape in [(12, 20), (8, 6, 3, 3)]:
        w = rand(*shape)
        conv = len(shape) == 4
        down = rand(3, *shape[1:]) if conv else rand(3, 20)
        up = rand(shape[0], 3, 1, 1) if conv else rand(shape[0], 3)
        m = (rand(1, shape[1], *([1, 1] if conv else [])).abs() + 0.5)
        g = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.5), "dora_scale": m}
        got = rebuild.effective_delta(g, w, multiplier=0.7, dtype=torch.float64)
        dw = rebuild.group_delta(g, shape, torch.float64)
        want = apply_dora_scale(w.double(), dw, m.double(), 0.7) - w.double()
        assert rebuild.rel_error(got, want) < 1e-10
        layer = nn.Conv2d(shape[1], shape[0], 3, bias=False) if conv else nn.Linear(20, 12, bias=False)
        layer.weight.data.copy_(w)
        lyco = LoConModule("m", layer, 1.0, 3, 1.5, weight_decompose=True, wd_on_out=False)
        lyco.lora_down.weight.data.copy_(down)
        lyco.lora_up.weight.data.copy_(up)
        lyco.dora_scale.data.copy_(m)
        merged, _ = lyco.get_merged_weight(1.0, shape)
        assert rebuild.rel_error(rebuild.effective_delta(g, w) + w, merged) < 1e-5


# ----------------------------------------------------------------------------- export ↔ LyCORIS / diffusers

SPECS = {
    "locon": dict(algorithm="locon", rank=4, alpha=2.0),
    "locon_tucker_rslora": dict(algorithm="locon", rank=4, alpha=3.0, tucker=True, rslora=True),
    "flora": dict(algorithm="flora", rank=4, scale=2.0),
    "flora_rect": dict(algorithm="flora", rank=4, flora_ranks=(4, 2, 2, 2)),  # rectangular core -> padded
    # (on the 3×3 sample convs only: per-mode ranks are per layer kind)
    "dora_in": dict(algorithm="dora", rank=4, dora_axis="in"),
    "dora_in_flora": dict(algorithm="dora", rank=4, dora_base="flora", dora_axis="in"),
    "dora_out": dict(algorithm="dora", rank=4, dora_axis="out"),  # exported as a full diff
    "spectral": dict(algorithm="spectral", rank=2),
    "spectral_rot": dict(algorithm="spectral", rank=3, spectral_mode="rotational", slot=1),
}


def _attach_unet(spec_kw, tmp_path, seed=0, presets=("attn", "resnet", "sample")):
    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach

    unet = tiny_unet(seed)
    spec = AdapterSpec(**spec_kw)
    rules = []
    for preset in presets:
        kw = dict(spec_kw)
        if "flora_ranks" in kw and preset != "sample":
            continue
        rules.append((preset, AdapterSpec(**kw) if kw != spec_kw else spec))
    inj = attach({"unet": unet}, rules, "sd1", svd_cache_dir=tmp_path / "svd")
    perturb_all(inj)
    return unet, inj


@pytest.mark.parametrize("algo", list(SPECS))
def test_export_loads_in_lycoris_to_the_same_merged_weights(algo, tmp_path):
    unet, inj = _attach_unet(SPECS[algo], tmp_path)
    with torch.no_grad():
        expected = {name: a.effective_weight().detach().clone() for name, a in inj.adapters.items()}
    path = tmp_path / "a.safetensors"
    save_kohya(inj, path, dtype=torch.float32)
    fresh = tiny_unet(0)
    before = {n: m.weight.detach().clone() for n, m in layers(fresh).items()}
    used, keys = lycoris_merge(path, {"lora_unet_" + n.replace(".", "_"): m for n, m in fresh.named_modules()})
    assert used == keys, f"keys LyCORIS did not use: {sorted(keys - used)[:5]}"
    for path_, layer in layers(fresh).items():
        name = "lora_unet_" + path_.replace(".", "_")
        if name in expected:
            err = rebuild.rel_error(layer.weight, expected[name])
            assert err < 1e-5, (name, err)
        else:
            assert torch.equal(layer.weight, before[path_]), path_
    assert len(expected) >= (2 if "flora_ranks" in SPECS[algo] else 60)


def test_locon_export_loads_in_diffusers(tmp_path):
    """diffusers' kohya converter + PEFT: the U-Net's output equals sdtune's merged U-Net (rel < 1e-4, fp32).
    The Tucker form goes through ``plain_locon`` (diffusers rejects lora_mid)."""
    from diffusers import StableDiffusionPipeline

    unet, inj = _attach_unet(dict(algorithm="locon", rank=4, alpha=2.0, tucker=True), tmp_path)
    path = tmp_path / "plain.safetensors"
    save_kohya(inj, path, dtype=torch.float32, plain_locon=True)
    sd = safetensors.torch.load_file(str(path))
    assert not any("lora_mid" in k for k in sd)
    torch.manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    with torch.no_grad():
        inj.merge()
        want = unet(x, t, ctx).sample
    fresh = tiny_unet(0)
    with torch.no_grad():
        base = fresh(x, t, ctx).sample
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=fresh)
    n_lora = sum(1 for n, _ in fresh.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(inj.adapters)
    with torch.no_grad():
        got = fresh(x, t, ctx).sample
    assert rebuild.rel_error(got, want) < 1e-4
    assert rebuild.rel_error(base, want) > 1e-3  # the adapter does change the output


# ------------------------------------------------------------------------------------- names and metadata

def test_sd15_key_set_equals_kohya_names():
    """Key set of an SD1.5 (meta-built) U-Net + TE export = kohya sd-scripts' names for the same modules.
    kohya's rule (networks/lora.py): every Linear/Conv2d child of Transformer2DModel, ResnetBlock2D,
    Downsample2D, Upsample2D (with conv_dim) as "lora_unet_" + path with . → _, and for the text encoder
    "lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|…|mlp_fc2>"."""
    from sdtune.adapters import AdapterSpec
    from sdtune.archs import build_random
    from sdtune.formats import export_tensors
    from sdtune.inject import attach

    model = build_random("sd1", device="meta")
    comps = model.components()
    expected = set()
    for path, mod in comps["unet"].named_modules():
        if type(mod).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            for child, sub in mod.named_modules():
                if isinstance(sub, (nn.Linear, nn.Conv2d)) and child:
                    expected.add(f"lora_unet_{path}.{child}".replace(".", "_"))
    for i in range(12):
        for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                     "mlp_fc2"):
            expected.add(f"lora_te_text_model_encoder_layers_{i}_{part}")
    spec = AdapterSpec("locon", rank=4)
    inj = attach(comps, [(p, spec) for p in ("attn", "resnet", "sample", "te")], "sd1")
    tensors, _ = export_tensors(inj, verify=False)
    names = {k.split(".")[0] for k in tensors}
    assert names == expected
    assert {k.split(".", 1)[1] for k in tensors} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(tensors[f"{n}.alpha"].dim() == 0 for n in names)


def _raw_file(path, groups, metadata=None):
    safetensors.torch.save_file({f"{n}.{k}": v.clone() for n, g in groups.items() for k, v in g.items()},
                                str(path), metadata=metadata)


def test_hashes_and_metadata_of_written_file(tmp_path):
    groups = {"lora_unet_conv_in": {"lora_down.weight": rand(8, 4, 3, 3, seed=1),
                                    "lora_up.weight": rand(32, 8, 1, 1, seed=2), "alpha": torch.tensor(4.0)},
              "lora_unet_big": {"diff": rand(700, 500, seed=3)}}  # > 1 MiB so the legacy window is data
    path = tmp_path / "h.safetensors"
    md = save_kohya(groups, path, arch="sd1", dtype=torch.float32, resolution=512, comment="test run",
                    metadata={"ss_clip_skip": "2"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    with safetensors.safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    assert stored == md
    assert stored["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert stored["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert stored["ss_base_model_version"] == "sd_v1" and stored["ss_v2"] == "False"
    assert stored["ss_resolution"] == "(512, 512)" and stored["ss_training_comment"] == "test run"
    assert stored["ss_network_module"] == "lycoris.kohya" and stored["ss_clip_skip"] == "2"
    assert stored["ss_network_dim"] == "8" and stored["ss_network_alpha"] == "4"
    assert stored["sdtune_format_version"] == md_.FORMAT_VERSION
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_write_is_atomic(tmp_path, monkeypatch):
    import os

    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old contents")
    group = {"lora_unet_x": {"lora_down.weight": rand(2, 4), "lora_up.weight": rand(3, 2)}}

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_kohya(group, path, arch="sd1")
    assert path.read_bytes() == b"old contents"
    assert list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    save_kohya(group, path, arch="sd1")
    assert float(safetensors.torch.load_file(str(path))["lora_unet_x.alpha"]) == 2.0  # α = r when absent


def test_alpha_carries_the_true_scale(tmp_path):
    """rsLoRA, FLoRA's s and padded/folded Tucker cores: α/lora_down.shape[0] is the applied scale, and α is
    float32 even in an fp16 file."""
    unet, inj = _attach_unet(dict(algorithm="locon", rank=4, alpha=3.0, rslora=True, tucker=True), tmp_path,
                             presets=("resnet",))
    for plain in (False, True):
        path = tmp_path / f"p{plain}.safetensors"
        save_kohya(inj, path, dtype=torch.float16, plain_locon=plain)
        sd = safetensors.torch.load_file(str(path))
        for name, adapter in inj.adapters.items():
            assert sd[f"{name}.alpha"].dtype == torch.float32
            assert (f"{name}.lora_mid.weight" in sd) == (not plain and adapter.info.spatial)
            g = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
            got = rebuild.group_delta(g, tuple(adapter.base.weight.shape))
            assert rebuild.rel_error(got, adapter.delta_weight().detach()) < 2e-3  # fp16 factors


# ------------------------------------------------------------------------------------------------ reading

_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"


def _foreign_groups():
    """A file as kohya/LyCORIS write them for the tiny model: LoHa, LoKr, full diff, input-axis DoRA, a text
    encoder LoRA, and kohya's quirk of time_emb_proj / 1×1 conv_shortcut modules without any 3×3 conv."""
    a = torch.tensor(2.0)
    return {
        f"{_ATTN}_to_q": {"hada_w1_a": rand(32, 2, seed=1), "hada_w1_b": rand(2, 32, seed=2),
                          "hada_w2_a": rand(32, 2, seed=3), "hada_w2_b": rand(2, 32, seed=4), "alpha": a},
        f"{_ATTN}_to_k": {"lora_down.weight": rand(2, 32, seed=5), "lora_up.weight": rand(32, 2, seed=6),
                          "alpha": a, "dora_scale": rand(1, 32, seed=7).abs() + 1},
        f"{_ATTN}_to_v": {"lokr_w1": rand(4, 4, seed=8), "lokr_w2_a": rand(8, 1, seed=9),
                          "lokr_w2_b": rand(1, 8, seed=10), "alpha": torch.tensor(1.0)},
        "lora_unet_down_blocks_0_attentions_0_proj_in": {"diff": rand(32, 32, 1, 1, seed=11) * 0.01},
        "lora_unet_down_blocks_1_resnets_0_time_emb_proj": {"lora_down.weight": rand(2, 128, seed=12),
                                                            "lora_up.weight": rand(64, 2, seed=13), "alpha": a},
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": {"lora_down.weight": rand(2, 32, 1, 1, seed=14),
                                                            "lora_up.weight": rand(64, 2, 1, 1, seed=15),
                                                            "alpha": a},
        "lora_te_text_model_encoder_layers_1_mlp_fc1": {"lora_down.weight": rand(2, 32, seed=16),
                                                        "lora_up.weight": rand(37, 2, seed=17), "alpha": a},
    }


def test_reader_rebuilds_foreign_file_and_applies_it_exactly(tmp_path):
    comps = tiny_components()
    path = tmp_path / "foreign.safetensors"
    groups = _foreign_groups()
    _raw_file(path, groups)
    f = read_kohya(path, comps)
    assert set(f.modules) == set(groups) and not f.unmapped and not f.unknown_keys
    assert {m.algorithm for m in f.modules.values()} == {"loha", "lora+dora", "lokr", "full", "lora"}
    lookup = {n: (m.component, m.module_path) for n, m in f.modules.items()}
    assert lookup[f"{_ATTN}_to_q"] == ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert lookup["lora_te_text_model_encoder_layers_1_mlp_fc1"] == ("text_encoder", "text_model.encoder.layers.1.mlp.fc1") \
        or lookup["lora_te_text_model_encoder_layers_1_mlp_fc1"] == ("text_encoder", "encoder.layers.1.mlp.fc1")
    originals = {n: comps[c].get_submodule(p).weight.detach().clone() for n, (c, p) in lookup.items()}
    # The standard formulas, float64, at strength 0.7 (DoRA: W + 0.7·(W′ − W) with the input-axis norm).
    want = {}
    for name, g in groups.items():
        w = originals[name].double()
        g64 = {k: v.double() for k, v in g.items()}
        if "hada_w1_a" in g:
            d = (g64["hada_w1_a"] @ g64["hada_w1_b"]) * (g64["hada_w2_a"] @ g64["hada_w2_b"])
        elif "lokr_w1" in g:
            d = torch.kron(g64["lokr_w1"], g64["lokr_w2_a"] @ g64["lokr_w2_b"])
        elif "diff" in g:
            d = g64["diff"].reshape(w.shape)
        else:
            up, down = g64["lora_up.weight"], g64["lora_down.weight"]
            d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
        if "alpha" in g:
            d = d * g["alpha"].item() / (g64.get("lora_down.weight", g64.get("hada_w1_b", g64.get("lokr_w2_b"))).shape[0])
        if "dora_scale" in g:
            merged = w + d
            d = g64["dora_scale"] * merged / merged.norm(dim=0, keepdim=True) - w
        want[name] = w + 0.7 * d
    applied = AppliedFile(comps, load(path, comps), weight=0.7).apply()
    for name, (c, p) in lookup.items():
        got = comps[c].get_submodule(p).weight
        assert rebuild.rel_error(got, want[name]) < 1e-6, name
    applied.remove()
    for name, (c, p) in lookup.items():
        assert torch.equal(comps[c].get_submodule(p).weight, originals[name]), name


def test_applied_files_must_be_removed_in_reverse_order(tmp_path):
    comps = tiny_components()
    path = tmp_path / "f.safetensors"
    _raw_file(path, _foreign_groups())
    first = apply_file(comps, "sd1", path, 1.0)
    second = apply_file(comps, "sd1", path, 0.5)
    with pytest.raises(RuntimeError, match="reverse order"):
        first.remove()
    second.remove()
    first.remove()
    with apply_file(comps, "sd1", path, 1.0):
        pass


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_files_give_one_clear_error_each(tmp_path):
    comps = tiny_components()
    good = tmp_path / "good.safetensors"
    _raw_file(good, _foreign_groups())
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-100])
    with pytest.raises(FormatError, match="truncated"):
        read_kohya(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a safetensors file at all, just some text")
    with pytest.raises(FormatError, match="not a safetensors file"):
        read_kohya(text)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="not a safetensors file"):
        read_kohya(empty)

    ckpt = tmp_path / "model.ckpt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    with pytest.raises(FormatError, match="pickle"):
        read_kohya(ckpt)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(FormatError, match="never unpickles"):
        read_kohya(disguised)

    sdxl = tmp_path / "sdxl.safetensors"
    _raw_file(sdxl, {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
                     {"lora_down.weight": rand(2, 640), "lora_up.weight": rand(640, 2), "alpha": torch.tensor(1.)},
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj":
                     {"lora_down.weight": rand(2, 1280), "lora_up.weight": rand(1280, 2)}})
    with pytest.raises(FormatError, match="for SDXL"):
        read_kohya(sdxl, comps)
    tagged = tmp_path / "tagged.safetensors"
    _raw_file(tagged, {f"{_ATTN}_to_q": {"lora_down.weight": rand(2, 32), "lora_up.weight": rand(32, 2)}},
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(FormatError, match="for SDXL"):
        read_kohya(tagged, comps)

    mismatch = tmp_path / "mismatch.safetensors"
    _raw_file(mismatch, {f"{_ATTN}_to_q": {"lora_down.weight": rand(2, 48), "lora_up.weight": rand(32, 2)},
                         f"{_ATTN}_to_k": {"lora_down.weight": rand(2, 32), "lora_up.weight": rand(16, 2)}})
    with pytest.raises(FormatError, match=r"2 module\(s\) do not fit") as e:
        read_kohya(mismatch, comps)
    assert "to_q" in str(e.value) and "to_k" in str(e.value)

    stray = tmp_path / "stray.safetensors"
    groups = dict(_foreign_groups(), lora_unet_no_such_layer={"lora_down.weight": rand(2, 4),
                                                              "lora_up.weight": rand(4, 2)})
    _raw_file(stray, {**groups, "bundle_emb": {"string_to_param": rand(1, 32)}})
    with pytest.raises(FormatError, match="no matching layer") as e:
        read_kohya(stray, comps)
    assert "lora_unet_no_such_layer" in str(e.value) and "bundle_emb.string_to_param" in str(e.value)
    with pytest.warns(UserWarning, match="lora_unet_no_such_layer"):
        loose = read_kohya(stray, comps, strict=False)
    assert loose.unmapped == ["lora_unet_no_such_layer"] and loose.unknown_keys == ["bundle_emb.string_to_param"]

    malformed = tmp_path / "malformed.safetensors"
    _raw_file(malformed, {f"{_ATTN}_to_q": {"lora_up.weight": rand(32, 2), "alpha": torch.tensor(1.)}})
    with pytest.raises(FormatError, match="without"):
        read_kohya(malformed)
    peft = tmp_path / "peft.safetensors"
    safetensors.torch.save_file({"unet.x.lora_A.weight": rand(2, 4)}, str(peft))
    with pytest.raises(FormatError, match="diffusers/PEFT"):
        read_kohya(peft)


# -------------------------------------------------------------------------------------- native round trip

def test_native_reload_gives_identical_adapters(tmp_path):
    from sdtune.adapters import AdapterSpec
    from sdtune.formats import load_native
    from sdtune.inject import attach

    comps = tiny_components()
    rules = [("attn", AdapterSpec("locon", rank=4, alpha=2.0)), ("te", AdapterSpec("locon", rank=2)),
             ("resnet", AdapterSpec("dora", rank=2, tucker=True))]
    inj = attach(comps, rules, "sd1")
    for a in inj.adapters.values():
        perturb(a, seed=len(a.kohya_name), size=0.1, relative=True)
    path = tmp_path / "rt.safetensors"
    save_kohya(inj, path, dtype=torch.float32)
    fresh = tiny_components()
    inj2 = load_native(path, fresh)
    assert set(inj2.adapters) == set(inj.adapters)
    s1, s2 = inj.state_dict(), inj2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert rebuild.rel_error(s2[k], s1[k]) < 1e-6, k  # the same state: training continues from it

    # Folded forms (FLoRA, Spectral) reload through the native sidecar, exactly.
    comps3 = tiny_components()
    inj3 = attach(comps3, [("attn", AdapterSpec("flora", rank=4)), ("sample", AdapterSpec("spectral", rank=2))],
                  "sd1", svd_cache_dir=tmp_path / "svd")
    for a in inj3.adapters.values():
        perturb(a, seed=len(a.kohya_name), size=0.1, relative=True)
    folded = tmp_path / "folded.safetensors"
    save_kohya(inj3, folded, dtype=torch.float16)
    with pytest.raises(FormatError, match="sidecar"):
        load_native(folded, tiny_components())
    save_kohya(inj3, folded, dtype=torch.float16, native_sidecar=True)
    inj4 = load_native(folded, tiny_components(), svd_cache_dir=tmp_path / "svd")
    assert all(torch.equal(inj4.state_dict()[k], v) for k, v in inj3.state_dict().items())


def test_inspect_reports_what_is_in_the_file(tmp_path):
    from sdtune.inspect import format_inspection, inspect_file

    path = tmp_path / "f.safetensors"
    groups = dict(_foreign_groups(), lora_unet_no_such_layer={"lora_down.weight": rand(2, 4),
                                                              "lora_up.weight": rand(4, 2)})
    save_kohya(groups, path, arch="sd1", dtype=torch.float16)
    info = inspect_file(path, tiny_components())
    json.dumps(info)
    assert info["arch"] == "sd1" and info["base_model_version"] == "sd_v1"
    assert info["modules"] == 8 and info["unmapped"] == ["lora_unet_no_such_layer"]
    assert info["algorithms"]["lora"] == 4 and info["algorithms"]["loha"] == 1
    assert info["blocks"]["unet.down_blocks.0"] == 4 and info["blocks"]["te.layers.1"] == 1
    assert info["hashes"]["ok"] and info["num_params"] == sum(
        t.numel() for g in groups.values() for k, t in g.items() if k != "alpha")
    text = format_inspection(info)
    assert "lora_unet_no_such_layer" in text and "sd1" in text


def test_sdxl_export_names_and_detection():
    """SDXL (meta-built, nothing allocated): kohya's LDM-style U-Net names and lora_te1/lora_te2, and a file
    with those names (no metadata) is recognised as SDXL and refused on the SD1.5 architecture."""
    from sdtune.adapters import AdapterSpec
    from sdtune.archs import build_random
    from sdtune.formats import detect_arch, export_tensors
    from sdtune.inject import attach

    comps = build_random("sdxl", device="meta").components()
    inj = attach(comps, [("attn", AdapterSpec("locon", rank=4)), ("sample", AdapterSpec("locon", rank=4)),
                         ("te", AdapterSpec("locon", rank=4))], "sdxl")
    tensors, _ = export_tensors(inj, verify=False)
    names = {k.split(".")[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_proj_in" in names and "lora_unet_input_blocks_3_0_op" in names
    assert "lora_unet_output_blocks_2_2_conv" in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    assert {n.split("_text_model")[0] for n in names if n.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    groups = {}
    for key, value in tensors.items():
        name, _, sub = key.partition(".")
        groups.setdefault(name, {})[sub] = value
    assert detect_arch(groups, {})[0] == "sdxl"
    renamed = {n.replace("input_blocks_4_1", "down_blocks_1_attentions_0"): g for n, g in groups.items()
               if n.endswith("attn2_to_k") and "input_blocks_4_1" in n}
    arch, why = detect_arch(renamed, {})  # diffusers-style names: the 2048-wide text context gives it away
    assert arch == "sdxl" and "2048" in why
