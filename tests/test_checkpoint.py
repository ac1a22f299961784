"""Merged single-file checkpoints: the original (LDM/SGM) layout A1111 loads, read back through diffusers'
own single-file loader (``sdtune.models.load(file, config=…)``), with adapters baked in at a weight."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdtune import archs
from sdtune.adapters import AdapterSpec
from sdtune.formats.checkpoint import (
    components_to_ldm,
    save_merged_checkpoint,
    to_ldm_state_dict,
)
from sdtune.formats.kohya import save_kohya
from sdtune.inject import attach
from sdtune.models import EMBEDDED, ModelLoadError, load

PARTS = ("unet", "vae", "text_encoder")

# SD1.5's published VAE (AutoencoderKL of runwayml/stable-diffusion-v1-5, also used by SD2 and, in shape, SDXL).
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)


def _weights(pipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {p: {k: v.detach().clone() for k, v in getattr(pipeline, p).state_dict().items()} for p in PARTS}


def _assert_same(got, want, changed: dict[str, dict[str, torch.Tensor]] | None = None, tol=1e-6):
    """Every tensor equal (exactly, or to ``tol`` relative where ``changed`` gives the expected value)."""
    for part in PARTS:
        assert got[part].keys() == want[part].keys(), part
        for key, value in got[part].items():
            expected = (changed or {}).get(part, {}).get(key)
            if expected is None:
                assert torch.equal(value, want[part][key]), f"{part}.{key} changed"
            else:
                err = (value.double() - expected.double()).norm() / expected.double().norm()
                assert err < tol, f"{part}.{key}: relative error {err:.2e}"


def test_round_trip_through_diffusers_single_file_loader(tiny_model, tmp_path):
    ldm = to_ldm_state_dict(tiny_model)
    assert len(ldm) == sum(len(getattr(tiny_model.pipeline, p).state_dict()) for p in PARTS)
    info = save_merged_checkpoint(tiny_model, [], tmp_path / "base.safetensors", dtype="fp32")
    assert info["tensors"] == len(ldm) and info["merged_layers"] == 0
    back = load(tmp_path / "base.safetensors", config=EMBEDDED)
    assert back.arch == "sd1"
    _assert_same(_weights(back.pipeline), _weights(tiny_model.pipeline))
    # fp16 export: same keys, half the bytes
    save_merged_checkpoint(tiny_model, [], tmp_path / "half.safetensors")
    half = load_file(str(tmp_path / "half.safetensors"))
    assert half.keys() == ldm.keys() and all(v.dtype == torch.float16 for v in half.values())


def _trained_injection(model):
    """LoCon on attention and resnets, DoRA (input axis) on the text encoder, all factors perturbed."""
    inj = attach(model.components(), [("attn", AdapterSpec("locon", rank=4)), ("resnet", AdapterSpec("locon", rank=4)),
                                      ("te", AdapterSpec("dora", rank=4))], model.arch)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in inj.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return inj


def test_merged_checkpoint_equals_base_plus_weighted_delta(fresh_tiny_model, tmp_path):
    model, w = fresh_tiny_model, 0.7
    base = _weights(model.pipeline)
    inj = _trained_injection(model)
    adapter_file = tmp_path / "adapter.safetensors"
    save_kohya(inj, adapter_file, dtype=torch.float32)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, adapter in inj.adapters.items():
            place = inj.places[name]
            W = adapter.original_weight().double()
            expected.setdefault(place.component, {})[f"{place.path}.weight"] = \
                W + w * (adapter.effective_weight().double() - W)
    assert len(expected["unet"]) > 30 and len(expected["text_encoder"]) == 6 * 3

    # an A1111 adapter file at weight w, read back through diffusers' single-file loader
    info = save_merged_checkpoint(model, [(adapter_file, w)], tmp_path / "merged.safetensors", dtype="fp32")
    assert info["merged_layers"] == len(inj.adapters)
    back = load(tmp_path / "merged.safetensors", config=EMBEDDED)
    _assert_same(_weights(back.pipeline), base, expected, tol=1e-5)

    # the live Injection (still attached) gives the same file; the diffusers folder holds the same weights
    save_merged_checkpoint(model, [(inj, w)], tmp_path / "inj.safetensors", dtype="fp32",
                           diffusers_dir=tmp_path / "merged-diffusers")
    a, b = load_file(str(tmp_path / "merged.safetensors")), load_file(str(tmp_path / "inj.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    inj.save(tmp_path / "adapter.sdtune")
    inj.detach()
    _assert_same(_weights(model.pipeline), base)              # the live model was never changed
    # a native sdtune file (attached for the merge, detached after)
    save_merged_checkpoint(model, [(tmp_path / "adapter.sdtune", w)], tmp_path / "native.safetensors", dtype="fp32")
    n = load_file(str(tmp_path / "native.safetensors"))
    assert all(torch.allclose(b[k], n[k], rtol=1e-6, atol=1e-7) for k in b)
    _assert_same(_weights(model.pipeline), base)
    folder = load(tmp_path / "merged-diffusers")
    _assert_same(_weights(folder.pipeline), base, expected, tol=1e-5)

    # two adapters: weights add (each ΔW taken against the base weight)
    save_merged_checkpoint(model, [(adapter_file, 0.5), (adapter_file, 0.2)], tmp_path / "two.safetensors",
                           dtype="fp32")
    c = load_file(str(tmp_path / "two.safetensors"))
    assert all(torch.allclose(a[k], c[k], rtol=1e-5, atol=1e-6) for k in a)

    # the CLI: sdtune merge ADAPTER:WEIGHT -o FILE (on the embedded model)
    from sdtune.cli import main

    assert main(["merge", f"{adapter_file}:{w}", "-o", str(tmp_path / "cli.safetensors"), "--dtype", "fp32"]) == 0
    d = load_file(str(tmp_path / "cli.safetensors"))
    assert d.keys() == a.keys() and all(torch.equal(a[k], d[k]) for k in a)
    assert main(["merge", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.safetensors")]) == 2


@pytest.fixture(scope="module")
def meta_models():
    from diffusers import AutoencoderKL

    out = {}
    for arch in ("sd1", "sd2", "sdxl"):
        m = archs.build_random(arch, device="meta")
        with torch.device("meta"):
            vae = AutoencoderKL(**SD_VAE)
        out[arch] = {"unet": m.unet, "vae": vae, **m.text_encoders}
    return out


SD15_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.bias",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.2.bias",
    "first_stage_model.encoder.down.0.block.0.conv1.weight",
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    "first_stage_model.encoder.down.2.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.encoder.norm_out.weight",
    "first_stage_model.decoder.up.3.block.0.conv1.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.mid.block_2.norm2.bias",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight",
    "first_stage_model.post_quant_conv.bias",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


def test_sd15_key_names(meta_models):
    ldm = components_to_ldm(meta_models["sd1"], "sd1")
    missing = [k for k in SD15_KEYS if k not in ldm]
    assert not missing, missing
    # the published SD1.5 counts: U-Net 686, VAE 248, CLIP-L 196 (the file's position_ids buffer aside)
    counts = {p: sum(k.startswith(p) for k in ldm) for p in ("model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    assert tuple(ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)


def test_sd2_sdxl_openclip_names(meta_models):
    sd2 = components_to_ldm(meta_models["sd2"], "sd2")
    assert tuple(sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape) == (3072, 1024)
    assert "cond_stage_model.model.positional_embedding" in sd2 and "cond_stage_model.model.ln_final.bias" in sd2
    xl = components_to_ldm(meta_models["sdxl"], "sdxl")
    for key in ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias",
                "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
                "conditioner.embedders.1.model.text_projection",
                "model.diffusion_model.label_emb.0.0.weight",
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
                "model.diffusion_model.output_blocks.2.2.conv.weight"):
        assert key in xl, key


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_converters_invert_the_layout(meta_models, arch):
    """diffusers' own LDM -> diffusers converters map our file back to exactly the model's keys and shapes."""
    from diffusers.loaders import single_file_utils as sfu

    parts = meta_models[arch]
    ldm = components_to_ldm(parts, arch)
    back = {"unet": sfu.convert_ldm_unet_checkpoint(ldm, parts["unet"].config),
            "vae": sfu.convert_ldm_vae_checkpoint(ldm, parts["vae"].config)}
    te_prefix = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
    if arch == "sd2":
        back["text_encoder"] = sfu.convert_open_clip_checkpoint(parts["text_encoder"], ldm, prefix=te_prefix[arch])
    else:
        back["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ldm)
    if arch == "sdxl":
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(parts["text_encoder_2"], ldm, te_prefix[arch])
    for part, sd in back.items():
        if not hasattr(parts[part], "text_model"):
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        want = {k: tuple(v.shape) for k, v in parts[part].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in sd.items()} == want, part


def test_corrupt_and_pickle_single_files(tiny_model, tmp_path):
    good = tmp_path / "model.safetensors"
    save_merged_checkpoint(tiny_model, [], good, dtype="fp32")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        load(cut, config=EMBEDDED)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(good))}, ckpt)
    with pytest.raises(ModelLoadError, match="pickle"):
        load(ckpt, config=EMBEDDED)
    back = load(ckpt, config=EMBEDDED, allow_pickle=True)
    _assert_same(_weights(back.pipeline), _weights(tiny_model.pipeline))
