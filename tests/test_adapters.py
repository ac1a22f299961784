"""Adapter maths and modules: one case table (helpers_adapters.SPECS × LAYERS) drives the generic assertions.

Tolerances: float64 ΔW vs the dense reference 1e-6 relative (observed ~1e-15); float32 1e-4 (ΔW is a sum of
≤ r·k² products, fp32 eps 6e-8); bypass vs materialised, merged vs unmerged 1e-5 relative (fp32 rounding of
two different summation orders); merge→unmerge 1e-6 relative (two fp32 roundings of W + ΔW − ΔW).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_adapters import (
    CASE_IDS,
    CASES,
    SPECS,
    closed_form_params,
    dense_reference,
    kohya_rebuild,
    make_layer,
    perturb,
    rel,
    with_path,
)
from torch import nn

from sdtune.adapters import Adapter, AdapterSpec, choose_path, make_adapter
from sdtune.adapters import functional as Fn
from sdtune.adapters.spectral import top_singular


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "svd"


def build(algo, layer_id, cache, dtype=torch.float32, trained=True):
    layer, x = make_layer(layer_id, dtype)
    adapter = make_adapter(layer, SPECS[algo], "lora_test", svd_cache_dir=cache)
    if trained:
        perturb(adapter)
    return layer, adapter, x


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_delta_matches_dense_reference(algo, layer_id, cache):
    _, a64, _ = build(algo, layer_id, cache, torch.float64)
    assert rel(a64.delta_weight(), dense_reference(a64)) < 1e-6
    _, a32, _ = build(algo, layer_id, cache, torch.float32)
    assert a32.delta_weight().dtype == torch.float32
    assert rel(a32.delta_weight(), dense_reference(a32)) < 1e-4


@pytest.mark.parametrize("axis", ["in", "out"])
@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_lowrank_channel_norm_equals_norm_of_built_weight(algo, layer_id, axis, cache):
    """DoRA's closed-form ‖W+ΔW‖ (no W+ΔW built) equals the norm of the built weight, for every LoRA form."""
    layer, a, _ = build(algo, layer_id, cache, torch.float64)
    w = a.original_weight()
    up, mid, down, scale = a.lora.lora_form()
    got = Fn.lowrank_channel_norm(w, Fn.squared_channel_norm(w, axis), up, mid, down, scale, axis)
    want = Fn.channel_norm(w + a.lora.delta(), axis)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert rel(got, want) < 1e-9


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_bypass_equals_materialised(algo, layer_id, cache):
    layer, a, x = build(algo, layer_id, cache)
    a.spec = with_path(SPECS[algo], "bypass")
    yb = a(x)
    a.spec = with_path(SPECS[algo], "materialise")
    ym = a(x)
    assert yb.shape == layer(x).shape
    assert rel(yb, ym) < 1e-5
    # gradients agree too (bypass detaches DoRA's norm exactly as the materialised weight does)
    grads = []
    for path in ("bypass", "materialise"):
        a.spec = with_path(SPECS[algo], path)
        a.zero_grad()
        (a(x) ** 2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in a.trainable_named_parameters()]))
    assert rel(grads[0], grads[1]) < 1e-4


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_merge_unmerge(algo, layer_id, cache):
    layer, a, x = build(algo, layer_id, cache)
    w0 = layer.weight.clone()
    with torch.no_grad():
        y = a(x)
        weff = w0 + a.delta_weight()
        a.merge()
        assert a.merged
        assert rel(layer.weight, weff) < 1e-6
        assert rel(a(x), y) < 1e-5                            # merged output == unmerged output
        assert rel(a.delta_weight(), weff - w0) < 1e-5        # still known while merged
        a.unmerge()
    assert rel(layer.weight, w0) < 1e-6
    with pytest.raises(RuntimeError, match="not merged"):
        a.unmerge()


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_zero_at_init_then_changes(algo, layer_id, cache):
    layer, a, x = build(algo, layer_id, cache, trained=False)
    assert a.delta_weight().abs().max().item() < 1e-6 * layer.weight.abs().max().item()
    y0 = layer(x)
    for path in ("bypass", "materialise"):
        a.spec = with_path(SPECS[algo], path)
        torch.testing.assert_close(a(x), y0, rtol=1e-6, atol=1e-6)
    # one gradient step on the loss moves the output: the zero-init factor receives gradient
    (a(x) ** 2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in a.trainable_named_parameters())
    perturb(a)
    assert rel(a(x), y0) > 1e-3


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_kohya_tensors_rebuild(algo, layer_id, cache):
    layer, a, _ = build(algo, layer_id, cache)
    t = a.kohya_tensors()
    spec = SPECS[algo]
    if spec.algorithm == "dora" and spec.dora_axis == "out":
        assert set(t) == {"diff"}
    else:
        assert t["alpha"].dtype == torch.float32 and t["alpha"].dim() == 0
        r = t["lora_down.weight"].shape[0]
        conv = layer.weight.dim() == 4
        assert t["lora_up.weight"].shape == ((layer.weight.shape[0], r, 1, 1) if conv else (layer.weight.shape[0], r))
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            assert mid.shape[0] == mid.shape[1] == r and t["lora_down.weight"].shape[2:] == (1, 1)
        elif conv:
            assert t["lora_down.weight"].shape[1:] == layer.weight.shape[1:]
        if spec.algorithm == "dora":
            assert t["dora_scale"].shape == ((1, layer.weight.shape[1], 1, 1) if conv else (1, layer.weight.shape[1]))
    assert rel(kohya_rebuild(t, layer.weight), a.delta_weight()) < 1e-5


@pytest.mark.parametrize("algo,layer_id", CASES, ids=CASE_IDS)
def test_param_count_closed_form(algo, layer_id, cache):
    layer, a, _ = build(algo, layer_id, cache, trained=False)
    assert a.num_params() == closed_form_params(SPECS[algo], layer)
    assert all(not p.requires_grad for p in layer.parameters())
    assert all(p.requires_grad for _, p in a.trainable_named_parameters())


def test_flora_worked_example():
    """FLoRA paper's example: conv out 512, in 256, k 3, r1=r2=32, r3=r4=2 -> 28,684 parameters.

    The paper's 73,728 for "LoRA r=32" matricises W as (out·k) × (in·k): 32·3·(512+256). sdtune's LoCon uses
    kohya's conv layout (down with the full kernel): 32·(512 + 256·9) = 90,112; Tucker LoCon 33,792.
    """
    conv = nn.Conv2d(256, 512, 3, padding=1)
    n = lambda spec: make_adapter(conv, spec, "x").num_params()
    assert n(AdapterSpec("flora", rank=32)) == 28_684
    assert n(AdapterSpec("flora", rank=32, flora_ranks=(32, 32, 2, 2))) == 28_684
    assert 32 * 3 * (512 + 256) == 73_728
    assert n(AdapterSpec("locon", rank=32)) == 90_112
    assert n(AdapterSpec("locon", rank=32, tucker=True)) == 33_792


def test_flora_rectangular_core_exports_square(cache):
    layer, x = make_layer("conv3x3")
    a = make_adapter(layer, AdapterSpec("flora", rank=2, flora_ranks=(4, 2, 3, 1)), "x")
    perturb(a)
    t = a.kohya_tensors()
    assert t["lora_mid.weight"].shape == (4, 4, 3, 3)
    assert rel(kohya_rebuild(t, layer.weight), a.delta_weight()) < 1e-5
    a.spec = with_path(a.spec, "bypass")
    yb = a(x)
    a.spec = with_path(a.spec, "materialise")
    assert rel(yb, a(x)) < 1e-5


# --- peers as oracles ---------------------------------------------------------------------------------------
LYCORIS_CASES = [("locon", "conv3x3"), ("locon", "linear"), ("locon", "conv3x3_s2"), ("locon_rslora", "conv3x3"),
                 ("locon_tucker", "conv3x3"), ("locon_tucker", "conv3x3_d2"), ("dora_locon_in", "conv3x3"),
                 ("dora_locon_in", "linear"), ("dora_locon_out", "conv3x3"), ("dora_locon_out", "linear")]


@pytest.mark.parametrize("algo,layer_id", LYCORIS_CASES, ids=[f"{a}-{l}" for a, l in LYCORIS_CASES])
def test_lycoris_merged_weight(algo, layer_id, cache):
    from lycoris.modules.locon import LoConModule

    layer, a, _ = build(algo, layer_id, cache)
    spec = a.spec
    ly = LoConModule("x", layer, multiplier=1.0, lora_dim=spec.rank,
                     alpha=spec.alpha if spec.alpha is not None else spec.rank, use_tucker=spec.tucker,
                     rs_lora=spec.rslora, weight_decompose=spec.algorithm == "dora",
                     wd_on_out=spec.dora_axis == "out")
    lora = a.lora
    with torch.no_grad():
        conv = layer.weight.dim() == 4
        ly.lora_up.weight.copy_(lora.up.reshape(ly.lora_up.weight.shape))
        ly.lora_down.weight.copy_(lora.down.reshape(ly.lora_down.weight.shape))
        if spec.tucker:
            ly.lora_mid.weight.copy_(lora.mid)
        if spec.algorithm == "dora":
            ly.dora_scale.copy_(a._mag())
        ours = layer.weight + a.delta_weight()
        theirs = ly.get_merged_weight()[0]
    assert conv or layer_id == "linear"
    assert rel(ours, theirs) < 1e-5


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_linear_merged_weight(variant, cache):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).requires_grad_(False)
    w0 = model[0].weight.clone()
    spec = AdapterSpec("dora" if variant == "dora" else "locon", rank=3, alpha=5.0, rslora=variant == "rslora",
                       dora_axis="out")
    a = make_adapter(nn.Linear(12, 10).requires_grad_(False), spec, "x")
    with torch.no_grad():
        a.base.weight.copy_(w0)
        a.base.bias.copy_(model[0].bias)
        a.lora.down.normal_()
        a.lora.up.normal_()
        if variant == "dora":
            a.magnitude.mul_(1.3)
        ours = a.base.weight + a.delta_weight()
    peft = get_peft_model(model, LoraConfig(r=3, lora_alpha=5.0, target_modules=["0"],
                                            use_rslora=variant == "rslora", use_dora=variant == "dora"))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a.lora.down)
        layer.lora_B["default"].weight.copy_(a.lora.up)
        if variant == "dora":
            layer.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
        theirs = layer.base_layer.weight + layer.get_delta_weight("default") if variant != "dora" else None
        if variant == "dora":
            merged = peft.merge_and_unload()
            theirs = merged[0].weight
    assert rel(ours, theirs) < 1e-5


# --- Spectral specifics -------------------------------------------------------------------------------------
def test_spectral_svd_cached_and_reused(cache, monkeypatch):
    layer, _ = make_layer("conv3x3")
    u, s, v = top_singular(layer.weight, 4, cache)
    assert len(list(cache.glob("*.safetensors"))) == 1
    mat = layer.weight.flatten(1)
    torch.testing.assert_close(u.T @ mat @ v, torch.diag(s), atol=1e-5, rtol=1e-5)   # genuine singular triples
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    u2, s2, v2 = top_singular(layer.weight, 3, cache)
    assert torch.equal(u2, u[:, :3]) and torch.equal(s2, s[:3])
    make_adapter(layer, AdapterSpec("spectral", rank=2, slot=1), "x", svd_cache_dir=cache)   # served from cache


def test_spectral_slots_are_disjoint(cache):
    """Rotational updates in different slots act on orthogonal singular subspaces: ΔW₀ᵀΔW₁ = 0, ΔW₀ΔW₁ᵀ = 0."""
    layer, _ = make_layer("linear")
    d = []
    for slot in (0, 1):
        a = make_adapter(layer, AdapterSpec("spectral", rank=3, slot=slot, spectral_mode="rotational"), "x",
                         svd_cache_dir=cache)
        perturb(a)
        d.append(a.delta_weight())
    assert (d[0].T @ d[1]).abs().max() < 1e-5 and (d[0] @ d[1].T).abs().max() < 1e-5


def test_cayley_orthogonal():
    q = Fn.skew_from_vector(torch.randn(6, dtype=torch.float64), 4)
    assert torch.allclose(q, -q.T)
    r = Fn.cayley(q)
    assert torch.allclose(r @ r.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Fn.cayley(torch.zeros(3, 3)), torch.eye(3))


# --- cost rule ----------------------------------------------------------------------------------------------
def test_cost_rule():
    # SD1.5 conv 320->320 3x3 at 32x32 latents, rank 16: training always bypass, inference materialises
    assert choose_path(320, 320 * 9, 16, 1024, training=True) == "bypass"
    assert choose_path(320, 320 * 9, 16, 1024, training=False) == "materialise"
    # time_emb_proj (one token): bypass either way
    assert choose_path(320, 1280, 16, 1, training=False) == "bypass"
    layer, x = make_layer("conv3x3")
    a = make_adapter(layer, AdapterSpec(rank=2), "x")
    assert a.chosen_path(x) == choose_path(5, 54, 2, 2 * 49, training=True)
    with torch.no_grad():
        assert a.chosen_path(x) == choose_path(5, 54, 2, 2 * 49, training=False)
    a.spec = with_path(a.spec, "materialise")
    assert a.chosen_path(x) == "materialise"


def test_unbatched_conv_input():
    layer, x = make_layer("conv3x3")
    a = make_adapter(layer, AdapterSpec(rank=2), "x")
    perturb(a)
    assert rel(a(x[0]), a(x)[0]) < 1e-6


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [
    (dict(algorithm="lokr"), "algorithm"), (dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
    (dict(alpha=-1.0), "alpha"), (dict(algorithm="flora", alpha=4.0), "alpha"), (dict(scale=2.0), "scale"),
    (dict(dora_axis="row"), "dora_axis"), (dict(algorithm="flora", flora_ranks=(1, 2, 3)), "flora_ranks"),
    (dict(path="fast"), "path"), (dict(slot=1), "slot"), (dict(algorithm="spectral", tucker=True), "tucker"),
    (dict(spectral_mode="spin"), "spectral_mode"), (dict(alpha=float("nan")), "alpha"),
    (dict(algorithm="flora", ortho_basis_seed=0), "ortho_basis_seed"), (dict(ortho_index=1), "ortho_index"),
    (dict(tucker=True, ortho_basis_seed=0), "ortho_basis_seed"),
])
def test_bad_spec(kwargs, field):
    with pytest.raises(ValueError, match=f"AdapterSpec.{field}"):
        AdapterSpec(**kwargs)


def test_spec_dict_roundtrip():
    spec = AdapterSpec("flora", rank=4, flora_ranks=[4, 2, 2, 1], scale=3.0)
    assert spec.flora_ranks == (4, 2, 2, 1)
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown field"):
        AdapterSpec.from_dict({"rnak": 3})


@pytest.mark.parametrize("layer,spec,match", [
    (nn.Embedding(10, 4), AdapterSpec(), "unsupported layer type Embedding"),
    (nn.ConvTranspose2d(4, 4, 3), AdapterSpec(rank=2), "unsupported layer type ConvTranspose2d"),
    (nn.Conv2d(4, 4, 3, groups=2), AdapterSpec(rank=2), "groups=2"),
    (nn.Linear(6, 4), AdapterSpec(rank=5), "LoCon rank 5 is larger than the layer allows"),
    (nn.Conv2d(6, 4, 3), AdapterSpec(rank=5, tucker=True), "larger than the layer allows"),
    (nn.Conv2d(6, 8, 3), AdapterSpec("flora", rank=2, flora_ranks=(2, 2, 4, 1)), "r3 4 is larger"),
    (nn.Conv2d(6, 8, 3), AdapterSpec("flora", rank=2, flora_ranks=(2, 2)), "has 2 entries"),
    (nn.Linear(6, 4), AdapterSpec("spectral", rank=3, slot=1), "slot 1"),
])
def test_bad_layer(layer, spec, match):
    with pytest.raises(ValueError, match=match) as err:
        make_adapter(layer, spec, "lora_unet_some_module")
    assert "lora_unet_some_module" in str(err.value)


def test_non_finite_weight_and_merge():
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="lora_unet_bad: the base weight contains non-finite"):
        make_adapter(layer, AdapterSpec(rank=2), "lora_unet_bad")
    layer = nn.Linear(6, 4)
    a = make_adapter(layer, AdapterSpec(rank=2), "lora_unet_bad")
    w0 = layer.weight.clone()
    with torch.no_grad():
        a.lora.up.fill_(float("nan"))
    with pytest.raises(ValueError, match="lora_unet_bad: merging gives non-finite"):
        a.merge()
    assert torch.equal(layer.weight, w0) and not a.merged


def test_adapter_is_module_with_base():
    layer, _ = make_layer("linear")
    a = make_adapter(layer, AdapterSpec(rank=2), "lora_x")
    assert isinstance(a, Adapter) and a.base is layer and a.kohya_name == "lora_x"
    assert dict(a.named_children())["base"] is layer
    assert math.isclose(AdapterSpec(rank=4, alpha=2.0, rslora=True).lora_scale, 1.0)
