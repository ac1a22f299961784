"""Adapters under autocast (bf16/fp16 compute over fp32 master factors) and over a channels_last base.

Tolerance: under CPU autocast every matmul/conv rounds its inputs to the autocast dtype (unit roundoff u = 2⁻⁹
bf16, 2⁻¹² fp16) and accumulates in fp32, so the output's relative Frobenius error against fp32 is a few u, as for
the base layer alone (bf16 2.7e-3, fp16 4e-4): stated bound bf16 1e-2, fp16 2e-3 (worst case observed 4.4e-3 and
6e-4). Gradients pass one more rounded product: bound bf16 5e-2, fp16 1e-2 (worst observed 2.8e-2 and 3.9e-3, both
rotational Spectral, whose 6 Cayley parameters sum near-cancelling terms; the others stay at or below 5e-3 / 6e-4).
"""
from __future__ import annotations

import pytest
import torch
from helpers_adapters import SPECS, make_layer, perturb, rel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdtune.adapters import make_adapter

TOL = {torch.bfloat16: (1e-2, 5e-2), torch.float16: (2e-3, 1e-2)}
LOWPREC_CASES = [(a, l) for a in SPECS for l in ("linear", "conv3x3", "conv3x3_s2")]


def _build(algo, layer_id, cache):
    layer, x = make_layer(layer_id)
    a = make_adapter(layer, SPECS[algo], "lora_test", svd_cache_dir=cache)
    perturb(a)
    return layer, a, x


def _run(a, x, dtype):
    a.zero_grad()
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = a(x)
    (y.float() ** 2).sum().backward()
    grads = torch.cat([p.grad.flatten() for _, p in a.trainable_named_parameters()])
    return y, grads, x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("algo,layer_id", LOWPREC_CASES, ids=[f"{a}-{l}" for a, l in LOWPREC_CASES])
def test_autocast_matches_fp32(algo, layer_id, dtype, tmp_path):
    """Output and gradients under autocast are within the stated tolerance of fp32; the output is in the autocast
    dtype (the layer runs in it end to end); the master factors and their gradients stay fp32."""
    _, a, x = _build(algo, layer_id, tmp_path)
    y32, g32, xg32 = _run(a, x, torch.float32)
    y, g, xg = _run(a, x, dtype)
    tol_y, tol_g = TOL[dtype]
    assert y.dtype == dtype
    assert rel(y.float(), y32) < tol_y
    assert rel(g, g32) < tol_g and rel(xg, xg32) < tol_g
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in a.trainable_named_parameters())


class _CastCounter(TorchDispatchMode):
    """Counts dtype casts of tensors with at least ``big`` elements (activation-sized)."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.casts = big, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_to_copy") and args[0].numel() >= self.big:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _activation_casts(module: nn.Module, x: torch.Tensor) -> int:
    x = x.clone().requires_grad_(True)
    count = _CastCounter(big=x.numel())
    with count:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
    grad = torch.ones_like(y)
    with count:
        y.backward(grad)
    return count.casts


@pytest.mark.parametrize("algo", ["locon", "flora", "dora_locon_in", "dora_locon_out"])
@pytest.mark.parametrize("layer_id", ["linear", "conv3x3"])
def test_autocast_adds_no_full_size_cast(algo, layer_id, tmp_path):
    """Forward + backward under bf16 autocast casts activation-sized tensors exactly as often as the frozen layer
    alone (x to bf16 once, its gradient back once): the low-rank path and DoRA's scaling add no fp32 copies."""
    layer, a, x = _build(algo, layer_id, tmp_path)
    x = torch.randn(4, *x.shape[1:]) if layer_id.startswith("conv") else torch.randn(4, 16, x.shape[-1])
    floor = _activation_casts(layer, x)
    assert floor == 2
    assert _activation_casts(a, x) == floor


@pytest.mark.parametrize("algo", ["locon", "locon_tucker", "flora", "dora_locon_in", "dora_locon_out"])
def test_channels_last_base_stays_channels_last(algo, tmp_path):
    """A conv base run in channels_last gives a channels_last adapted output, equal to the NCHW one."""
    layer, a, x = _build(algo, "conv3x3", tmp_path)
    want = a(x)
    a.to(memory_format=torch.channels_last)
    y = a(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert rel(y, want) < 1e-5
