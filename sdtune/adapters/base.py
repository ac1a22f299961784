"""The adapter interface: ``AdapterSpec`` (what to train), ``Adapter`` (one wrapped frozen layer), the cost rule.

An ``Adapter`` holds the frozen layer as the submodule ``base`` and one low-rank factor module ``lora``
(``LowRank``: LoCon, FLoRA or Spectral). Every low-rank update is written in one common *LoRA form*
ΔW = scale · up @ [mid] @ down, which gives the bypass path and the kohya export once for all algorithms;
``delta_weight`` comes from each algorithm's own formula in ``functional.py``, and the tests check that the two
agree. DoRA (``dora.py``) overrides the few methods where the magnitude enters.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as Fn
from .frozen import is_quantised

ALGORITHMS = ("locon", "flora", "dora", "spectral")
PRESETS = ("attn", "resnet", "sample", "te")  # the layer groups an AdapterSpec is attached to (``inject``)
_CHOICES = {
    "dora_base": ("locon", "flora"),
    "dora_axis": ("in", "out"),
    "spectral_mode": ("additive", "rotational"),
    "path": ("auto", "bypass", "materialise"),
    "ortho_pick": ("block", "random"),
}


@dataclass(frozen=True)
class AdapterSpec:
    """What to train on one layer. Validated on construction; a bad field raises ValueError naming it.

    algorithm: "locon" | "flora" | "dora" | "spectral".
    rank: r (LoCon/DoRA rank; FLoRA default r₁ = r₂; Spectral: number of singular columns trained).
    alpha: LoCon/DoRA-on-LoCon scale numerator, scale = alpha/rank (alpha/√rank with ``rslora``); None -> rank.
    tucker: LoCon Tucker form (1×1 down, k×k mid core, 1×1 up) on convs with k > 1; ignored elsewhere.
    flora_ranks: FLoRA per-mode ranks (r₁, r₂[, r₃, r₄]); None -> (rank, rank, min(kh,2), min(kw,2)) / (rank, rank).
    scale: FLoRA's s. None -> 1.0: with sdtune's FLoRA init (orthonormal B, C, D; core std 1/√(3·r₂r₃r₄)) the
        folded down-projection has LoCon's kaiming variance, so s = 1 trains like LoCon at alpha = rank.
    dora_base: the low-rank ΔW inside DoRA ("locon" | "flora"); dora_axis: norm per "in" (kohya/A1111) or "out"
        (PEFT/LyCORIS ≥ 3.2) channel.
    spectral_mode: "additive" | "rotational"; slot: Spectral trains singular columns [slot·r, (slot+1)·r).
    path: "auto" (cost rule) | "bypass" | "materialise".
    ortho_basis_seed, ortho_index: orthogonal LoCon (Orthogonal Adaptation, Po et al. 2023). With a seed, LoCon's
        ``down`` is frozen (not trained) to rows [k·r, (k+1)·r) (k = ortho_index) of one seeded random orthogonal
        basis of R^{fan_in}; concepts trained with the same seed and different indices have mutually orthogonal
        input subspaces, so their ΔW fuse by a plain sum (plain LoCon, not Tucker or DoRA).
        ``ortho_pick`` "random" is the paper's uncoordinated form: the r rows are drawn at random from the whole
        basis (``functional.orthogonal_basis_pick``, the draw seeded by ortho_index, any integer, e.g. a concept's
        own ID), so concepts trained apart need no agreed blocks; two concepts share a row with probability about
        r²/fan_in per layer, which is why it needs wide layers.
    """

    algorithm: str = "locon"
    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    tucker: bool = False
    flora_ranks: tuple[int, ...] | None = None
    scale: float | None = None
    dora_base: str = "locon"
    dora_axis: str = "in"
    spectral_mode: str = "additive"
    slot: int = 0
    path: str = "auto"
    ortho_basis_seed: int | None = None
    ortho_index: int = 0
    ortho_pick: str = "block"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"AdapterSpec.{field}={getattr(self, field)!r}: {why}")

        if self.algorithm not in ALGORITHMS:
            raise bad("algorithm", f"expected one of {ALGORITHMS}")
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise bad(field, f"expected one of {choices}")
        for field in ("rank", "slot", "ortho_index"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if field == "rank" else 0):
                raise bad(field, "expected an integer >= " + ("1" if field == "rank" else "0"))
        if self.ortho_basis_seed is not None and (not isinstance(self.ortho_basis_seed, int)
                                                  or isinstance(self.ortho_basis_seed, bool)):
            raise bad("ortho_basis_seed", "expected an integer or None")
        for field in ("rslora", "tucker"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "expected a bool")
        for field in ("alpha", "scale"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value == 0):
                raise bad(field, "expected a finite non-zero number or None")
        if self.alpha is not None and self.alpha < 0:
            raise bad("alpha", "expected alpha > 0")
        if self.flora_ranks is not None:
            ranks = tuple(self.flora_ranks) if isinstance(self.flora_ranks, (list, tuple)) else None
            if ranks is None or len(ranks) not in (2, 4) or not all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
                raise bad("flora_ranks", "expected 2 (linear) or 4 (conv) positive integers")
            object.__setattr__(self, "flora_ranks", ranks)
        low_rank = self.algorithm if self.algorithm != "dora" else self.dora_base
        if self.alpha is not None and low_rank != "locon":
            raise bad("alpha", f"alpha scales LoCon only; {self.algorithm!r} does not use it"
                      + (" (use scale for FLoRA)" if low_rank == "flora" else ""))
        if self.scale is not None and low_rank != "flora":
            raise bad("scale", f"scale is FLoRA's s; {self.algorithm!r} does not use it (use alpha for LoCon)")
        if self.rslora and low_rank != "locon":
            raise bad("rslora", "rsLoRA scaling applies to LoCon only")
        if self.tucker and low_rank != "locon":
            raise bad("tucker", "the Tucker option is LoCon's; FLoRA is always a Tucker form")
        if self.flora_ranks is not None and low_rank != "flora":
            raise bad("flora_ranks", "only FLoRA uses per-mode ranks")
        if self.slot and self.algorithm != "spectral":
            raise bad("slot", "only Spectral uses slots")
        if self.ortho_basis_seed is not None and (self.algorithm != "locon" or self.tucker):
            raise bad("ortho_basis_seed", "the frozen orthogonal down-projection is a plain-LoCon option "
                      "(algorithm='locon', tucker=False)")
        if self.ortho_index and self.ortho_basis_seed is None:
            raise bad("ortho_index", "needs ortho_basis_seed (the shared basis it indexes)")
        if self.ortho_pick != "block" and self.ortho_basis_seed is None:
            raise bad("ortho_pick", "needs ortho_basis_seed (the shared basis it picks from)")

    @property
    def lora_scale(self) -> float:
        """LoCon's scale: alpha/r, or alpha/√r with rsLoRA (alpha defaults to r)."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def flora_scale(self) -> float:
        return 1.0 if self.scale is None else float(self.scale)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["flora_ranks"] is not None:
            d["flora_ranks"] = list(d["flora_ranks"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"AdapterSpec: unknown field(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of a wrapped layer. ``kernel`` is (1, 1) for Linear; fan_in = in·kh·kw."""

    is_conv: bool
    out: int
    inp: int
    kernel: tuple[int, int]
    stride: tuple[int, int]

    @property
    def fan_in(self) -> int:
        return self.inp * self.kernel[0] * self.kernel[1]

    @property
    def spatial(self) -> bool:
        return self.is_conv and self.kernel != (1, 1)


def layer_info(layer: nn.Module, name: str) -> LayerInfo:
    """Check that ``layer`` can be wrapped (nn.Linear, or nn.Conv2d with groups=1) and describe it."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"{name}: Conv2d with groups={layer.groups} is not supported (groups must be 1)")
        if isinstance(layer, nn.LazyConv2d) or layer.weight.dim() != 4:
            raise ValueError(f"{name}: uninitialised conv cannot be adapted")
        return LayerInfo(True, layer.out_channels, layer.in_channels, tuple(layer.kernel_size), tuple(layer.stride))
    if isinstance(layer, nn.Linear):
        return LayerInfo(False, layer.out_features, layer.in_features, (1, 1), (1, 1))
    raise ValueError(f"{name}: unsupported layer type {type(layer).__name__} (sdtune adapts nn.Linear and nn.Conv2d)")


def check_rank(name: str, what: str, rank: int, limit: int) -> None:
    if rank > limit:
        raise ValueError(f"{name}: {what} {rank} is larger than the layer allows ({limit})")


def choose_path(out: int, fan_in: int, rank: int, tokens: int, *, training: bool,
                delta_needed: bool = False) -> str:
    """Pick "bypass" or "materialise" for one call from a FLOP model (multiply-add = 2 FLOPs).

    O = out channels, I = fan-in (in·kh·kw), R = rank of the LoRA form, T = output tokens of the call
    (batch × output pixels for a conv, batch × sequence for a linear layer). Both paths pay the base op 2·O·I·T
    and, in training, its input gradient 2·O·I·T; only the differences count:

      materialise:  build W+ΔW: 2·O·R·I + O·I           training: + weight gradient of the full op 2·O·I·T
                                                                  + gradient back to the factors 4·O·R·I
      bypass:       low-rank path 2·R·T·(I+O) + add O·T  training: + its backward 4·R·T·(I+O) + O·T

    With ``delta_needed`` (DoRA, whose norm costs about 2·O·R·I on both paths: building W+ΔW, or its closed form
    ``lowrank_channel_norm`` on the bypass path) the build cost cancels. Memory follows the
    same split: materialising keeps an O·I weight (and in training its O·I gradient), bypass an R·T activation.
    In training the weight-gradient term makes bypass win for every layer of a Stable-Diffusion U-Net at any
    sensible rank; at inference large-T convs (e.g. 64×64 latents) are cheaper materialised.
    """
    mat = 0 if delta_needed else 2 * out * rank * fan_in + out * fan_in
    byp = 2 * rank * tokens * (fan_in + out) + out * tokens
    if training:
        mat += 2 * out * fan_in * tokens + (0 if delta_needed else 4 * out * rank * fan_in)
        byp += 4 * rank * tokens * (fan_in + out) + out * tokens
    return "materialise" if mat < byp else "bypass"


class LowRank(nn.Module):
    """Trainable factors of one low-rank update. Subclasses implement ``delta`` and ``lora_form``."""

    def __init__(self, info: LayerInfo, spec: AdapterSpec):
        super().__init__()
        self.info = info
        self.spec = spec

    def delta(self) -> Tensor:
        """ΔW with the base weight's shape, from the algorithm's own formula."""
        raise NotImplementedError

    def lora_form(self) -> tuple[Tensor, Tensor | None, Tensor, float]:
        """(up (out, R), mid (R, R', kh, kw) | None, down, scale) with ΔW = scale · up @ [mid] @ down.

        down is (R, in) for Linear and Tucker forms, (R, in, kh, kw) for a plain conv.
        """
        raise NotImplementedError

    @property
    def form_rank(self) -> int:
        """R of the LoRA form (what the bypass path costs)."""
        raise NotImplementedError

    def master_form(self, device_type: str) -> tuple[Tensor, Tensor | None, Tensor, float]:
        """``lora_form()`` in the factors' own precision, also under autocast: its small products hold
        cancellations (Spectral's R S Rᵀ − S) that bf16 rounding would ruin; only the full-size ops run low."""
        with torch.autocast(device_type, enabled=False):
            return self.lora_form()

    def path(self, base: nn.Module, x: Tensor, out: Tensor, form: tuple | None = None) -> Tensor:
        """out + ΔW·x through the LoRA form (``form``, or ``lora_form()`` when not given), without materialising ΔW.

        The up-projection is fused with the addition (addmm / baddbmm), so one full-size output is allocated
        instead of three (up output, scaled copy, sum). The path runs in x's dtype (``compute_dtype``: autocast's,
        or a low-precision base's): the factors stay fp32 masters and only their small copies are cast. A
        channels_last ``out`` stays channels_last: one (N·H·W, out) GEMM on its NHWC view, no layout copy.
        """
        up, mid, down, scale = form if form is not None else self.master_form(x.device.type)
        dt = x.dtype
        up = (up * scale if scale != 1.0 else up).to(dt)
        down, mid = down.to(dt), (mid.to(dt) if mid is not None else None)
        if not self.info.is_conv:
            h = F.linear(x, down)
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.T).view(out.shape)
        if mid is not None:
            h = base._conv_forward(F.conv2d(x, down[:, :, None, None]), mid, None)
        else:
            h = base._conv_forward(x, down, None)
        n, o, hh, ww = out.shape
        if is_channels_last(out):
            res = torch.addmm(out.permute(0, 2, 3, 1).reshape(-1, o), h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]),
                              up.T)
            return res.view(n, hh, ww, o).permute(0, 3, 1, 2)
        res = torch.baddbmm(out.reshape(n, o, hh * ww), up.expand(n, -1, -1), h.reshape(n, h.shape[1], hh * ww))
        return res.view(n, o, hh, ww)


def is_channels_last(t: Tensor) -> bool:
    """True for a 4-D tensor laid out NHWC in memory (and not also plain-contiguous, as 1×1 maps are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer's matmuls run in: autocast's for x's device when autocast is on (it casts every
    floating input but float64), else x's own (the base's storage dtype: fp32, or a bf16/fp16 base)."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _op(base: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The base layer's own op with another weight: F.linear, or the conv with its stride/padding/dilation/mode."""
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


class Adapter(nn.Module):
    """One frozen ``nn.Linear``/``nn.Conv2d`` (submodule ``base``) plus a trainable low-rank update (``lora``).

    forward(x): x (N, in, H, W) or (in, H, W) for a conv, (..., in) for a linear layer -> the base's output shape.
    """

    def __init__(self, base: nn.Module, spec: AdapterSpec, kohya_name: str, lora: LowRank):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.spec = spec
        self.kohya_name = kohya_name
        self.info = lora.info
        self.lora = lora
        self.merged = False

    # --- maths -------------------------------------------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """W_eff − W with the base weight's shape (exact; carries gradients to the factors)."""
        return self.lora.delta()

    def effective_weight(self) -> Tensor:
        """W + ΔW (the weight the materialised path uses)."""
        return self.original_weight() + self.delta_weight()

    def original_weight(self) -> Tensor:
        """The un-adapted weight W, also while merged."""
        w = self.base.weight
        return w - self.lora.delta().detach() if self.merged else w

    def num_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base.")]

    # --- forward -----------------------------------------------------------------------------------------
    def chosen_path(self, x: Tensor) -> str:
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.lora.parameters())
        if training and is_quantised(self.base):
            return "bypass"     # never W+ΔW from a quantised W in training (and no full-size weight gradient)
        if self.spec.path != "auto":
            return self.spec.path
        info = self.info
        tokens = max(1, x.numel() // info.inp // (info.stride[0] * info.stride[1]))
        return choose_path(info.out, info.fan_in, self.lora.form_rank, tokens, training=training,
                           delta_needed=self.spec.algorithm == "dora")

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        unbatched = self.info.is_conv and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        # Cast once for the base op and the low-rank path (autocast would cast x for each op it enters: two
        # full-size copies forward, two casts and an fp32 sum of the input gradients backward).
        x = x.to(compute_dtype(x))
        if self.chosen_path(x) == "materialise":
            with torch.autocast(x.device.type, enabled=False):  # weight algebra in the masters' precision
                w = self.effective_weight()
            y = _op(self.base, x, w.to(x.dtype), self.base.bias)
        else:
            y = self._bypass(x)
        return y.squeeze(0) if unbatched else y

    def _bypass(self, x: Tensor) -> Tensor:
        return self.lora.path(self.base, x, self.base(x))

    # --- merge -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: W + ΔW computed apart and checked finite (``functional.merged_weight``,
        sdtune's one merge rule), then assigned."""
        if self.merged:
            raise RuntimeError(f"{self.kohya_name}: adapter is already merged")
        if is_quantised(self.base):
            raise ValueError(f"{self.kohya_name}: the base weight is quantised ({self.base.kind}); merging would "
                             "re-quantise W+ΔW. Export the adapter and merge it into the full-precision model")
        self.base.weight.copy_(Fn.merged_weight(self.base.weight, self._merge_delta(), self.kohya_name))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{self.kohya_name}: adapter is not merged")
        self.base.weight.copy_(self._unmerged_weight())
        self.merged = False

    def _merge_delta(self) -> Tensor:
        """What merging adds to the base weight, in its dtype."""
        return self.lora.delta().to(self.base.weight.dtype)

    def _unmerged_weight(self) -> Tensor:
        return self.base.weight - self.lora.delta().to(self.base.weight.dtype)

    # --- export ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def kohya_tensors(self) -> dict[str, Tensor]:
        """Standard A1111/kohya tensors; alpha / lora_down.shape[0] · up @ [mid] @ down == delta_weight()."""
        return lora_form_tensors(self.lora, self.info)

    def extra_repr(self) -> str:
        return f"{self.kohya_name}: {self.spec.algorithm} R={self.lora.form_rank}, merged={self.merged}"


def lora_form_tensors(lora: LowRank, info: LayerInfo) -> dict[str, Tensor]:
    """The LoRA form as kohya tensors: square Tucker core (zero-padded), scale folded into alpha = scale·R."""
    up, mid, down, scale = (t.detach() if isinstance(t, Tensor) else t for t in lora.lora_form())
    if mid is not None:
        up, mid, down = Fn.pad_tucker(up, mid, down)
    rank = down.shape[0]
    if info.is_conv:
        up = up[:, :, None, None]
        if down.dim() == 2:
            down = down[:, :, None, None]
    out = {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
           "alpha": torch.tensor(scale * rank, dtype=torch.float32)}
    if mid is not None:
        out["lora_mid.weight"] = mid.contiguous()
    return out
