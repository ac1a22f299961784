"""Quantised frozen base layers: ``QuantLinear`` / ``QuantConv2d`` keep only a packed weight and dequantise it per call.

Schemes (``QUANT_KINDS``):
  int8  per-output-channel symmetric absmax: W ≈ q · s, q = round(W / s) ∈ [−127, 127] (int8), s = max|W[o]| / 127
        (fp32, one per output channel): torchao's int8 weight-only scheme, in plain torch. 1 byte per weight.
  nf4   bitsandbytes' 4-bit NormalFloat in blocks of 64 with an fp32 absmax per block (QLoRA): 0.5 byte per weight.
        Needs the optional ``bitsandbytes`` package (CPU and CUDA).
The layers subclass nn.Linear / nn.Conv2d (so stride, padding and ``_conv_forward`` are the base's own), but
``weight`` is a read-only property that dequantises on each read, in the dtype of ``dequant_dtype`` (set by the
caller: the compute dtype). ``forward`` dequantises in the input's dtype, runs the op, and in backward dequantises
again for the input gradient rather than keeping the full-size weight alive from forward to backward (the weight is
frozen, so there is no weight gradient): peak memory holds one dequantised weight at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANT_KINDS = ("int8", "nf4")
NF4_BLOCK = 64


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:                                # a user's mistake: one clear message
        raise ValueError("base_quant = 'nf4' needs the bitsandbytes package (pip install 'bitsandbytes>=0.45')") \
            from e
    return bnbf


class _FrozenOp(torch.autograd.Function):
    """y = op(x, deq(W), b) with the gradient for x only; deq(W) is recomputed in backward, not saved."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "_Quantised") -> Tensor:
        ctx.layer, ctx.x_shape = layer, x.shape
        w = layer.dequantise(x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return layer._frozen_op(x, w, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layer = ctx.layer
        w = layer.dequantise(grad.dtype)
        if isinstance(layer, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, layer.stride, layer.padding, layer.dilation,
                                            layer.groups)
        else:
            gx = grad @ w
        return gx, None


class _Quantised:
    """Mixin: packed storage, ``dequantise(dtype)``, the ``weight`` property, the op with the gradient for x only."""

    kind: str
    dequant_dtype: torch.dtype

    def _pack(self, w: Tensor, kind: str) -> None:
        self.kind, self.weight_shape, self.dequant_dtype = kind, tuple(w.shape), w.dtype
        w = w.detach().float()
        if kind == "int8":
            scale = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
            shape = (-1, *[1] * (w.dim() - 1))
            self.register_buffer("packed", torch.round(w / scale.view(shape)).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.view(shape))
        elif kind == "nf4":
            packed, state = _bnb().quantize_4bit(w.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
            self.register_buffer("packed", packed)
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("code", state.code)
        else:
            raise ValueError(f"unknown base quantisation {kind!r}; expected one of {QUANT_KINDS}")

    def dequantise(self, dtype: torch.dtype | None = None) -> Tensor:
        """The frozen weight as the layer computes with it (base weight shape, ``dtype`` or ``dequant_dtype``)."""
        dtype = dtype or self.dequant_dtype
        if self.kind == "int8":
            return self.packed.to(dtype) * self.scale.to(dtype)
        bnbf = _bnb()
        state = bnbf.QuantState(absmax=self.absmax, shape=torch.Size(self.weight_shape), code=self.code,
                                blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
        return bnbf.dequantize_4bit(self.packed, state)

    @property
    def weight(self) -> Tensor:
        return self.dequantise()

    def forward(self, x: Tensor) -> Tensor:
        return _FrozenOp.apply(x, self)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class QuantLinear(_Quantised, nn.Linear):
    def _frozen_op(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, w, bias)


class QuantConv2d(_Quantised, nn.Conv2d):
    def _frozen_op(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, w, bias)


def quantise_layer(layer: nn.Module, kind: str) -> nn.Module:
    """A frozen copy of ``layer`` (nn.Linear or nn.Conv2d) with its weight quantised by ``kind``; bias kept as is."""
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear if isinstance(layer, nn.Linear) else None
    if cls is None or isinstance(layer, _Quantised):
        raise ValueError(f"cannot quantise {type(layer).__name__}: expected a full-precision nn.Linear or nn.Conv2d")
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":    # the input gradient assumes zero padding
        raise ValueError(f"cannot quantise a Conv2d with padding_mode={layer.padding_mode!r} (only 'zeros')")
    q = cls.__new__(cls)
    q.__dict__.update(layer.__dict__)
    q._parameters = {k: v for k, v in layer._parameters.items() if k != "weight"}
    q._buffers, q._modules = dict(layer._buffers), dict(layer._modules)
    q._pack(layer.weight, kind)
    return q.requires_grad_(False)


def is_quantised(layer: nn.Module) -> bool:
    return isinstance(layer, _Quantised)


def weight_version(layer: nn.Module) -> tuple[int, int]:
    """Changes exactly when the layer's frozen weight changes (the packed storage for a quantised layer)."""
    w = layer.packed if isinstance(layer, _Quantised) else layer.weight
    return w.data_ptr(), w._version
