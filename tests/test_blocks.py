"""Block weights (``sdtune.blocks``): A1111 LoRA-block-weight notation, applied at sampling and baked by
``fuse`` and ``merge``."""
from __future__ import annotations

import pytest
import torch
from helpers_adapters import perturb_all

from sdtune.adapters import AdapterSpec
from sdtune.apply import apply_file, load
from sdtune.formats import save_kohya
from sdtune.inject import attach
from sdtune.names import ldm_unet_path, name_map
from sdtune import blocks


def _small(arch):
    from sdtune.archs import build_random

    return build_random(arch, small=True, seed=0).components()


def _locon_file(comps, arch, path):
    inj = attach(comps, [(p, AdapterSpec("locon", rank=2, alpha=1.0)) for p in ("attn", "resnet", "te")], arch)
    perturb_all(inj)
    save_kohya(inj, path, dtype=torch.float32)
    inj.detach()


def _weights(comps):
    return {(c, k): v.detach().clone() for c, m in comps.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_block_ids_agree_with_kohya_ldm_names(arch):
    """The block of every U-Net layer of the published layouts is the input/middle/output block index of its LDM
    name (what the LBW extension reads), text encoders are BASE, and the short vector lists 17 (SD1) or 12 (SDXL)
    blocks that all hold attention layers."""
    comps = _small(arch)
    config = comps["unet"].config
    seen = set()
    for name, (c, path) in name_map(comps, arch).items():
        block_id, sdtune_name = blocks.block_of(c, path, config)
        if c != "unet":
            assert block_id == "BASE" and sdtune_name == c
            continue
        ldm = ldm_unet_path(path, config=config)  # the LDM layout of this U-Net's own structure
        if block_id is None:
            assert not ldm.startswith(("input_blocks", "middle_block", "output_blocks")), name
            continue
        seen.add(block_id)
        kind = {"IN": "input_blocks.", "M0": "middle_block.", "OU": "output_blocks."}[block_id[:2]]
        index = "" if kind == "middle_block." else f"{int(block_id[-2:])}."
        assert ldm.startswith(kind + index), (path, ldm, block_id)
        if arch == "sdxl":  # kohya's SDXL names are these LDM paths
            assert name == "lora_unet_" + ldm.replace(".", "_")
        if ".attentions." in path:
            assert block_id in blocks.BLOCK_IDS[arch][min(blocks.BLOCK_IDS[arch])], (path, block_id)
    assert set(blocks.BLOCK_IDS[arch][min(blocks.BLOCK_IDS[arch])]) - {"BASE"} <= seen


def test_parse_presets_vectors_and_errors():
    w = blocks.parse("MIDD", "sd1")
    assert w.by_id["BASE"] == 1 and w.by_id["IN01"] == 0 and w.by_id["M00"] == 1 and w.by_id["OUT07"] == 0
    assert blocks.parse("outs", "sdxl").by_id == dict(zip(blocks.BLOCK_IDS["sdxl"][12], [1] + [0] * 8 + [1] * 3))
    assert len(blocks.parse(",".join(["0.5"] * 26), "sd1").by_id) == 26
    named = blocks.parse("MID=0, down_blocks.1=0.25, te=2", "sdxl")
    assert named.by_id == {"M00": 0.0} and named.by_name == {"down_blocks.1": 0.25, "te": 2.0}
    for bad, match in (("1,1,1", "3 values"), ("IN99=1", "unknown block"), ("1,x" + ",1" * 15, "not a number"),
                       ("1,IN04=1", "mix")):
        with pytest.raises(ValueError, match=match):
            blocks.parse(bad, "sd1")


def test_zero_block_keeps_base_weight_and_others_scale(tmp_path):
    """A 17-value vector with IN04 at 0, IN05 at 0.5, the text encoder (BASE) at 2 and the rest 1, applied at
    sampling time to the SD1.5 layout: IN04's layers stay bit-identical to the base weights, IN05's move by half the
    plain file's ΔW, BASE's by twice, the others by exactly the plain ΔW; removing restores the base."""
    comps = _small("sd1")
    path = tmp_path / "a.safetensors"
    _locon_file(comps, "sd1", path)
    base = _weights(comps)
    with apply_file(comps, "sd1", path):
        plain = _weights(comps)
    spec = "2,1,1,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1"
    with blocks.apply_file(comps, "sd1", path, 1.0, spec):
        weighted = _weights(comps)
    assert _weights(comps).keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in _weights(comps).items())
    config = comps["unet"].config
    counts = {}
    for layer in load(path, comps, "sd1").layers.values():
        block_id, _ = blocks.block_of(layer.component, layer.module_path, config)
        key = (layer.component, f"{layer.module_path}.weight")
        w = {"IN04": 0.0, "IN05": 0.5, "BASE": 2.0}.get(block_id, 1.0)
        counts[w] = counts.get(w, 0) + 1
        if w == 0.0:
            assert torch.equal(weighted[key], base[key]), key
        else:
            want = base[key] + w * (plain[key] - base[key])
            assert torch.allclose(weighted[key], want, rtol=0, atol=1e-6), key
        assert not torch.equal(plain[key], base[key])
    assert all(counts.get(w, 0) > 0 for w in (0.0, 0.5, 2.0, 1.0))


def test_fuse_and_merge_bake_what_sampling_applies(tiny_model, tmp_path):
    """On the embedded model: ``fuse --blocks`` (the file written, then applied plainly) and ``merge --blocks``
    (the merged state dicts) give the same weights as applying the file with the same block weights at sampling
    time (relative error < 1e-6, float32), and the spec changed something."""
    from sdtune import fusion
    from sdtune.cli import main
    from sdtune.formats.checkpoint import merged_state_dicts

    comps = tiny_model.components()
    path = tmp_path / "a.safetensors"
    _locon_file(comps, tiny_model.arch, path)
    spec = "mid_block=0,down_blocks.1=0.5,te=1.5"
    before = _weights(comps)
    with blocks.apply_file(comps, tiny_model.arch, path, 0.8, spec):
        sampled = _weights(comps)
    with apply_file(comps, tiny_model.arch, path, 0.8):
        plain = _weights(comps)
    changed = [k for k in sampled if not torch.equal(sampled[k], plain[k])]
    assert changed

    fused = tmp_path / "fused.safetensors"
    assert main(["fuse", str(path), "--weights", "0.8", "--blocks", spec, "--dtype", "fp32", "-o", str(fused)]) == 0
    with apply_file(comps, tiny_model.arch, fused):
        baked = _weights(comps)
    sds, _ = merged_state_dicts(tiny_model, [(blocks.load_weighted(path, comps, tiny_model.arch, spec), 0.8)])
    for key, want in sampled.items():
        if torch.equal(want, before[key]):
            assert torch.equal(baked[key], before[key]), key
            continue
        for got in (baked[key], sds[key[0]][key[1]]):
            assert ((got.double() - want.double()).norm() / (want - before[key]).double().norm()).item() < 1e-5, key


def test_web_ui_blend_and_sample_take_block_weights(tmp_path):
    """The web UI's Blend and Sample (``webui.studio``): Blend bakes the spec and its report names the blocks it
    touched; Sample takes the spec (images differ from the unweighted ones); a bad spec is refused with its
    reason, not a traceback."""
    from webui.studio import Studio
    from webui.workspace import Refused

    studio = Studio(tmp_path / "ws")
    model = studio.model()
    comps = model.components()
    for name in ("a", "b"):
        _locon_file(comps, model.arch, tmp_path / f"{name}.safetensors")
        studio.ws.import_adapter(tmp_path / f"{name}.safetensors", name)
    out = studio.blend(["a.safetensors", "b.safetensors"], "", "sum", "blocked", False, "", "mid_block=0,te=0.5")
    assert "block weights on a: " in out["report"] and "M00 ×0" in out["report"] and "BASE ×0.5" in out["report"]
    blended = load(out["files"][0], comps, model.arch)
    assert not any(n.startswith("lora_unet_mid_block") for n in blended.layers)
    args = ("a star", "", 0, 2, 5.0, None, 1, ["a.safetensors"], "")
    plain, weighted = studio.sample(*args)["images"], studio.sample(*args, False, "NONE")["images"]
    from PIL import Image

    assert Image.open(plain[0]).tobytes() != Image.open(weighted[0]).tobytes()
    with pytest.raises(Refused, match="3 values"):
        studio.sample(*args, False, "1,1,1")
