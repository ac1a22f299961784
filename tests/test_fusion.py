"""Multi-adapter fusion (sdtune.fusion: api, math, zip, capture) on tiny real-layout models and random factors.

Bounds, and why: fused ΔW vs an exact reference in float64 1e-10 relative (only QR/SVD round-off, ~1e-14);
files written in float32 1e-6 (fp32 eps 6e-8 times the rank of the sums); orthogonality of exact constructions
1e-10 (float64 round-off of projections); train-time-orthogonal adapters fused by ``sum`` 1e-5 total interference
(their cross-talk is zero in exact arithmetic; adapters and files are float32, so the floor is fp32 round-off).
"""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest
import torch
from helpers_adapters import perturb, write_adapter
from helpers_formats import tiny_components
from PIL import Image

from sdtune import apply, fusion
from sdtune.adapters import AdapterSpec
from sdtune.formats import FormatError
from sdtune.formats.reader import read_kohya
from sdtune.fusion import math as fm
from sdtune.inject import attach

METHODS = fusion.METHODS


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def comps():
    return tiny_components()


@pytest.fixture(scope="module")
def pair(comps, tmp_path_factory):
    """Two LoCon adapters on the same layers (attention), one plain, one Tucker on the resnet convs too."""
    d = tmp_path_factory.mktemp("pair")
    a = write_adapter(comps, d / "a.safetensors", [("attn", AdapterSpec("locon", rank=4))], 1)
    b = write_adapter(comps, d / "b.safetensors", [("attn", AdapterSpec("locon", rank=3, alpha=1.5)),
                                                   ("resnet", AdapterSpec("locon", rank=2, tucker=True))], 2)
    return d, a, b


def load(*paths):
    return [apply.load(p) for p in paths]


def merger_for(inputs, seed=0):
    """Merger vectors of the shape ``zip_merger`` returns: random on layers two inputs share, 1 elsewhere (a layer
    one input alone adapts is never learned; ``test_zip_...`` checks that on the model)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in {n for i in inputs for n in i.layers}:
        present = [k for k, i in enumerate(inputs) if name in i.layers]
        d = inputs[present[0]].layers[name].factors[1].shape[1]
        out[name] = {k: (0.5 + torch.rand(d, generator=g, dtype=torch.float64)) if len(present) > 1
                     else torch.ones(d, dtype=torch.float64) for k in present}
    return out


def fuse(inputs, method, weights=None, **kw):
    """``fusion.fuse``, with merger vectors for method zip."""
    return fusion.fuse(inputs, method, weights, merger=merger_for(inputs) if method == "zip" else None, **kw)


# --- identities -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_one_adapter_is_unchanged(pair, method):
    d, a, _ = pair
    res = fuse(load(d / "a.safetensors"), method)
    assert set(res.fused) == set(a)
    for name, delta in a.items():
        assert rel(res.delta(name), delta) < 1e-6          # float32 file vs float64 reference
    assert max(r.error for r in res.layers) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_disjoint_layers_are_a_union(comps, tmp_path, method):
    a = write_adapter(comps, tmp_path / "a.safetensors", [("attn", AdapterSpec("locon", rank=2))], 3)
    b = write_adapter(comps, tmp_path / "b.safetensors", [("resnet", AdapterSpec("locon", rank=2))], 4)
    assert not set(a) & set(b)
    res = fuse(load(tmp_path / "a.safetensors", tmp_path / "b.safetensors"), method, [1.0, 0.5])
    assert set(res.fused) == set(a) | set(b)
    for name in a:
        assert rel(res.delta(name), a[name]) < 1e-6
    for name in b:
        assert rel(res.delta(name), 0.5 * b[name]) < 1e-6


def test_sum_is_exact_concatenation(pair):
    d, a, b = pair
    inputs = load(d / "a.safetensors", d / "b.safetensors")
    res = fusion.fuse(inputs, "sum", [1.0, -0.7])
    for name in set(a) | set(b):
        want = a.get(name, 0) + -0.7 * b.get(name, 0)
        assert rel(res.delta(name), want) < 1e-6
        ranks = [i.layers[name].factors[1].shape[0] for i in inputs if name in i.layers]
        assert res.fused[name][1].shape[0] == sum(ranks)          # ranks add, nothing truncated
    assert max(r.error for r in res.layers) == 0.0


# --- the orthogonality property ---------------------------------------------------------------------------
def random_parts(n=3, out=20, d=16, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g, dtype=torch.float64),
             torch.randn(r, d, generator=g, dtype=torch.float64)) for _ in range(n)]


def test_sequential_fused_parts_are_mutually_orthogonal():
    parts = random_parts()
    before = fm.cross_products(parts)
    fused = fm.orthogonal_parts(parts, [1.0, 0.8, 1.2], sides="both", mode="sequential")
    out_x, in_x = fm.cross_products(fused)
    assert min(before) > 0.05                            # the inputs overlap a lot (3·4 = 12 of 16 dims)
    assert out_x < 1e-10 and in_x < 1e-10                # ΔW_i′ᵀΔW_j′ = 0 and ΔW_i′ΔW_j′ᵀ = 0
    assert rel(fm.dense(fused[0]), fm.dense(parts[0])) < 1e-12     # top priority untouched


@pytest.mark.parametrize("sides", ["in", "out", "both"])
def test_symmetric_parts_avoid_the_others_subspaces(sides):
    parts = random_parts(seed=1)
    fused = fm.orthogonal_parts(parts, [1.0, 1.0, 1.0], sides=sides)
    for i, p in enumerate(parts):
        u, v = fm.dominant_bases(*p)
        for j, f in enumerate(fused):
            if i == j:
                continue
            w = fm.dense(f)
            scale = fm.dense(parts[j]).norm()
            if sides in ("in", "both"):
                assert (w @ v).norm() < 1e-10 * scale    # ΔW_j′x = 0 for x in concept i's input subspace
            if sides in ("out", "both"):
                assert (u.T @ w).norm() < 1e-10 * scale  # ΔW_j′ never writes into i's output subspace


def test_regmean_reproduces_each_adapter_on_its_row_space():
    parts = random_parts(n=2, d=16, r=4, seed=2)         # 8 of 16 input dims: the row spaces are independent
    up, down = fm.regmean_parts(parts, [1.0, 0.5], [None, None], ridge=1e-12)
    for p, w in zip(parts, [1.0, 0.5]):
        v = fm.span([p[1].T], 16)
        assert rel(up @ (down @ v), w * fm.dense(p) @ v) < 1e-8


# --- train-time orthogonality -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["spectral_slots", "ortho_locon"])
def test_train_time_orthogonal_adapters_fuse_by_sum(comps, tmp_path, kind):
    if kind == "spectral_slots":
        specs = [AdapterSpec("spectral", rank=2, slot=k, spectral_mode="rotational") for k in range(3)]
    else:
        specs = [AdapterSpec("locon", rank=2, ortho_basis_seed=11, ortho_index=k) for k in range(3)]
    paths = []
    for k, spec in enumerate(specs):
        paths.append(tmp_path / f"{k}.safetensors")
        write_adapter(comps, paths[-1], [("attn", spec)], 10 + k, svd_cache=tmp_path / "svd", size=1.0)
    res = fusion.fuse(load(*paths), "sum")
    totals = res.total_interference()
    assert max(totals) < 1e-5, totals
    # the same layers with free LoCon adapters interfere by orders of magnitude more
    free = []
    for k in range(3):
        free.append(tmp_path / f"free{k}.safetensors")
        write_adapter(comps, free[-1], [("attn", AdapterSpec("locon", rank=2))], 10 + k)
    assert min(fusion.fuse(load(*free), "sum").total_interference()) > 1e-2


def test_ortho_locon_down_rows_come_from_one_basis(comps):
    downs = []
    for k in range(2):
        inj = attach(comps, [("attn", AdapterSpec("locon", rank=3, ortho_basis_seed=5, ortho_index=k))], "sd1")
        a = next(iter(inj.adapters.values()))
        downs.append(a.lora.down.flatten(1).double())
        assert [n for n, _ in a.trainable_named_parameters()] == ["lora.up"]   # down is frozen
        inj.detach()
    assert (downs[0] @ downs[1].T).abs().max() < 1e-6   # float32 buffers of an exactly orthogonal basis
    assert torch.allclose(downs[0] @ downs[0].T, torch.eye(3, dtype=torch.float64) / 3, atol=1e-6)


def test_fuse_says_whether_the_inputs_were_trained_orthogonal(comps, tmp_path):
    """The report reads the inputs' training rules: disjoint blocks of one basis, one block used twice, two bases."""
    def write(name, **ortho):
        path = tmp_path / f"{name}.safetensors"
        write_adapter(comps, path, [("te", AdapterSpec("locon", rank=2, **ortho))], len(name), size=0.2)
        return path

    a, b = write("a", ortho_basis_seed=4, ortho_index=0), write("b", ortho_basis_seed=4, ortho_index=1)
    twin, other, free = write("twin", ortho_basis_seed=4, ortho_index=1), write("other", ortho_basis_seed=9), \
        write("free")
    report = fusion.format_report(fusion.fuse(load(a, b, free), "sum"), per_layer=False)
    assert "note: 2 inputs trained on disjoint blocks of one orthogonal basis" in report
    clash = fusion.fuse(load(a, b, twin), "sum").notes
    assert clash == ["b and twin were trained on the same block (ortho_index 1) of basis 4: they share input "
                     "directions; retrain one with another ortho_index"]
    assert "different bases" in fusion.fuse(load(a, other), "sum").notes[0]
    assert fusion.fuse(load(a, free), "sum").notes == []


def test_ortho_random_picks_share_one_basis_and_collide_only_where_their_draws_do(comps):
    """The paper's uncoordinated form: rows drawn from one basis; two concepts' rows are orthogonal except the ones
    both drew, which are identical; the draw is reproducible from (seed, pick)."""
    from sdtune.adapters.functional import orthogonal_basis_pick

    a, b = orthogonal_basis_pick(16, 6, seed=3, pick=1), orthogonal_basis_pick(16, 6, seed=3, pick=2)
    assert torch.allclose(a @ a.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    gram = (a @ b.T).abs()
    shared = int((gram > 1 - 1e-9).sum())
    rows_a = set(torch.randperm(16, generator=torch.Generator().manual_seed(1))[:6].tolist())
    rows_b = set(torch.randperm(16, generator=torch.Generator().manual_seed(2))[:6].tolist())
    assert shared == len(rows_a & rows_b) and 0 < shared < 6        # these draws do collide (6·6/16 expected ~2)
    assert ((gram < 1e-9) | (gram > 1 - 1e-9)).all()                # every other pair exactly orthogonal
    assert torch.equal(orthogonal_basis_pick(16, 6, seed=3, pick=1), a)
    spec = AdapterSpec("locon", rank=2, ortho_basis_seed=5, ortho_index=12345, ortho_pick="random")
    inj = attach(comps, [("attn", spec)], "sd1")      # any index: no block has to fit the layer
    try:
        down = next(iter(inj.adapters.values())).lora.down.flatten(1).double()
        assert torch.allclose(down @ down.T, torch.eye(2, dtype=torch.float64) / 3, atol=1e-6)
    finally:
        inj.detach()
    with pytest.raises(ValueError, match="ortho_pick"):
        AdapterSpec("locon", ortho_pick="random")


# --- orthogonal vs sum -----------------------------------------------------------------------------------
def test_orthogonal_and_regmean_beat_sum_on_overlapping_adapters(pair):
    d, _, _ = pair
    inputs = load(d / "a.safetensors", d / "b.safetensors")
    totals = {m: fusion.fuse(inputs, m, [1.0, 0.8]).total_interference() for m in ("sum", "orthogonal", "regmean")}
    # orthogonal: a weak adapter still removes its row space from a strong one (self-distortion does not shrink
    # with the other's strength), so the claim is on the worst and the mean input, not on each input
    assert max(totals["orthogonal"]) < 0.5 * max(totals["sum"]), totals
    assert sum(totals["orthogonal"]) < 0.7 * sum(totals["sum"]), totals
    # regmean's ridge (0.1, chosen on held-out activations) trades exactness on the row spaces for robustness
    assert max(totals["regmean"]) < max(totals["sum"]), totals
    assert sum(totals["regmean"]) < 0.8 * sum(totals["sum"]), totals


# --- files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_output_file_reads_back_as_a1111(pair, tmp_path, method, comps):
    d, _, _ = pair
    inputs = load(d / "a.safetensors", d / "b.safetensors")
    res = fuse(inputs, method, [1.0, 0.8])
    if method == "zip":   # Σ_i w_i ΔW_i diag(m_i) on the shared layers
        merger = merger_for(inputs)
        for name in set(inputs[0].layers) & set(inputs[1].layers):
            ref = sum(w * fm.dense(i.layers[name].factors) * merger[name][k]
                      for k, (i, w) in enumerate(zip(inputs, [1.0, 0.8])))
            assert rel(fm.dense(res.fused[name]), ref) < 1e-10
    out = tmp_path / "fused.safetensors"
    md = fusion.save_fused(res, out, dtype=torch.float32)
    back = read_kohya(out, comps, "sd1")                 # strict: every key consumed, every shape fits the model
    assert set(back.modules) == set(res.fused)
    for name, module in back.modules.items():
        t = module.tensors
        assert set(t) == {"lora_down.weight", "lora_up.weight", "alpha"}
        assert name.startswith("lora_unet_")
        assert t["alpha"].dim() == 0 and t["alpha"].dtype == torch.float32
        assert float(t["alpha"]) == t["lora_down.weight"].shape[0]      # α/r = 1: the scale is in the factors
        shape = res.shapes[name]
        if len(shape) == 4:
            assert t["lora_down.weight"].shape[1:] == shape[1:] and t["lora_up.weight"].shape[2:] == (1, 1)
        assert rel(module.delta(shape), res.delta(name)) < 1e-6
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert json.loads(md["ss_fusion"])["method"] == method


def test_native_input_matches_its_export(comps, tmp_path):
    inj = attach(comps, [("attn", AdapterSpec("spectral", rank=2))], "sd1", svd_cache_dir=tmp_path / "svd")
    for k, a in enumerate(inj.adapters.values()):
        perturb(a, seed=k)
    deltas = {n: a.delta_weight().detach().double() for n, a in inj.adapters.items()}
    inj.save(tmp_path / "native.sdtune")
    inj.detach()
    with pytest.raises(FormatError, match="needs the base model"):
        apply.load(tmp_path / "native.sdtune")
    res = fusion.fuse([apply.load(tmp_path / "native.sdtune", comps, "sd1")], "sum")
    assert all(rel(res.delta(n), d) < 1e-5 for n, d in deltas.items())


def test_merge_into_adds_the_fused_delta(pair):
    d, _, _ = pair
    res = fusion.fuse(load(d / "a.safetensors", d / "b.safetensors"), "orthogonal")
    fresh = tiny_components()
    model = types.SimpleNamespace(components=lambda: fresh, arch="sd1")
    name = next(iter(res.fused))
    from sdtune.names import name_map
    comp, path = name_map(fresh, "sd1")[name]
    w0 = fresh[comp].get_submodule(path).weight.detach().clone()
    fusion.merge_into(model, res)
    assert rel(fresh[comp].get_submodule(path).weight - w0, res.delta(name)) < 1e-6


# --- mismatches -------------------------------------------------------------------------------------------
def test_mismatched_architecture_or_base_is_a_clear_error(comps, tmp_path, pair):
    d, _, _ = pair
    spec = [("attn", AdapterSpec("locon", rank=2))]
    write_adapter(comps, tmp_path / "x1.safetensors", spec, 5, metadata={"ss_sd_model_name": "/m/tiny-sd"})
    write_adapter(comps, tmp_path / "x2.safetensors", spec, 6, metadata={"ss_sd_model_name": "other-model"})
    with pytest.raises(fusion.FusionError, match=r"base models differ: .*x1.safetensors.*tiny-sd.*x2.safetensors"):
        fusion.fuse(load(tmp_path / "x1.safetensors", tmp_path / "x2.safetensors"))
    a, b = load(d / "a.safetensors", d / "b.safetensors")
    b = dataclasses.replace(b, arch="sdxl")
    with pytest.raises(fusion.FusionError, match=r"architectures differ: .*a.safetensors is SD1.*b.safetensors is SDXL"):
        fusion.fuse([a, b])
    other = tiny_components()
    other["unet"].down_blocks[0].attentions[0].proj_in = torch.nn.Linear(32, 16)   # a "different base" layer
    c = apply.load(d / "a.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    c.layers[name] = apply.LayerDelta((torch.randn(16, 2, dtype=torch.float64),
                                     torch.randn(2, 32, dtype=torch.float64)), (16, 32))
    with pytest.raises(fusion.FusionError, match=f"base models differ: layer {name}"):
        fusion.fuse([a, c])


# --- CLI --------------------------------------------------------------------------------------------------
def test_cli_writes_the_fused_file(pair, tmp_path, capsys):
    from sdtune.cli import main

    d, _, _ = pair
    out = tmp_path / "fused.safetensors"
    rc = main(["fuse", str(d / "a.safetensors"), str(d / "b.safetensors"), "--method", "orthogonal",
               "--weights", "1,0.8", "-o", str(out), "--dtype", "fp32"])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "TOTAL" in text and "lora_unet_down_blocks_0_attentions_0_proj_in" in text and "row space" in text
    assert set(read_kohya(out).modules) == set(load(d / "a.safetensors")[0].layers) | set(
        load(d / "b.safetensors")[0].layers)
    rc = main(["fuse", str(d / "a.safetensors"), "--weights", "1,2", "-o", str(out)])
    assert rc == 2 and "2 weights for 1 inputs" in capsys.readouterr().err


# --- activations on a real pipeline -----------------------------------------------------------------------
def test_capture_activations_and_fuse_on_them(tiny_model, tmp_path):
    model = tiny_model
    comps = model.components()
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"c{k}.safetensors")
        write_adapter(comps, paths[-1], [("attn", AdapterSpec("locon", rank=2))], 20 + k)
    inputs = [apply.load(p, comps, model.arch) for p in paths]
    names = sorted(inputs[0].layers)
    acts = [fusion.capture_activations(model, [p], names, columns=32, steps=1) for p in ("a sks star", "a red circle")]
    assert set(acts[0]) == set(names)
    for name, x in acts[0].items():
        assert x.shape[0] == inputs[0].layers[name].factors[1].shape[1] and 0 < x.shape[1] <= 32
    res = fusion.fuse(inputs, "regmean", activations=acts)
    assert res.x_source == "activations"
    base = fusion.fuse(inputs, "sum", activations=acts)
    assert all(r < s for r, s in zip(res.total_interference(), base.total_interference()))


# --- zip: the learned merge, end to end on the embedded model ------------------------------------------------
def test_zip_merge_beats_sum_on_held_out_noise_and_its_file_is_what_it_learned(tiny_model, tmp_path):
    """Two random attention adapters that collide on every layer: the learned merger must make the fused *file*
    denoise each concept's prompt closer to that concept's adapter alone than the plain sum does, on noise and
    timesteps it was not fitted on; and learning must leave the model as it was."""
    from sdtune.apply import apply_file
    from sdtune.data.dataset import Encoder, denoise
    from sdtune.fusion.zip import ZipOptions, mean_cosine

    comps = tiny_model.components()
    paths = [tmp_path / f"c{k}.safetensors" for k in range(2)]
    for k, p in enumerate(paths):
        write_adapter(comps, p, [("attn", AdapterSpec("locon", rank=2))], 30 + k, size=0.6)
    inputs = [apply.load(p, comps, tiny_model.arch) for p in paths]
    prompts = [["a sks star"], ["a red circle in qtz style"]]
    before = {n: p.detach().clone() for n, p in comps["unet"].named_parameters()}
    grads = {n: p.requires_grad for n, p in comps["unet"].named_parameters()}
    merger, losses = fusion.zip_merger(tiny_model, inputs, prompts,
                                       options=ZipOptions(steps=30, lr=0.05, batch=2, latents=4, sample_steps=4),
                                       progress=False)
    assert len(losses) == 30
    assert all(torch.equal(p, before[n]) and p.requires_grad == grads[n] for n, p in comps["unet"].named_parameters())
    assert not any(h for m in comps["unet"].modules() for h in (m._forward_hooks, m._forward_pre_hooks))
    assert any((m - 1).abs().max() > 1e-3 for ms in merger.values() for m in ms.values())
    assert 0 < mean_cosine(merger) < 1 - 1e-4                        # moved off the plain sum (cos = 1)
    alone, no_steps = fusion.zip_merger(tiny_model, inputs[:1], prompts[:1], progress=False)   # nothing shared
    assert no_steps == [] and all(torch.equal(m, torch.ones_like(m)) for ms in alone.values() for m in ms.values())
    files = {m: tmp_path / f"{m}.safetensors" for m in ("sum", "zip")}
    for method, f in files.items():
        fusion.save_fused(fusion.fuse(inputs, method, merger=merger if method == "zip" else None), f,
                          dtype=torch.float32)

    encoder = Encoder(tiny_model, cache_latents=False, cache_text=False, device="cpu")
    gen = torch.Generator().manual_seed(123)
    sched = tiny_model.pipeline.scheduler

    @torch.no_grad()
    def eps(path, zt, t, caps):
        with apply_file(comps, tiny_model.arch, path):
            return denoise(tiny_model, zt, t, *encoder.text(caps))

    err = {"sum": 0.0, "zip": 0.0}
    for path, (prompt,) in zip(paths, prompts):
        cfg = tiny_model.pipeline.unet.config
        z0 = torch.randn(4, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen) * 0.5
        t = torch.randint(0, sched.config.num_train_timesteps, (4,), generator=gen)
        zt = sched.add_noise(z0, torch.randn(z0.shape, generator=gen), t)
        teacher = eps(path, zt, t, [prompt] * 4)
        for method, f in files.items():
            err[method] += float((eps(f, zt, t, [prompt] * 4) - teacher).square().mean())
    assert err["zip"] < 0.8 * err["sum"], err


def test_cli_zip_learns_from_prompts(tiny_model, tmp_path, capsys):
    from sdtune.cli import main

    paths = [tmp_path / f"c{k}.safetensors" for k in range(2)]
    for k, p in enumerate(paths):
        write_adapter(tiny_model.components(), p, [("attn", AdapterSpec("locon", rank=2))], 40 + k)
    out = tmp_path / "zip.safetensors"
    args = ["fuse", *map(str, paths), "--method", "zip", "-o", str(out), "--dtype", "fp32", "--totals-only"]
    assert main(args) == 2 and "give one prompt set per adapter" in capsys.readouterr().err
    assert main(args + ["--prompts", "a sks star", "a red circle;a blue circle", "--zip-steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "'zip_loss'" in text and "in 2 steps" in text and "'merger_cos'" in text
    assert "captured activations" in text
    assert set(read_kohya(out, tiny_model.components(), tiny_model.arch).modules) == set(
        apply.load(paths[0]).layers)


def test_zip_needs_its_merger_and_one_prompt_set_per_input(pair, tiny_model):
    d, _, _ = pair
    inputs = load(d / "a.safetensors", d / "b.safetensors")
    with pytest.raises(fusion.FusionError, match="zip needs merger vectors"):
        fusion.fuse(inputs, "zip")
    with pytest.raises(fusion.FusionError, match="1 prompt sets for 2 inputs"):
        fusion.zip_merger(tiny_model, inputs, [["a sks star"]])


def test_layers_the_base_model_lacks_are_named(tiny_model, pair):
    """capture_activations, zip_merger, merge_into and composed sampling all look layers up through
    apply.find_layers."""
    with pytest.raises(FormatError, match="2 layer.s. are not in the base model: lora_unet_nope, lora_te_x"):
        apply.find_layers(tiny_model.components(), tiny_model.arch, ["lora_unet_nope", "lora_te_x"])
    d, _, _ = pair
    res = fusion.fuse(load(d / "b.safetensors"), "sum")
    res.fused = {"lora_unet_nope": next(iter(res.fused.values()))}
    before = {n: p.clone() for n, p in tiny_model.pipeline.unet.named_parameters()}
    with pytest.raises(FormatError, match="1 layer.s. are not in the base model: lora_unet_nope"):
        fusion.merge_into(tiny_model, res)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.pipeline.unet.named_parameters())   # nothing merged


# --- everyone's files: metadata-less LyCORIS files in fuse, sample and merge ----------------------------------
def lycoris_locon(model, path, seed):
    """A LoCon file as LyCORIS's own LoConModule makes its tensors (rank 4, α 2; 3×3 convs keep their kernel on
    ``lora_down``), on the U-Net's cross-attention and first-resnet layers, with no metadata at all: nothing in it
    says which architecture it is for (the embedded model's text context is too narrow to tell SD1 from SD2).
    Returns {kohya name: ΔW} by LyCORIS's own merge (``lycoris_merge``), the oracle."""
    import copy

    from helpers_formats import lycoris_merge
    from lycoris.modules import LoConModule
    from safetensors.torch import save_file

    from sdtune.names import name_map

    comps = model.components()
    g = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    for name, (comp, module_path) in name_map(comps, model.arch).items():
        if not name.startswith("lora_unet_") or not ("attn2_to" in name or "resnets_0_conv" in name):
            continue
        layers[name] = copy.deepcopy(comps[comp].get_submodule(module_path))
        module = LoConModule(name, layers[name], 1.0, 4, 2.0)
        with torch.no_grad():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)
        tensors |= {f"{name}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path))
    before = {n: m.weight.detach().clone() for n, m in layers.items()}
    used, keys = lycoris_merge(path, layers)
    assert used == keys
    return {n: (m.weight.detach() - before[n]).double() for n, m in layers.items()}


def test_metadata_less_lycoris_files_work_in_fuse_sample_and_merge(tiny_model, tmp_path, capsys):
    """Issue 21 item 0: with the base model given, every command takes files that carry no metadata (the model
    gives the architecture), and the ΔW they use is LyCORIS's own."""
    from sdtune.cli import main
    from sdtune.fusion.zip import ZipOptions
    from sdtune.models import EMBEDDED, load

    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    deltas = [lycoris_locon(tiny_model, p, seed) for p, seed in zip(paths, (1, 2))]
    assert read_kohya(paths[0]).arch is None and not read_kohya(paths[0]).metadata    # nothing to go by
    comps = tiny_model.components()
    inputs = [apply.load(p, comps, tiny_model.arch) for p in paths]
    assert [i.arch for i in inputs] == ["sd1", "sd1"]
    prompts = [["a sks star"], ["a red circle"]]
    for method in METHODS:
        options = ZipOptions(steps=2, batch=1, latents=2, sample_steps=2) if method == "zip" else method
        res = fusion.fuse_on_model(tiny_model, inputs, options, [1.0, 0.5], progress=False,
                                   prompts=prompts if method == "zip" else None)
        assert res.arch == "sd1" and set(res.fused) == set(deltas[0])
        if method == "sum":
            for name in deltas[0]:
                assert rel(res.delta(name), deltas[0][name] + 0.5 * deltas[1][name]) < 1e-6, name
    out = tmp_path / "fused.safetensors"
    assert main(["fuse", *map(str, paths), "--model", str(EMBEDDED), "--method", "orthogonal", "-o", str(out),
                 "--totals-only"]) == 0
    assert set(read_kohya(out, comps, tiny_model.arch).modules) == set(deltas[0])
    # sample: the adapter changes the image
    for folder, extra in (("with", ["--adapter", f"{paths[0]}:1.0"]), ("without", [])):
        assert main(["sample", "a red star", "-n", "1", "--steps", "2", "-o", str(tmp_path / folder), *extra]) == 0
    with_, without = (np.asarray(Image.open(next((tmp_path / f).glob("0*.png"))), dtype=float)
                      for f in ("with", "without"))
    assert np.abs(with_ - without).mean() > 0.5
    # merge: the checkpoint holds W + 0.5·ΔW_LyCORIS
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", f"{paths[0]}:0.5", "-o", str(merged), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    back = load(merged, config=EMBEDDED).components()
    from sdtune.names import name_map

    table = name_map(comps, tiny_model.arch)
    for name, delta in deltas[0].items():
        comp, module_path = table[name]
        got = (back[comp].get_submodule(module_path).weight - comps[comp].get_submodule(module_path).weight).detach()
        assert rel(got, 0.5 * delta) < 1e-5, name
