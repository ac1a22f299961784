"""torch.compile of adapted layers and of a tiny adapted U-Net equals eager, with no graph breaks (fullgraph=True).

The default suite compiles one adapted layer per adapter type with the ``aot_eager`` backend (Dynamo's trace and
AOTAutograd's joint forward/backward graph, the parts that break on Python-side state, without Inductor's C++ build:
seconds on 2 cores). The whole tiny U-Net under Inductor took 330 s on the 2 busy cores (one thread), so it is
marked slow (``pytest -m slow tests/test_adapters_compile.py``); bench/gpu.sh times compile on a GPU.
Tolerance: compiled vs eager fp32, relative 1e-5 (aot_eager runs the same kernels; Inductor fuses and reorders sums).
"""
from __future__ import annotations

import pytest
import torch
from helpers_adapters import SPECS, make_layer, perturb, rel

from sdtune.adapters import AdapterSpec, make_adapter

COMPILE_CASES = [("locon", "conv3x3"), ("locon_tucker", "conv3x3_s2"), ("flora", "conv3x3"),
                 ("dora_locon_in", "conv3x3"), ("dora_locon_out", "linear"), ("spectral_rot", "linear")]


def _step(module, x, params):
    for p in params:
        p.grad = None
    y = module(x)
    (y ** 2).sum().backward()
    return [y.detach()] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("algo,layer_id", COMPILE_CASES, ids=[f"{a}-{l}" for a, l in COMPILE_CASES])
def test_compiled_adapter_equals_eager(algo, layer_id, tmp_path):
    torch._dynamo.reset()
    layer, x = make_layer(layer_id)
    a = make_adapter(layer, SPECS[algo], "lora_test", svd_cache_dir=tmp_path)
    perturb(a)
    params = [p for _, p in a.trainable_named_parameters()]
    eager = _step(a, x, params)
    compiled = _step(torch.compile(a, backend="aot_eager", fullgraph=True), x, params)
    for got, want in zip(compiled, eager):
        assert rel(got, want) < 1e-5


def tiny_unet():
    """Two blocks of width 8 (one with cross-attention), no mid block: every adapted layer kind, few modules."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 8),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4, mid_block_type=None,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_tiny_unet_equals_eager(backend):
    """DoRA on attention, LoCon on ResNets, FLoRA on the resamplers: compiled (fullgraph) forward and the factors'
    gradients equal eager's."""
    from sdtune.inject import attach

    torch._dynamo.reset()
    unet = tiny_unet()
    rules = [("attn", AdapterSpec("dora", rank=2)), ("resnet", AdapterSpec("locon", rank=2)),
             ("sample", AdapterSpec("flora", rank=2))]
    inj = attach({"unet": unet}, rules, "sd1")
    for k, a in enumerate(inj.adapters.values()):
        perturb(a, seed=k, size=0.1)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    params = inj.parameters()
    run = lambda m: _step(lambda inp: m(inp, t, c).sample, x, params)  # noqa: E731
    eager = run(unet)
    compiled = run(torch.compile(unet, backend=backend, fullgraph=True))
    for got, want in zip(compiled, eager):
        assert rel(got, want) < 1e-4
