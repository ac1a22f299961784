"""``sdtune extract``: a LoCon from the difference of two checkpoints (the embedded model and a changed copy)."""
from __future__ import annotations

import json

import pytest
import safetensors
import torch

from sdtune.formats import rebuild
from sdtune.tools import ranks


@pytest.mark.parametrize("mode,param", [("threshold", 0.5), ("ratio", 0.2), ("quantile", 0.6), ("rank", 3)])
def test_rank_modes_match_lycoris_extract_linear(mode, param):
    """LyCORIS's own ``extract_linear`` picks the same rank as ``ranks.choose_rank`` (its modes' meanings) on a
    matrix with a spread spectrum."""
    from lycoris.utils import extract_linear

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    s = torch.tensor([3.0 * 0.7 ** i for i in range(48)])
    w = (u[:, :48] * s) @ v.T
    (down, _, _), kind = extract_linear(w, "fixed" if mode == "rank" else mode, param)
    assert kind == "low rank"
    assert ranks.choose_rank(torch.linalg.svdvals(w), mode, param) == down.shape[0]


def _tuned_copy(folder):
    """The embedded pipeline with rank-2 changes on an attention linear, a 3×3 conv and a text-encoder layer, and
    a changed bias, saved as a diffusers folder; returns {(component, module path): ΔW}."""
    from sdtune.models import load

    model = load()
    comps = model.components()
    g = torch.Generator().manual_seed(0)
    targets = [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
               ("unet", "down_blocks.0.resnets.0.conv1"),
               ("text_encoder", "text_model.encoder.layers.0.self_attn.v_proj"
                if hasattr(comps["text_encoder"], "text_model") else "encoder.layers.0.self_attn.v_proj")]
    deltas = {}
    with torch.no_grad():
        for c, p in targets:
            w = comps[c].get_submodule(p).weight
            a, b = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w[0].numel(), generator=g)
            deltas[c, p] = (a @ b).reshape(w.shape) * 0.01
            w += deltas[c, p]
        comps["unet"].get_submodule("conv_in").bias += 0.1
    model.pipeline.save_pretrained(folder, safe_serialization=True)
    return deltas


def test_extract_recovers_low_rank_changes_and_skips_the_rest(tmp_path, capsys):
    """The extracted file holds exactly the changed layers, with rank 2 found by ``ratio`` and all their energy;
    applied to the base it gives the tuned weights (relative error < 1e-5 of ΔW, float32); the changed bias is
    reported as not LoRA-able; ``--no-convs`` leaves the 3×3 conv out; the report is written."""
    from sdtune.apply import apply_file
    from sdtune.cli import main
    from sdtune.models import EMBEDDED, load

    deltas = _tuned_copy(tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    assert main(["extract", "--base", str(EMBEDDED), "--tuned", str(tmp_path / "tuned"), "-o", str(out),
                 "--mode", "ratio", "--param", "1e-4", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "3 layers extracted" in text and "captured energy 1.0000" in text and "unet.conv_in.bias" in text
    with safetensors.safe_open(str(out), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")} == {2}
    assert len(modules) == 3
    report = json.loads(out.with_suffix(".extract.json").read_text())
    assert report["summary"]["skipped"] > 100 and len(report["layers"]) == 3

    base = load()
    comps = base.components()
    with apply_file(comps, base.arch, out):
        for (c, p), delta in deltas.items():
            got = comps[c].get_submodule(p).weight.detach()
            want = load().components()[c].get_submodule(p).weight.detach() + delta
            assert rebuild.rel_error(got - (want - delta), delta) < 1e-5, p

    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--base", str(EMBEDDED), "--tuned", str(tmp_path / "tuned"), "-o", str(lora),
                 "--rank", "1", "--no-convs", "--totals-only"]) == 0
    text = capsys.readouterr().out
    assert "2 layers extracted" in text and "captured energy 1.0000" not in text
    with safetensors.safe_open(str(lora), "pt") as f:
        assert not any("conv1" in k for k in f.keys())
