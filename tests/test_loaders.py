"""Exports loaded by other programs' loaders on real layouts, with real tensors.

Models: the embedded pipeline (``assets/tiny-sd``), and SD1.5 / SDXL U-Nets and text encoders with random weights
built by ``sdtune.archs.build_random(arch, small=True)``: the published block structure (block types, layers per
block, transformer depths, SDXL's text-time conditioning and its two text encoders, the second with projection)
with small widths, so that sdtune's names (SDXL: kohya's LDM ``input_blocks_…`` and ``lora_te1_``/``lora_te2_``)
are exactly those of the full-size models. Oracles: diffusers' ``load_lora_weights`` (its own kohya → diffusers
key conversion and PEFT), diffusers' single-file LDM → diffusers conversion, and lycoris-lora 4.1.3's modules.
"""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from helpers_adapters import perturb_all
from helpers_formats import lycoris_merge

from sdtune.adapters import AdapterSpec
from sdtune.formats import rebuild, save_kohya
from sdtune.inject import attach

PRESETS = ("attn", "resnet", "sample", "te")


def _small(arch: str, seed: int = 0):
    from sdtune.archs import build_random

    return build_random(arch, small=True, seed=seed).components()


def _attach(components, arch, rules):
    inj = attach(components, rules, arch)
    perturb_all(inj)
    return inj


def _merged_weights(inj) -> dict[str, torch.Tensor]:
    """sdtune's merged model: ``inj.merge()``, then each adapted layer's weight (kohya name -> W + ΔW)."""
    inj.merge()
    return {name: a.base.weight.detach().clone() for name, a in inj.adapters.items()}


def _n_peft_layers(module) -> int:
    return sum(1 for n, _ in module.named_modules() if n.endswith("lora_A"))


def _pipeline(arch, components):
    """A diffusers pipeline around bare components (enough for ``load_lora_weights`` and ``fuse_lora``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        return StableDiffusionXLPipeline(vae=None, tokenizer=None, tokenizer_2=None, scheduler=None, **components)
    return StableDiffusionPipeline(vae=None, tokenizer=None, scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **components)


# ------------------------------------------------------------------------------------------ names ↔ diffusers

def test_sdxl_ldm_names_equal_diffusers_single_file_conversion():
    """sdtune's diffusers → LDM map (``names.ldm_unet_path``) is the inverse of diffusers' own single-file
    conversion (``convert_ldm_unet_checkpoint``) for every parameter of the SDXL-layout U-Net: renaming the
    state dict to LDM names and converting it back gives the same keys and tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdtune.names import ldm_unet_path

    unet = _small("sdxl")["unet"]
    sd = unet.state_dict()
    ldm = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{ldm_unet_path(module, 'sdxl')}.{param}"] = value
    assert len(ldm) == len(sd)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- the whole embedded pipeline

def test_embedded_pipeline_loads_locon_export_in_diffusers(tmp_path):
    """U-Net (attn, resnet, sample; Tucker on the convs) + text encoder LoCon on the embedded model, exported
    with ``plain_locon`` (diffusers rejects ``lora_mid``) and loaded by ``pipe.load_lora_weights`` into a fresh
    embedded pipeline: every adapter becomes a PEFT layer, and 3 DPM-Solver steps from a fixed seed give the same
    latents as sdtune's merged pipeline (tolerance: relative L2 error < 1e-4 in float32; diffusers runs the
    unmerged W·x + s·B(A·x), sdtune the merged (W+ΔW)·x). The adapters move the latents by far more than that."""
    from sdtune.models import load

    ours = load()
    comps = ours.components()
    locon = AdapterSpec("locon", rank=4, alpha=2.0)
    tucker = AdapterSpec("locon", rank=4, alpha=3.0, tucker=True)
    inj = _attach(comps, ours.arch, [("attn", locon), ("resnet", tucker), ("sample", tucker), ("te", locon)])
    path = tmp_path / "embedded.safetensors"
    save_kohya(inj, path, dtype=torch.float32, plain_locon=True)
    keys = safetensors.torch.load_file(str(path))
    assert not any(".lora_mid." in k for k in keys)
    n_te = sum(1 for n in inj.adapters if n.startswith("lora_te_"))
    assert n_te == 6 * ours.pipeline.text_encoder.config.num_hidden_layers

    def run(pipe):
        with torch.no_grad():
            return pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    inj.merge()
    want = run(ours.pipeline)
    theirs = load()
    base = run(theirs.pipeline)
    theirs.pipeline.load_lora_weights(str(path))
    assert _n_peft_layers(theirs.pipeline.unet) == len(inj.adapters) - n_te
    assert _n_peft_layers(theirs.pipeline.text_encoder) == n_te
    got = run(theirs.pipeline)
    assert rebuild.rel_error(got, want) < 1e-4
    assert rebuild.rel_error(base, want) > 1e-2


# ------------------------------------------------------------------------- SD1.5 / SDXL layouts: LyCORIS

LYCORIS_SPECS = {
    "locon": dict(algorithm="locon", rank=4, alpha=2.0),
    "locon_tucker": dict(algorithm="locon", rank=4, alpha=3.0, tucker=True),
    "flora": dict(algorithm="flora", rank=4, scale=2.0),
    "dora_in": dict(algorithm="dora", rank=4, dora_axis="in"),
    "spectral": dict(algorithm="spectral", rank=2),
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", list(LYCORIS_SPECS))
def test_export_loads_in_lycoris_on_real_layouts(arch, algo, tmp_path):
    """Every U-Net preset and the text encoder(s), one algorithm: the export merged by LyCORIS 4.1.3 onto a fresh
    copy of the base model equals sdtune's merged weights layer by layer (relative error < 1e-5, float32), every
    key of the file is used, and no other parameter changes. LyCORIS finds a layer by its kohya name; the
    name -> layer map is ``names.name_map`` (SDXL: kohya's LDM names, the module paths of the LDM-layout U-Net
    that kohya's and LyCORIS's SDXL loaders walk; text encoders: the ``lora_te*_text_model_…`` template that
    kohya's CLIP has), checked against diffusers' own conversions in the other tests of this file."""
    from sdtune.names import name_map

    comps = _small(arch)
    spec = AdapterSpec(**LYCORIS_SPECS[algo])
    inj = _attach(comps, arch, [(p, spec) for p in PRESETS])
    path = tmp_path / f"{arch}-{algo}.safetensors"
    save_kohya(inj, path, dtype=torch.float32)
    expected = _merged_weights(inj)

    fresh = _small(arch)
    names = name_map(fresh, arch)
    before = {(c, k): v.clone() for c, m in fresh.items() for k, v in m.state_dict().items()}
    used, keys = lycoris_merge(path, {n: fresh[c].get_submodule(p) for n, (c, p) in names.items()})
    assert used == keys, f"keys LyCORIS did not use: {sorted(keys - used)[:5]}"
    adapted = {(names[n][0], f"{names[n][1]}.weight"): n for n in expected}
    assert len(adapted) == len(expected)
    for c, module in fresh.items():
        for k, v in module.state_dict().items():
            if (c, k) in adapted:
                err = rebuild.rel_error(v, expected[adapted[c, k]])
                assert err < 1e-5, (adapted[c, k], err)
            else:
                assert torch.equal(v, before[c, k]), (c, k)
    te_prefixes = {n.split("_text_model")[0] for n in expected if n.startswith("lora_te")}
    assert te_prefixes == ({"lora_te1", "lora_te2"} if arch == "sdxl" else {"lora_te"})
    for n, a in inj.adapters.items():  # ΔW ≠ 0 everywhere: the comparison could fail
        assert rebuild.rel_error(a.base.weight, a.original_weight()) > 1e-4, n


# ------------------------------------------------------------------------- SD1.5 / SDXL layouts: diffusers

@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_locon_export_loads_in_diffusers_on_real_layouts(arch, tmp_path):
    """LoCon on every U-Net preset and the text encoder(s), loaded by the pipeline class's ``load_lora_weights``
    (SDXL: ``StableDiffusionXLPipeline``, which maps kohya's LDM names with the U-Net's config) into fresh
    copies: every adapter becomes a PEFT layer in the right component, and the U-Net's and each text encoder's
    outputs equal sdtune's merged model's (relative L2 error < 1e-5, float32); the adapters change every output."""
    comps = _small(arch)
    spec = AdapterSpec("locon", rank=4, alpha=2.0)
    inj = _attach(comps, arch, [(p, spec) for p in PRESETS])
    path = tmp_path / f"{arch}.safetensors"
    save_kohya(inj, path, dtype=torch.float32)
    inj.merge()

    fresh = _small(arch)
    g = torch.Generator().manual_seed(0)
    te_dims = {c: m.config.hidden_size for c, m in fresh.items() if c != "unet"}
    ids = torch.randint(0, 1000, (1, 7), generator=g)
    ctx = torch.randn(1, 7, sum(te_dims.values()), generator=g)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = {}
    if arch == "sdxl":
        proj = fresh["text_encoder_2"].config.projection_dim
        cond = {"added_cond_kwargs": {"text_embeds": torch.randn(1, proj, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}

    def outputs(c):
        with torch.no_grad():
            out = {"unet": c["unet"](x, t, ctx, **cond).sample}
            for name in te_dims:
                o = c[name](ids)
                pooled = o.text_embeds if name == "text_encoder_2" else o.pooler_output
                out[name] = torch.cat([o.last_hidden_state.flatten(), pooled.flatten()])
        return out

    want, base = outputs(comps), outputs(fresh)
    _pipeline(arch, fresh).load_lora_weights(str(path))
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if arch == "sdxl" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    for c, m in fresh.items():
        assert _n_peft_layers(m) == sum(1 for n in inj.adapters if n.startswith(prefixes[c])) > 0, c
    got = outputs(fresh)
    for c in want:
        assert rebuild.rel_error(got[c], want[c]) < 1e-5, (c, rebuild.rel_error(got[c], want[c]))
        assert rebuild.rel_error(base[c], want[c]) > 1e-3, c


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_module_name_loads_in_diffusers_onto_its_layer(arch, tmp_path):
    """A file with a LoRA for every Linear/Conv2d sdtune can name (``names.name_map``: all U-Net layers incl.
    conv_in/conv_out, the time embedding, SDXL's add embedding (label_emb), down/upsamplers; the six template
    layers per text-encoder block), written by ``save_kohya`` from raw groups: the pipeline's
    ``load_lora_weights`` consumes every key (LOADER-FACTS: SDXL "with LDM names … diffusers map[s] every key"),
    and after ``fuse_lora`` each layer's weight is W + ΔW of its own group (relative error < 1e-5) while every other
    parameter is unchanged: a name mapped onto another layer of the same shape would fail here."""
    from sdtune.names import name_map

    fresh = _small(arch)
    names = name_map(fresh, arch)
    g = torch.Generator().manual_seed(1)
    groups, expected = {}, {}
    for name, (c, p) in names.items():
        w = fresh[c].get_submodule(p).weight.detach()
        down = torch.randn(2, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        groups[name] = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(1.5)}
        expected[c, f"{p}.weight"] = w + rebuild.effective_delta(groups[name], w)
    path = tmp_path / "all.safetensors"
    save_kohya(groups, path, arch=arch, dtype=torch.float32)
    fixed = ("lora_unet_label_emb_0_0", "lora_unet_time_embed_0", "lora_unet_input_blocks_0_0", "lora_unet_out_2") \
        if arch == "sdxl" else ("lora_unet_time_embedding_linear_1", "lora_unet_conv_in", "lora_unet_conv_out")
    assert set(fixed) <= set(groups)

    before = {(c, k): v.clone() for c, m in fresh.items() for k, v in m.state_dict().items()}
    pipe = _pipeline(arch, fresh)
    pipe.load_lora_weights(str(path))
    assert sum(_n_peft_layers(m) for m in fresh.values()) == len(names)
    pipe.fuse_lora(components=list(fresh))
    pipe.unload_lora_weights()
    for c, module in fresh.items():
        for k, v in module.state_dict().items():
            if (c, k) in expected:
                assert rebuild.rel_error(v, expected[c, k]) < 1e-5, (c, k, rebuild.rel_error(v, expected[c, k]))
            else:
                assert torch.equal(v, before[c, k]), (c, k)
    assert len(expected) == len(names)


def test_diffusers_style_sdxl_names_lose_add_embedding_in_diffusers(tmp_path):
    """Why SDXL files carry LDM names (LOADER-FACTS): under diffusers-style names diffusers' kohya converter
    collapses ``add_embedding_linear_1``/``_2`` into one non-existent module and loads neither (the other layers
    load); sdtune names those two layers ``lora_unet_label_emb_0_0``/``_0_2``, which load (test above)."""
    from sdtune.names import kohya_name

    fresh = _small("sdxl")
    paths = ["add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1", "conv_in",
             "down_blocks.1.attentions.0.proj_in", "up_blocks.0.upsamplers.0.conv"]
    assert [kohya_name("unet", p, "sdxl") for p in paths[:2]] == ["lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"]
    sd = {}
    for p in paths:
        w = fresh["unet"].get_submodule(p).weight
        name = "lora_unet_" + p.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(2, *w.shape[1:])
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []))
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "diffusers-style.safetensors"
    safetensors.torch.save_file(sd, str(path))
    _pipeline("sdxl", fresh).load_lora_weights(str(path))
    loaded = {n.removesuffix(".lora_A") for n, _ in fresh["unet"].named_modules() if n.endswith("lora_A")}
    assert loaded == set(paths[2:])
