"""The optimiser of a training run: parameter groups and the optimiser class.

Groups. Every trainable adapter tensor gets the learning rate
    lr = base · block multiplier · (lora_plus_ratio if the tensor is a "B" factor else 1)
with base = optim.lr_unet (U-Net), optim.lr_text (text encoders; SDXL's second: optim.lr_text_2 when set) and the
block multiplier from the
``[[adapters]]`` rule that placed the adapter (``lr_multiplier``). Tensors with equal settings share one group.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): in ΔW = B·A with B = 0 at
init, B should learn faster than A, by a ratio λ ≈ 2⁴. "B" is the output-side, zero-initialised factor:
    LoCon     up (out, r); down and the Tucker mid are A.
    FLoRA     a_out, the output-mode factor (out, r₁), which starts at zero; the core G and the input/kernel
              factors (a_in, a_kh, a_kw) are A: they start orthonormal/random like LoCon's down.
    Spectral  the output-side tensor: a_u (additive) or q_u (rotational); a_v/q_v are A. Both sides start at zero,
              so LoRA+'s argument does not strictly apply: the ratio only makes the U side faster, or slower below
              1 (demo-spectral: 0.25, because a_u's term A_U·S₁V₁ᵀ reads the top input directions every prompt
              drives, and moved the class prompt with the concept).
    DoRA      the B of its low-rank update (LoCon's up or FLoRA's a_out); the magnitude m is A.

Optimisers (``optim.optimizer``) and what the learning rate means for each:
    adamw               torch AdamW: lr is the step size.
    adamw8bit           bitsandbytes AdamW8bit on CUDA (AdamW elsewhere): as adamw.
    prodigy             Prodigy (Mishchenko & Defazio 2023; extra ``prodigyopt``): it estimates the step size d
                        itself; lr multiplies d, so lr = 1 (lr_text = 0.5: half the U-Net's step).
    schedulefree_adamw  schedule-free AdamW (Defazio et al. 2024; extra ``schedulefree``): lr is the step size as
                        AdamW's, with no decay schedule (schedule.scheduler must be "constant"; the warm-up
                        applies). It keeps two weight sequences: training runs on y, previews, validation and
                        the export use the average x (``eval_weights``); checkpoints save y and the state of z.
    lion                Lion (Chen et al. 2023; extra ``lion-pytorch``): every step is lr·sign(update), so lr is
                        about 3–10× smaller than AdamW's (e.g. 1e-4 → 2e-5); betas [0.9, 0.99] in the paper.
    adafactor           Adafactor (transformers) with a fixed step: relative_step and scale_parameter off, so lr
                        is the step size as AdamW's (factored second moment, no first moment: less memory).
"""
from __future__ import annotations

import importlib
import math
from contextlib import contextmanager

import torch

from ..config import ConfigError

# optimiser -> (module, class, pip package) of the optional extras
_EXTRAS = {"prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
           "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
           "lion": ("lion_pytorch", "Lion", "lion-pytorch")}
B_FACTORS = ("lora.up", "lora.a_out", "lora.a_u", "lora.q_u")  # parameter names, see the module docstring


def lr_factor(kind: str, warmup: int, total: int):
    """The learning-rate multiplier per optimizer step (LambdaLR): linear warm-up over ``warmup`` steps, then
    ``kind`` = cosine (to 0 at ``total``), linear (to 0) or constant."""
    def factor(step: int) -> float:  # step = optimizer steps done
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def trainable(injection) -> list[tuple[str, torch.nn.Parameter]]:
    """("<adapter name>.<tensor name>", parameter) of every trainable adapter tensor, in adapter order."""
    return [(f"{name}.{n}", p) for name, adapter in injection.adapters.items()
            for n, p in adapter.trainable_named_parameters() if p.requires_grad]


def param_groups(injection, lr_unet: float, lr_text: float, lora_plus_ratio: float = 1.0,
                 lr_multipliers: dict[str, float] | None = None, lr_text_2: float | None = None) -> list[dict]:
    """Optimiser groups (see the module docstring). ``lr_multipliers``: adapter name -> block multiplier.
    Each group carries ``name`` ("unet", "text", "text2" (with ``lr_text_2``), + ".B" for LoRA+ factors, + "×m"
    for a block multiplier)."""
    base = {"unet": lr_unet, "text": lr_text, "text2": lr_text_2}
    groups: dict[tuple, dict] = {}
    for name, adapter in injection.adapters.items():
        component = injection.places[name].component
        kind = "unet" if component == "unet" else \
            "text2" if component == "text_encoder_2" and lr_text_2 is not None else "text"
        mult = (lr_multipliers or {}).get(name, 1.0)
        for tensor, p in adapter.trainable_named_parameters():
            if not p.requires_grad:
                continue
            is_b = lora_plus_ratio != 1.0 and tensor in B_FACTORS
            key = (kind, is_b, mult)
            if key not in groups:
                label = kind + (".B" if is_b else "") + (f"×{mult:g}" if mult != 1 else "")
                groups[key] = {"params": [], "name": label,
                               "lr": base[kind] * mult * (lora_plus_ratio if is_b else 1.0)}
            groups[key]["params"].append(p)
    return list(groups.values())


def rule_multipliers(injection, components, rules: list[tuple[str, float]]) -> dict[str, float]:
    """Adapter name -> the lr multiplier of the last rule (scoped preset, multiplier) that covers its layer."""
    from ..inject import preset_targets

    by_place: dict[tuple[str, str], float] = {}
    for preset, mult in rules:
        for key in preset_targets(preset, components, injection.arch):
            by_place[key] = mult
    return {name: by_place.get((place.component, place.path), 1.0) for name, place in injection.places.items()}


def build(kind: str, groups: list[dict], *, betas: tuple[float, float], eps: float, weight_decay: float,
          device: torch.device) -> torch.optim.Optimizer:
    """The optimiser ``kind`` over ``groups``; a missing optional package is a ConfigError naming the extra."""
    if kind in _EXTRAS:
        module, cls, package = _EXTRAS[kind]
        try:
            opt_cls = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise ConfigError(f"optim.optimizer = {kind!r} needs the {package} package: pip install "
                              f"'sdtune[optimizers]' (or pip install {package})") from None
        if kind == "lion":
            return opt_cls(groups, betas=betas, weight_decay=weight_decay)
        if kind == "prodigy":
            return opt_cls(groups, betas=betas, eps=eps, weight_decay=weight_decay)
        opt = opt_cls(groups, betas=betas, eps=eps, weight_decay=weight_decay)
        opt.train()  # schedule-free optimisers start in eval mode and refuse to step there
        return opt
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if kind == "adamw8bit":
        if device.type == "cuda":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("optim.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes "
                                  "(or choose 'adamw')") from None
            return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps, weight_decay=weight_decay)
        import warnings
        warnings.warn("optim.optimizer = 'adamw8bit' needs bitsandbytes on a CUDA GPU; using AdamW (fp32 states) on "
                      "this device", stacklevel=3)
    return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay)


def check_schedule(kind: str, scheduler: str) -> None:
    if kind == "schedulefree_adamw" and scheduler != "constant":
        raise ConfigError(f"optim.optimizer = 'schedulefree_adamw' replaces the decay schedule: set schedule.scheduler "
                          f"= 'constant' (now {scheduler!r}; schedule.warmup_steps still applies)")


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return "train_mode" in optimizer.param_groups[0]


@contextmanager
def eval_weights(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ema=None):
    """The weights outputs are made from, swapped in for the block: the EMA (if given), else schedule-free's
    average x (if that optimiser), else the raw ones (nothing to do). On exit the training weights come back
    bit for bit (schedule-free's own eval()/train() round trip is not exact), so previews never change training."""
    schedule_free = is_schedule_free(optimizer)
    if ema is None and not schedule_free:
        yield
        return
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            if ema is not None:
                ema.copy_to(params)
            else:
                optimizer.eval()
        yield
    finally:
        with torch.no_grad():
            if schedule_free and ema is None:
                optimizer.train()
            for p, s in zip(params, saved):
                p.copy_(s)
