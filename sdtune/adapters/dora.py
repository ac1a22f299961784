"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W′ = m ⊙ (W + ΔW) / ‖W + ΔW‖.

ΔW is any low-rank update of this package (LoCon or FLoRA). The norm runs per input channel (axis "in", kohya's
convention and the only one A1111 rebuilds; magnitude (in,), exported as dora_scale (1, in[, 1, 1])) or per output
channel (axis "out", PEFT/LyCORIS ≥ 3.2; exported as a full "diff" because no UI rebuilds it correctly).
m starts at ‖W‖, so W′ = W at init. The norm is detached (paper §4.3), so gradients reach m and ΔW only through
the numerator. Bypass reuses the base op instead of a second weight:
  axis "out": y = g ⊙ (W x + ΔW x) + b with g = m/‖W+ΔW‖ per output channel (computed as g ⊙ (base op with its
              bias + ΔW x) + (1 − g) ⊙ b, so a quantised base's own op serves);
  axis "in":  y = (W + ΔW)(g ⊙ x) + b with g per input channel (scale the input, then the ordinary LoRA bypass).
The bypass path gets ‖W+ΔW‖ in closed form from the factors (``functional.lowrank_channel_norm``), never
building W+ΔW. Merge caches ‖W+ΔW‖ so that unmerge inverts exactly that factor: W = W′ · ‖W+ΔW‖/m − ΔW.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as Fn
from .base import Adapter, AdapterSpec, LowRank, _op, lora_form_tensors
from .frozen import is_quantised, weight_version


class DoRA(Adapter):
    def __init__(self, base: nn.Module, spec: AdapterSpec, kohya_name: str, lora: LowRank):
        super().__init__(base, spec, kohya_name, lora)
        self.axis = spec.dora_axis
        with torch.no_grad():
            self.magnitude = nn.Parameter(Fn.channel_norm(base.weight, self.axis).flatten().clone())
        self.register_buffer("merge_norm", None, persistent=False)
        self._weight_sq: tuple[tuple[int, int], Tensor] | None = None

    def _base_weight_sq(self) -> Tensor:
        """‖W‖² per channel, recomputed only when the frozen weight changes (merge, load). Under torch.compile
        it is computed in the graph each call (one read of W): the data-pointer key cannot be traced."""
        if torch.compiler.is_compiling():
            return Fn.squared_channel_norm(self.base.weight.detach(), self.axis)
        key = weight_version(self.base)
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, Fn.squared_channel_norm(self.base.weight.detach(), self.axis))
        return self._weight_sq[1]

    def _mag(self) -> Tensor:
        """magnitude shaped to broadcast against the weight: (out, 1, …) or (1, in, …)."""
        nd = self.base.weight.dim()
        return self.magnitude.reshape(-1, *[1] * (nd - 1)) if self.axis == "out" else \
            self.magnitude.reshape(1, -1, *[1] * (nd - 2))

    def original_weight(self) -> Tensor:
        w = self.base.weight
        if not self.merged:
            return w
        return w * (self.merge_norm / self._mag().detach()) - self.lora.delta().detach()

    def effective_weight(self) -> Tensor:
        return Fn.dora_weight(self.original_weight(), self.lora.delta(), self._mag(), self.axis)

    def delta_weight(self) -> Tensor:
        """W′ − W, formed in float64 and returned in W's dtype: after a few small steps W′ and W agree to within a
        few fp32 roundings of W, so an fp32 difference would be mostly rounding (export's check then fails)."""
        w = self.original_weight()
        w64 = w.double()
        return (Fn.dora_weight(w64, self.lora.delta().double(), self._mag().double(), self.axis) - w64).to(w.dtype)

    def _bypass(self, x: Tensor) -> Tensor:
        """x arrives in the compute dtype (``Adapter.forward``); every full-size op below stays in it."""
        dt = x.dtype
        # W in the compute dtype: the one cast the base op makes under autocast anyway; the norm's product reads
        # the same copy (with autocast off inside, so it is neither cast again nor run in fp32 on a bf16 W).
        quantised = is_quantised(self.base)
        w = self.base.dequantise(dt) if quantised else self.base.weight.to(dt)
        bias = self.base.bias
        form = self.lora.master_form(x.device.type)  # built once: the detached norm and the bypass path use it
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            norm = Fn.lowrank_channel_norm(w, self._base_weight_sq(), *form, self.axis).flatten()
        g = (self.magnitude / norm.to(self.magnitude.dtype)).to(dt)   # fp32 ratio, then one small cast
        if self.info.is_conv:
            g = g[:, None, None]
        if self.axis == "in":
            x = x * g
        # Wx + b: a quantised base runs its own op (it dequantises again in backward rather than keep w alive)
        z = self.lora.path(self.base, x, self.base(x) if quantised else _op(self.base, x, w, bias), form)
        if self.axis == "in":
            return z
        if bias is None:
            return z * g
        b = bias.to(dt)[:, None, None] if self.info.is_conv else bias.to(dt)
        return torch.addcmul(b - g * b, z, g)       # g ⊙ (Wx + ΔWx + b) + (1 − g) ⊙ b = g ⊙ (Wx + ΔWx) + b

    def _merge_delta(self) -> Tensor:
        """W′ − W, caching ‖W+ΔW‖ for an exact unmerge."""
        w = self.base.weight
        merged = w + self.lora.delta().to(w.dtype)
        self.merge_norm = Fn.channel_norm(merged, self.axis)
        return merged * (self._mag() / self.merge_norm) - w

    def _unmerged_weight(self) -> Tensor:
        w = self.base.weight * (self.merge_norm / self._mag()) - self.lora.delta().to(self.base.weight.dtype)
        self.merge_norm = None
        return w

    @torch.no_grad()
    def kohya_tensors(self) -> dict[str, Tensor]:
        """axis "in": low-rank tensors + dora_scale (1, in[, 1, 1]) for A1111's rebuild
        W′ = dora_scale · (W+ΔW)/‖W+ΔW‖_in. axis "out": {"diff": W′ − W} (LyCORIS full-diff key; see LOADER-FACTS:
        A1111 and ComfyUI mis-rebuild every output-axis dora_scale)."""
        if self.axis == "out":
            return {"diff": self.delta_weight().detach().contiguous()}
        out = lora_form_tensors(self.lora, self.info)
        out["dora_scale"] = self._mag().detach().clone()
        return out
