"""``sdtune resize`` on kohya-style files over the SD1.5 / SDXL layouts (``archs.build_random(small=True)``).

The input mimics kohya sd-scripts' ``networks/lora.py`` output with ``conv_dim``: ``lora_down``/``lora_up``/0-dim
``alpha`` only, attention and text-encoder linears at the linear rank, resnet 3×3 convs at the conv rank,
``time_emb_proj`` and 1×1 ``conv_shortcut`` at the linear rank, kohya's names (SDXL: LDM names), α ≠ rank, and a
decaying spectrum so that truncation loses something. Reference: the dense SVD of each layer's matricised ΔW, i.e.
what kohya's ``resize_lora.py`` computes (Eckart–Young optimum).
"""
from __future__ import annotations

import json
import re

import pytest
import safetensors
import safetensors.torch
import torch
from helpers_formats import lycoris_merge

from sdtune.formats import rebuild
from sdtune.names import name_map
from sdtune.tools import ranks
from sdtune.tools.resize import resize_file, save_resized

TARGETS = ("attn1.to_q", "attn2.to_v", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut",
           "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")


def _small(arch):
    from sdtune.archs import build_random

    return build_random(arch, small=True, seed=0).components()


def _kohya_file(arch, path, *, rank=8, conv_rank=6, tucker=False, seed=0):
    """Write a kohya-style file; returns {kohya name: (component, module path)} of its modules."""
    comps = _small(arch)
    # the first transformer block of each attention stack is enough (SDXL's deep stacks would only add time)
    table = {n: (c, p) for n, (c, p) in name_map(comps, arch).items()
             if p.endswith(TARGETS) and not re.search(r"transformer_blocks\.[1-9]", p)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (c, p) in table.items():
        w = comps[c].get_submodule(p).weight
        k3 = w.dim() == 4 and w.shape[-1] == 3
        r = conv_rank if k3 else rank
        decay = torch.tensor([0.6 ** i for i in range(r)])
        if tucker and k3:
            sd[f"{name}.lora_down.weight"] = torch.randn(r, w.shape[1], 1, 1, generator=g)
            sd[f"{name}.lora_mid.weight"] = torch.randn(r, r, 3, 3, generator=g) * decay[:, None, None, None]
        else:
            shape = (-1, *[1] * (w.dim() - 1))
            sd[f"{name}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g) * decay.reshape(shape)
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(float(r) / 2)
    md = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
          "ss_base_model_version": {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[arch], "ss_tag_frequency": "{}"}
    safetensors.torch.save_file(sd, str(path), md)
    return table


def _groups(path):
    sd = safetensors.torch.load_file(str(path))
    out = {}
    for k, v in sd.items():
        name, _, key = k.partition(".")
        out.setdefault(name, {})[key] = v
    return out


def _dense_optimum(group, k):
    """kohya's way: the dense matricised ΔW, its full SVD, the rank-k truncation's error."""
    delta = rebuild.group_delta(group, None, torch.float64)
    mat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return rebuild.rel_error((u[:, :k] * s[:k]) @ vh[:k], mat)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fixed_rank_matches_dense_svd_and_loads_in_diffusers_and_lycoris(arch, tmp_path):
    """--rank 3: every layer at rank 3 with α/r = the file's scale, merged-weight error no larger than the dense
    SVD optimum (within 1e-6 relative: float32 storage), the report's retained share equal to the measured one;
    diffusers' ``load_lora_weights`` takes every module and LyCORIS 4.1.3 uses every key."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    table = _kohya_file(arch, src)
    result = resize_file(src, "rank", 3, progress=False)
    report = save_resized(result, out)
    before, after = _groups(src), _groups(out)
    assert set(after) == set(before) == set(table)
    for name, g in after.items():
        assert g["lora_down.weight"].shape[0] == 3, name
        assert rebuild.scale(g) == pytest.approx(rebuild.scale(before[name]), rel=1e-6)
        want = rebuild.group_delta(before[name], None, torch.float64)
        err = rebuild.rel_error(rebuild.group_delta(g, None, torch.float64), want)
        assert err <= _dense_optimum(before[name], 3) * (1 + 1e-6) + 1e-6, name
        assert err > 1e-3, name  # something was cut: the comparison could fail
        layer = next(r for r in result.layers if r.name == name)
        assert layer.retained == pytest.approx((1 - err ** 2) ** 0.5, abs=1e-5)
    info = json.loads(report.read_text())
    assert len(info["layers"]) == len(table) and info["summary"]["ranks_after"] == {"3": len(table)}
    with safetensors.safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert json.loads(md["ss_sdtune_resize"])["rule"] == "rank" and "resized by sdtune" in md["ss_training_comment"]
    assert md["ss_tag_frequency"] == "{}"  # the source's own metadata is carried over

    from test_loaders import _n_peft_layers, _pipeline

    fresh = _small(arch)
    _pipeline(arch, fresh).load_lora_weights(str(out))
    assert sum(_n_peft_layers(m) for m in fresh.values()) == len(table)
    fresh = _small(arch)
    used, keys = lycoris_merge(out, {n: fresh[c].get_submodule(p) for n, (c, p) in table.items()})
    assert used == keys


@pytest.mark.parametrize("rule,param", [("sv_fro", 0.9), ("sv_ratio", 4.0), ("sv_cumulative", 0.8)])
def test_dynamic_rules_keep_their_meaning_per_layer(rule, param, tmp_path):
    """Each rule's definition holds on every layer's own singular values (of the original ΔW): sv_fro keeps at
    least the stated Frobenius share (measured on the merged ΔW) with the smallest such rank; sv_ratio keeps
    exactly the σ above σ₁/p; sv_cumulative the smallest prefix holding p of Σσ."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _kohya_file("sd1", src)
    result = resize_file(src, rule, param, progress=False)
    save_resized(result, out)
    before, after = _groups(src), _groups(out)
    ranks_seen = set()
    for name, g in after.items():
        delta = rebuild.group_delta(before[name], None, torch.float64)
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        k = g["lora_down.weight"].shape[0]
        ranks_seen.add(k)
        kept = rebuild.group_delta(g, None, torch.float64)
        share = (kept.norm() / delta.norm()).item()
        if rule == "sv_fro":
            assert share >= param - 1e-6, (name, share)
            assert k == 1 or ranks.retained(s, k - 1) < param
        elif rule == "sv_ratio":
            assert k == max(1, int((s > s[0] / param).sum()))
        else:
            cum = (s.cumsum(0) / s.sum()).tolist()
            assert cum[k - 1] >= param - 1e-9 and (k == 1 or cum[k - 2] < param)
    assert len(ranks_seen) > 1 or rule == "sv_ratio"  # dynamic: ranks differ by layer


def test_tucker_cores_stay_square_tucker_and_load_in_lycoris(tmp_path):
    """Tucker 3×3 convs resized in Tucker form: square (k, k) core, the reported share equals the measured
    ‖ΔW′‖/‖ΔW‖ (HOSVD is a projection, so the error is √(1 − share²)), and LyCORIS uses every key."""
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    table = _kohya_file("sd1", src, tucker=True)
    result = resize_file(src, "rank", 2, progress=False)
    save_resized(result, out)
    before, after = _groups(src), _groups(out)
    tucker = [n for n, g in after.items() if "lora_mid.weight" in g]
    assert tucker
    for name in tucker:
        g = after[name]
        assert tuple(g["lora_mid.weight"].shape[:2]) == (2, 2)
        want = rebuild.group_delta(before[name], None, torch.float64)
        got = rebuild.group_delta(g, None, torch.float64)
        share = next(r.retained for r in result.layers if r.name == name)
        assert (got.norm() / want.norm()).item() == pytest.approx(share, abs=1e-5)
        assert rebuild.rel_error(got, want) == pytest.approx((1 - share ** 2) ** 0.5, abs=1e-4)
    fresh = _small("sd1")
    used, keys = lycoris_merge(out, {n: fresh[c].get_submodule(p) for n, (c, p) in table.items()})
    assert used == keys


def test_dora_magnitude_is_refitted(tmp_path):
    """An input-axis DoRA export resized with the base model: the refitted magnitude gives a merged weight closer
    to the original file's than keeping the old magnitude does (and the report says how close)."""
    from helpers_adapters import perturb_all

    from sdtune.adapters import AdapterSpec
    from sdtune.formats import save_kohya
    from sdtune.inject import attach

    comps = _small("sd1")
    inj = attach(comps, [("attn", AdapterSpec("dora", rank=6, dora_axis="in"))], "sd1")
    perturb_all(inj)
    src = tmp_path / "dora.safetensors"
    save_kohya(inj, src, dtype=torch.float32)
    inj.detach()
    result = resize_file(src, "rank", 2, components=comps, progress=False)
    table = name_map(comps, "sd1")
    before = _groups(src)
    improved = 0
    for r in result.layers:
        g_old = before[r.name]
        w = comps[table[r.name][0]].get_submodule(table[r.name][1]).weight.detach().double()
        target = w + rebuild.effective_delta(g_old, w, dtype=torch.float64)
        new = result.groups[r.name]
        kept_old = dict(new, dora_scale=g_old["dora_scale"].double())
        err_new = rebuild.rel_error(w + rebuild.effective_delta(new, w, dtype=torch.float64) - w, target - w)
        err_old = rebuild.rel_error(w + rebuild.effective_delta(kept_old, w, dtype=torch.float64) - w, target - w)
        assert err_new <= err_old + 1e-12 and r.merged_error == pytest.approx(err_new, rel=1e-6)
        improved += err_new < err_old * 0.999
    assert improved > 0
    with pytest.raises(ValueError, match="base model"):
        resize_file(src, "rank", 2, progress=False)


def test_cli_resize_prints_and_writes_report(tmp_path, capsys):
    from sdtune.cli import main

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _kohya_file("sd1", src)
    assert main(["resize", str(src), "-o", str(out), "--sv-fro", "0.95", "--max-rank", "5"]) == 0
    text = capsys.readouterr().out
    assert "retained" in text and "layers resized (sv_fro 0.95)" in text
    assert out.with_suffix(".resize.json").exists()
    assert main(["resize", str(src), "-o", str(out), "--sv-fro", "1.5"]) == 2
    assert "share in (0, 1]" in capsys.readouterr().err
