"""The training configuration: one typed schema, loaded from TOML, validated field by field.

    cfg = load_config("train_configs/demo.toml", overrides=["train.steps=50", "optim.lr_unet=2e-4"])

Each section is a dataclass whose fields carry their help text (``describe()`` prints them all) and whose
``__post_init__`` checks values. Unknown keys, wrong types and bad values raise ``ConfigError`` naming the key
(``[train] stpes``) and the closest valid one. ``--set section.key=value`` overrides are parsed as TOML values
and typed by the schema; ``adapters.N.key=value`` changes rule N, ``adapters.key=value`` every rule,
``adapters=[{preset = "attn", …}, …]`` replaces the whole table.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import operator
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .adapters import AdapterSpec
from .data.intake import DEFAULT_MAX_PIXELS, parse_colour


# optimizer names [optim] accepts; what each builds is train/optim.py's
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "schedulefree_adamw", "lion", "adafactor")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what would be valid."""


def f(default, help: str, *, input_path: bool = False):
    """A field with its help text (a fresh copy for list defaults).

    ``input_path``: a file or folder the run reads; written relative in a TOML file, it is relative to that file's
    folder (so a recipe travels with its data), while outputs and caches stay relative to the working directory.
    """
    metadata = {"help": help, "input_path": input_path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def resolve_input_paths(cls, table: dict, folder: Path) -> None:
    """Make the relative ``input_path`` values of one TOML table relative to ``folder`` (in place)."""
    for f_ in fields(cls):
        value = table.get(f_.name)
        if f_.metadata.get("input_path") and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            table[f_.name] = os.path.normpath(folder / value)


def _choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"[{section}] {name} = {value!r}: expected one of {', '.join(map(repr, choices))}{hint}")


def _check(section: str, ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {name} = {value!r}: {why}")


@dataclass
class ModelConfig:
    path: str | None = f(None, "base model: a diffusers folder or a single-file .safetensors; unset = the embedded "
                               "assets/tiny-sd", input_path=True)
    single_file_config: str | None = f(None, "diffusers folder with the architecture's configs, for a single file",
                                       input_path=True)
    allow_pickle: bool = f(False, "allow .ckpt/.pt pickle checkpoints (unpickling runs code: trusted files only)")
    svd_cache_dir: str | None = f(None, "where Spectral adapters cache their SVDs; unset = <output.dir>/svd_cache")


@dataclass
class SubsetConfig:
    """One [[data.subsets]] table: a folder with its own repeats and captions; unset keys take [data]'s value."""

    dir: str = f("", "folder of this subset's images", input_path=True)
    repeats: int = f(1, "how often each image appears per epoch (an epoch is Σ images × repeats)")
    is_reg: bool = f(False, "these are your own regularisation (class) images, trained with prior_loss_weight")
    prompt: str | None = f(None, "the folder's prompt for images without a caption file (kohya class_tokens)")
    class_prompt: str | None = f(None, "with prior preservation: class images are generated with this prompt "
                                       "for this subset (unset = prior.class_prompt)")
    caption_ext: str | None = f(None, "caption file extension")
    recursive: bool | None = f(None, "also read sub-folders")
    shuffle_tags: bool | None = f(None, "shuffle the tags after keep_tags")
    keep_tags: int | None = f(None, "tags kept in place")
    tag_dropout: float | None = f(None, "per-tag dropout probability")
    caption_dropout: float | None = f(None, "whole-caption dropout probability")
    trigger_word: str | None = f(None, "word put in front of every caption")
    mask_dir: str | None = f(None, "folder of masks named like the images", input_path=True)
    alpha_mask: bool | None = f(None, "the alpha channel is the mask")

    def __post_init__(self) -> None:
        s = "data.subsets"
        _check(s, bool(self.dir), "dir", self.dir, "required: the subset's folder")
        _check(s, self.repeats >= 1, "repeats", self.repeats, "expected >= 1")
        _check(s, self.keep_tags is None or self.keep_tags >= 0, "keep_tags", self.keep_tags, "expected >= 0")
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            _check(s, v is None or 0 <= v < 1, name, v, "expected a probability in [0, 1)")


@dataclass
class DataConfig:
    instance_dir: str = f("", "folder of instance images (png, jpg, jpeg, webp, bmp); may be left out when "
                              "[[data.subsets]] name the folders", input_path=True)
    subsets: list[SubsetConfig] = f([], "[[data.subsets]] tables: several folders (concepts, your own "
                                        "regularisation images) with their own repeats and caption settings")
    dataset_config: str | None = f(None, "a kohya sd-scripts dataset_config TOML ([[datasets]] / "
                                         "[[datasets.subsets]]): its keys are mapped onto these; unknown keys are "
                                         "refused by name", input_path=True)
    instance_prompt: str | None = f(None, "the folder's prompt: the caption of every image without a caption file "
                                          "(<image stem><caption_ext>); unset = every image needs one")
    caption_ext: str = f(".txt", "caption file extension (BOM, CRLF and extra whitespace are removed)")
    recursive: bool = f(False, "also read sub-folders (false: they are named in a warning and skipped)")
    repeats: int = f(1, "how often each instance image appears per epoch")
    resolution: int | None = f(None, "training resolution in pixels (multiple of 8); unset = the model's native one. "
                                     "With buckets, each bucket holds about resolution² pixels")
    crop: str = f("center", "center | random: where the bucket's window is cut from the resized image")
    flip: bool = f(False, "random horizontal flips (not for asymmetric subjects: text, logos)")
    skip_bad_images: bool = f(False, "skip unreadable or too-small images (named in a warning) instead of stopping")
    cache_latents: bool = f(True, "encode each image once (center crop only; flipped copies are cached too)")
    latent_cache_dir: str | None = f(None, "keep the cached latents in this folder instead of memory: reused across "
                                           "runs and subsets, keyed by image content, bucket, crop, flip and the "
                                           "VAE (for datasets larger than memory)")
    max_pixels: int = f(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this, read from the header before "
                                            "decoding (decompression bombs; Pillow's own limit is ~179 M)")
    alpha_background: str = f("white", "colour that transparent pixels are composited onto: a name or '#rrggbb'")
    mask_dir: str | None = f(None, "masked loss: folder of masks named like the images (white = learn, black = "
                                   "ignore; grey weighs in between), applied to the loss in latent space",
                             input_path=True)
    alpha_mask: bool = f(False, "masked loss: an image's own alpha channel is its mask (opaque = learn)")
    buckets: bool = f(True, "aspect-ratio bucketing: each image trains at the bucket shape nearest its own, "
                            "batches are drawn within a bucket; false = every image cropped to a square")
    bucket_min_side: int | None = f(None, "smallest bucket side in pixels; unset = resolution / 2")
    bucket_max_side: int | None = f(None, "largest bucket side in pixels; unset = 2 × resolution")
    bucket_max_aspect: float = f(2.0, "largest long/short side ratio of a bucket")
    bucket_step: int | None = f(None, "step between bucket sides; unset = the model's side multiple "
                                      "(VAE scale × 2^U-Net downsamplings: 64 for SD 1.x/SDXL)")
    bucket_upscale: bool = f(False, "let an image smaller than its bucket be upscaled (false: it goes to a bucket "
                                    "it covers, or is listed as too small)")
    shuffle_tags: bool = f(False, "shuffle the comma-separated tags of each caption per view (kohya shuffle_caption)")
    keep_tags: int = f(0, "the first N tags keep their place when shuffled or dropped (kohya keep_tokens)")
    tag_separator: str = f(",", "what separates tags in a caption")
    tag_dropout: float = f(0.0, "drop each tag after the kept ones with this probability")
    caption_dropout: float = f(0.0, "train on the empty caption with this probability (for classifier-free guidance)")
    trigger_word: str | None = f(None, "put this word in front of every caption that does not start with it")

    def __post_init__(self) -> None:
        s = "data"
        _check(s, bool(self.instance_dir) or bool(self.subsets), "instance_dir", self.instance_dir,
               "required: the folder of instance images (or [[data.subsets]])")
        _check(s, self.repeats >= 1, "repeats", self.repeats, "expected >= 1")
        _check(s, self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0), "resolution",
               self.resolution, "expected a multiple of 8")
        _choice(s, "crop", self.crop, ("center", "random"))
        _check(s, self.caption_ext.startswith("."), "caption_ext", self.caption_ext, "expected e.g. '.txt'")
        _check(s, self.max_pixels >= 1, "max_pixels", self.max_pixels, "expected >= 1")
        try:
            parse_colour(self.alpha_background)
        except ValueError as e:
            raise ConfigError(f"[data] alpha_background = {self.alpha_background!r}: {e}") from None
        for name in ("bucket_min_side", "bucket_max_side", "bucket_step"):
            v = getattr(self, name)
            _check(s, v is None or v >= 8, name, v, "expected >= 8 pixels")
        _check(s, self.bucket_max_aspect >= 1, "bucket_max_aspect", self.bucket_max_aspect, "expected >= 1")
        _check(s, self.keep_tags >= 0, "keep_tags", self.keep_tags, "expected >= 0")
        _check(s, bool(self.tag_separator), "tag_separator", self.tag_separator, "expected e.g. ','")
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            _check(s, 0 <= v < 1, name, v, "expected a probability in [0, 1)")

    def folders(self) -> list[SubsetConfig]:
        """Every folder the run reads, as subsets: ``instance_dir`` (with [data]'s own repeats and prompt) first,
        then the [[data.subsets]]."""
        if not self.instance_dir:
            return list(self.subsets)
        return [SubsetConfig(dir=self.instance_dir, repeats=self.repeats, prompt=self.instance_prompt), *self.subsets]


@dataclass
class PriorConfig:
    enabled: bool = f(False, "prior preservation: also train on class images with class_prompt")
    class_prompt: str = f("", "prompt of the class the subject belongs to, e.g. 'a star'; alternatives "
                               "separated by '|' are cycled (a style's class: 'a circle | a square | a star')")
    class_dir: str | None = f(None, "class-image cache (generated by the base model on first use); "
                                    "unset = <output.dir>/class_images")
    num_class_images: int = f(100, "number of class images (missing ones are generated; with buckets, shared out over "
                                   "the instance buckets' shapes in proportion, at least one each)")
    prior_loss_weight: float = f(1.0, "weight of the class-image loss")
    text_prior_weight: float = f(0.0, "keep the trained text encoders' encoding of the class prompt(s) at the base's: "
                                      "adds this × ‖E(class) − E_base(class)‖² / ‖E_base(class)‖² to the loss; "
                                      "0 = off, no effect without train.train_text_encoder")
    sample_steps: int = f(20, "sampler steps when generating class images")
    guidance: float = f(5.0, "classifier-free guidance when generating class images")

    def __post_init__(self) -> None:
        if self.enabled:
            _check("prior", bool(self.class_prompt.strip()), "class_prompt", self.class_prompt,
                   "required when prior preservation is enabled")
        _check("prior", self.num_class_images >= 1, "num_class_images", self.num_class_images, "expected >= 1")
        _check("prior", self.prior_loss_weight >= 0, "prior_loss_weight", self.prior_loss_weight, "expected >= 0")
        _check("prior", self.text_prior_weight >= 0, "text_prior_weight", self.text_prior_weight, "expected >= 0")
        _check("prior", self.sample_steps >= 1, "sample_steps", self.sample_steps, "expected >= 1")


# Help for each [[adapters]] key: the preset, then every AdapterSpec field (the rule takes their types and defaults
# from AdapterSpec, so a new field fails here until it has its help).
_RULE_HELP = {
    "preset": "attn | resnet | sample | te (te: the text encoder(s); needs train.train_text_encoder)",
    "algorithm": "locon | flora | dora | spectral",
    "rank": "rank (Spectral: singular columns trained)",
    "alpha": "LoCon/DoRA scale numerator (scale = alpha/rank); unset = rank",
    "rslora": "LoCon: alpha/sqrt(rank) scaling",
    "tucker": "LoCon: Tucker form on k×k convs",
    "flora_ranks": "FLoRA per-mode ranks [r1, r2] or [r1, r2, r3, r4]",
    "scale": "FLoRA's scale s; unset = 1 (small ranks learn slowly at 1: demo-flora-small uses 4)",
    "dora_base": "DoRA's low-rank update: locon | flora",
    "dora_axis": "DoRA norm axis: in (A1111/kohya) | out (PEFT)",
    "spectral_mode": "Spectral: additive | rotational",
    "slot": "Spectral: train singular columns [slot·rank, (slot+1)·rank) (disjoint slots fuse cleanly)",
    "path": "auto | bypass | materialise (forward path; auto = cost rule)",
    "ortho_basis_seed": "LoCon: freeze `down` to rows of a seeded orthogonal basis shared by concepts (Orthogonal "
                        "Adaptation); unset = trained down",
    "ortho_index": "LoCon with ortho_basis_seed: this concept's block of basis rows (one index per concept); with "
                   "ortho_pick = 'random', the seed of its random rows",
    "ortho_pick": "LoCon with ortho_basis_seed: block (rows [index·rank, (index+1)·rank), exactly orthogonal to "
                  "other indices) | random (rows drawn from the whole basis: no agreed indices, wide layers)",
}


def _toml_type(tp):
    """An AdapterSpec type as TOML gives it: tuples arrive as arrays (lists)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return list[args[0]]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_toml_type(a) for a in args))
    return tp


class _Rule:
    def __post_init__(self) -> None:
        from .adapters import PRESETS
        from .scope import check

        _choice("adapters", "preset", self.preset, PRESETS)
        why = check(self.preset, self.blocks, self.layers)
        if why:
            raise ConfigError(f"[[adapters]] preset {self.preset!r}: {why}")
        _check("adapters", math.isfinite(self.lr_multiplier) and self.lr_multiplier > 0, "lr_multiplier",
               self.lr_multiplier, "expected a positive number")
        try:
            self.spec()
        except ValueError as e:
            raise ConfigError(f"[[adapters]] preset {self.preset!r}: {e}") from None

    def spec(self) -> AdapterSpec:
        d = {f_.name: getattr(self, f_.name) for f_ in fields(AdapterSpec)}
        d["flora_ranks"] = tuple(d["flora_ranks"]) if d["flora_ranks"] is not None else None
        return AdapterSpec(**d)


_SPEC_TYPES = typing.get_type_hints(AdapterSpec)
AdapterRule = make_dataclass(
    "AdapterRule",
    [("preset", str, f("attn", _RULE_HELP["preset"]))]
    + [(f_.name, _toml_type(_SPEC_TYPES[f_.name]), f(f_.default, _RULE_HELP[f_.name])) for f_ in fields(AdapterSpec)]
    + [("blocks", list[str], f([], "U-Net blocks this rule covers: down_blocks.N, mid_block, up_blocks.N, other "
                                   "(outside the stacks); empty = all. Per-block rank/alpha: a later rule with "
                                   "blocks overrides an earlier one there")),
       ("layers", list[int] | None, f(None, "preset 'te': text-encoder layers [first, last] (inclusive) this rule "
                                            "covers; unset = all")),
       ("lr_multiplier", float, f(1.0, "multiplies optim.lr_unet / lr_text for the layers this rule places"))],
    bases=(_Rule,))
AdapterRule.__module__ = __name__
AdapterRule.__doc__ = ("One [[adapters]] table: a target preset and the AdapterSpec it gets (``spec()``); later rules "
                       "override earlier ones.")


@dataclass
class OptimConfig:
    optimizer: str = f("adamw", "adamw | adamw8bit (bitsandbytes, CUDA only; AdamW elsewhere) | prodigy (lr "
                                "multiplies its own step-size estimate: use 1.0) | schedulefree_adamw (AdamW's lr, "
                                "no decay schedule) | lion (lr 3-10x below AdamW's) | adafactor (AdamW's lr). "
                                "prodigy, schedulefree_adamw and lion need pip install 'sdtune[optimizers]'; "
                                "details in sdtune/train/optim.py")
    lr_unet: float = f(1e-4, "learning rate of the U-Net adapters")
    lr_text: float = f(5e-5, "learning rate of the text-encoder adapters")
    lr_text_2: float | None = f(None, "learning rate of SDXL's second text encoder's (te2) adapters; unset = lr_text")
    weight_decay: float = f(0.0, "AdamW weight decay")
    betas: list[float] = f([0.9, 0.999], "AdamW betas")
    eps: float = f(1e-8, "AdamW epsilon")
    grad_clip: float | None = f(1.0, "clip the gradient norm to this value; unset = no clipping")
    lora_plus_ratio: float = f(1.0, "LoRA+: the 'B' factors learn at ratio x the lr (1 = off; LoRA+ paper: 16). "
                                    "B = LoCon's up, FLoRA's a_out (core and in/kernel factors are A), Spectral's "
                                    "output side a_u/q_u, DoRA's low-rank B (magnitude is A)")

    def __post_init__(self) -> None:
        _choice("optim", "optimizer", self.optimizer, OPTIMIZERS)
        _check("optim", math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0, "lora_plus_ratio",
               self.lora_plus_ratio, "expected a positive number")
        for name in ("lr_unet", "lr_text", "lr_text_2"):
            v = getattr(self, name)
            _check("optim", v is None or (math.isfinite(v) and v > 0), name, v, "expected a positive number")
        _check("optim", self.weight_decay >= 0, "weight_decay", self.weight_decay, "expected >= 0")
        _check("optim", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", self.betas,
               "expected two numbers in [0, 1)")
        _check("optim", self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "expected > 0")


@dataclass
class ScheduleConfig:
    scheduler: str = f("constant", "constant | cosine | linear (after the warm-up)")
    warmup_steps: int = f(0, "linear warm-up steps")

    def __post_init__(self) -> None:
        _choice("schedule", "scheduler", self.scheduler, ("constant", "cosine", "linear"))
        _check("schedule", self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "expected >= 0")


TEXT_ENCODERS = {"te1": "text_encoder", "te2": "text_encoder_2"}  # train.text_encoders -> pipeline components


@dataclass
class TrainSection:
    steps: int | None = f(None, "optimizer steps (give steps or epochs)")
    epochs: int | None = f(None, "passes over the instance images × repeats (give steps or epochs)")
    batch_size: int = f(1, "instance images per micro-batch and process (class images are added on top)")
    grad_accum: int = f(1, "micro-batches per optimizer step")
    mixed_precision: str = f("no", "no | fp16 | bf16 (GPU; a CPU always trains in fp32)")
    gradient_checkpointing: bool = f(False, "recompute activations in the backward pass (less memory, slower)")
    base_dtype: str = f("fp32", "fp32 | bf16 | fp16: storage of the frozen base (half the memory; needs the same "
                                "mixed_precision); adapter weights stay fp32")
    base_quant: str = f("none", "none | int8 | nf4: quantise the adapted layers' frozen weights (nf4 needs "
                                "bitsandbytes); the exported adapter is exact against the dequantised base")
    noise_offset: float = f(0.0, "add offset·N(0,1) per channel to the noise (darker/brighter images)")
    min_snr_gamma: float | None = f(None, "min-SNR-γ loss weighting (Hang et al. 2023), e.g. 5; unset = off")
    debiased_estimation: bool = f(False, "debiased-estimation loss weighting 1/√SNR (Yu et al. 2024); combines with "
                                         "min_snr_gamma by product")
    zero_terminal_snr: bool = f(False, "rescale the betas to zero terminal SNR (Lin et al. 2024; v-prediction bases "
                                       "only); previews then sample with trailing timesteps")
    seed: int = f(0, "seed of everything: adapter init, data order, noise")
    train_text_encoder: bool = f(False, "train text-encoder adapters (the 'te' preset; added with the first rule's "
                                        "settings if no [[adapters]] rule names it)")
    text_encoder_steps: int | None = f(None, "train the text encoders' adapters for the first N steps only, then "
                                             "freeze them and cache their outputs (kohya stop_text_encoder_training);"
                                             " unset = the whole run")
    text_encoders: list[str] = f(["te1", "te2"], "which text encoders train_text_encoder trains: te1 (CLIP-L, the "
                                                 "only one of SD1/SD2), te2 (SDXL's second); the others stay frozen "
                                                 "and their outputs are cached")
    ema_decay: float | None = f(None, "keep an exponential moving average of the adapter weights with this decay "
                                      "(e.g. 0.999: about the last 1000 steps); unset = off")
    ema_warmup_steps: int = f(0, "EMA warm-up: the decay ramps linearly from 0 to ema_decay over this many steps")
    ema_on_cpu: bool = f(False, "keep the EMA copy in CPU memory (saves GPU memory, one copy per step)")
    ema_outputs: str = f("ema", "ema | raw: which weights previews, validation loss and the exported adapter use "
                                "when ema_decay is set (checkpoints keep both)")
    validation_images: int = f(0, "hold this many instance images out of training (chosen by seed) for the "
                                  "validation loss (log.csv val_loss, loss.png); 0 = no validation loss")
    validation_every: int = f(0, "validation loss every N steps, at fixed timesteps and noise (and at the last "
                                 "step); 0 = the last step only")

    def __post_init__(self) -> None:
        s = "train"
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"[train] give exactly one of steps and epochs (steps = {self.steps!r}, "
                              f"epochs = {self.epochs!r})")
        for name in ("steps", "epochs"):
            v = getattr(self, name)
            _check(s, v is None or v >= 1, name, v, "expected >= 1")
        _check(s, self.batch_size >= 1, "batch_size", self.batch_size, "expected >= 1")
        _check(s, self.grad_accum >= 1, "grad_accum", self.grad_accum, "expected >= 1")
        _choice(s, "mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice(s, "base_dtype", self.base_dtype, ("fp32", "bf16", "fp16"))
        _choice(s, "base_quant", self.base_quant, ("none", "int8", "nf4"))
        _check(s, self.base_dtype in ("fp32", self.mixed_precision), "base_dtype", self.base_dtype,
               f"a {self.base_dtype} base needs mixed_precision = {self.base_dtype!r} (autocast runs its layers)")
        _check(s, self.noise_offset >= 0, "noise_offset", self.noise_offset, "expected >= 0")
        _check(s, bool(self.text_encoders) and set(self.text_encoders) <= {"te1", "te2"}
               and len(set(self.text_encoders)) == len(self.text_encoders), "text_encoders", self.text_encoders,
               "expected a non-empty list of distinct 'te1', 'te2'")
        _check(s, self.text_encoder_steps is None or self.text_encoder_steps >= 1, "text_encoder_steps",
               self.text_encoder_steps, "expected >= 1, or unset for the whole run")
        _check(s, self.text_encoder_steps is None or self.train_text_encoder, "text_encoder_steps",
               self.text_encoder_steps, "needs train_text_encoder = true")
        _check(s, self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", self.min_snr_gamma,
               "expected > 0")
        _check(s, self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", self.ema_decay,
               "expected a number in (0, 1), e.g. 0.999")
        _check(s, self.ema_warmup_steps >= 0, "ema_warmup_steps", self.ema_warmup_steps, "expected >= 0")
        _choice(s, "ema_outputs", self.ema_outputs, ("ema", "raw"))
        for name in ("validation_images", "validation_every"):
            _check(s, getattr(self, name) >= 0, name, getattr(self, name), "expected >= 0")

    def trained_text_encoders(self, components) -> list[str]:
        """The component names of the text encoders this run trains, among the model's ``components`` (none
        without train_text_encoder); a ConfigError when none of ``text_encoders`` exists in the model."""
        if not self.train_text_encoder:
            return []
        names = [TEXT_ENCODERS[k] for k in self.text_encoders if TEXT_ENCODERS[k] in components]
        if not names:
            raise ConfigError(f"[train] text_encoders = {self.text_encoders}: this model has no te2 (SD1/SD2 have one "
                              f"text encoder, te1); use ['te1'] or set train_text_encoder = false")
        return names


@dataclass
class OutputConfig:
    dir: str = f("outputs/run", "run folder: adapter files, config.toml, log.csv, loss.png, samples/, checkpoints/")
    checkpoint_every: int = f(0, "save a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = f(2, "keep the last K checkpoints")
    save_every: int = f(0, "also export the A1111 file every N steps, as adapter-step-000200.safetensors (the weights "
                           "the final file gets: the EMA when kept), to pick a step by its samples; 0 = only the "
                           "final adapter.safetensors")
    sample_every: int = f(0, "preview grid of the validation prompts every N steps (0 = only at the end)")
    validation_prompts: list[str] = f([], "prompts of the preview grids (none = no previews)")
    sample_steps: int = f(20, "sampler steps of the previews")
    sample_count: int = f(2, "images per validation prompt")
    sample_seed: int = f(0, "seed of the previews (the same images every time)")
    sample_guidance: float = f(5.0, "classifier-free guidance of the previews")
    sample_guidance_rescale: float = f(0.0, "guidance rescale φ of the previews (Lin et al. 2024; 0.7 suits "
                                            "zero_terminal_snr), in [0, 1]")
    export_dtype: str = f("fp16", "fp16 | bf16 | fp32: tensor type of the A1111 file")
    name: str | None = f(None, "base name of the A1111 file's ss_output_name; unset = the run folder's name")
    sample_strengths: list[float] = f([1.0], "adapter strengths of the preview grid, one row per prompt and strength "
                                             "(e.g. [0.5, 1.0]); other than [1.0], previews apply the A1111 file at "
                                             "each strength as A1111 does")
    preview_blocks: str | None = f(None, "block weights of the preview grids, in A1111's LoRA-block-weight notation "
                                         "(as sample --blocks: a preset such as \"MIDD\", a 17/26-value SD1 or "
                                         "12/20-value SDXL vector, or BLOCK=VALUE pairs such as \"mid_block=0\"); "
                                         "previews then apply the A1111 file with them; unset = none")
    wandb_project: str | None = f(None, "also log loss, lr, validation loss and previews to this Weights & Biases "
                                        "project (pip install wandb; WANDB_MODE=offline works without an account); "
                                        "TensorBoard logs whenever tensorboard is installed")

    def __post_init__(self) -> None:
        s = "output"
        _check(s, bool(self.dir), "dir", self.dir, "required")
        for name in ("checkpoint_every", "sample_every", "save_every"):
            _check(s, getattr(self, name) >= 0, name, getattr(self, name), "expected >= 0")
        _check(s, self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "expected >= 1")
        _check(s, self.sample_steps >= 1 and self.sample_count >= 1, "sample_steps/sample_count",
               (self.sample_steps, self.sample_count), "expected >= 1")
        _choice(s, "export_dtype", self.export_dtype, ("fp16", "bf16", "fp32"))
        _check(s, bool(self.sample_strengths) and all(math.isfinite(v) for v in self.sample_strengths),
               "sample_strengths", self.sample_strengths, "expected a non-empty list of numbers")
        _check(s, 0 <= self.sample_guidance_rescale <= 1, "sample_guidance_rescale", self.sample_guidance_rescale,
               "expected a number in [0, 1]")
        if self.preview_blocks is not None:  # the model is not loaded yet: the spec must fit some architecture
            errors = [self._blocks_error(arch) for arch in ("sd1", "sdxl")]
            if all(errors):
                raise ConfigError(errors[0])

    def _blocks_error(self, arch: str) -> str | None:
        """Why ``preview_blocks`` does not parse for ``arch`` (``sdtune.blocks.parse``), or None."""
        from .blocks import parse

        try:
            parse(self.preview_blocks, arch)
        except ValueError as e:
            return f"[output] preview_blocks = {self.preview_blocks!r}: " + \
                str(e).removeprefix(f"block weights {self.preview_blocks!r}: ")
        return None

    def preview_blocks_for(self, arch: str) -> str | None:
        """``preview_blocks`` checked against the loaded model's architecture (a 12-value vector is SDXL's, a
        17-value one SD1/SD2's); a ConfigError naming the key when it does not fit."""
        error = self._blocks_error(arch) if self.preview_blocks is not None else None
        if error:
            raise ConfigError(error)
        return self.preview_blocks


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "prior": PriorConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "train": TrainSection, "output": OutputConfig}


@dataclass
class TrainConfig:
    """The whole training run. ``adapters`` is the per-target table (later rules override earlier ones)."""

    data: DataConfig
    adapters: list[AdapterRule]
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=100))
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ConfigError("[[adapters]]: at least one rule is required, e.g. [[adapters]] preset = \"attn\"")
        has_te = any(r.preset == "te" for r in self.adapters)
        if has_te and not self.train.train_text_encoder:
            raise ConfigError("[[adapters]] preset = 'te' trains the text encoder: set [train] train_text_encoder = "
                              "true, or remove the rule")

    def rules(self) -> list[tuple[str, AdapterSpec]]:
        """(preset, AdapterSpec) for ``inject.attach``; adds 'te' with the first rule's settings if asked."""
        from .scope import scoped

        out = [(scoped(r.preset, r.blocks, r.layers), r.spec()) for r in self.adapters]
        if self.train.train_text_encoder and not any(r.preset == "te" for r in self.adapters):
            out.append(("te", out[0][1]))
        return out

    def lr_multipliers(self) -> list[tuple[str, float]]:
        """(scoped preset, lr multiplier) of every rule, in rule order: a layer takes the multiplier of the last
        rule that covers it (the rule that placed its adapter)."""
        from .scope import scoped

        return [(scoped(r.preset, r.blocks, r.layers), r.lr_multiplier) for r in self.adapters]

    def to_dict(self) -> dict:
        d = {name: _section_dict(getattr(self, name)) for name in ("model", "data", "prior", "optim", "schedule",
                                                                    "train", "output")}
        d["adapters"] = [_section_dict(r) for r in self.adapters]
        return d

    def to_toml(self) -> str:
        """The resolved config as TOML (unset values are omitted; loading it back gives an equal config)."""
        lines = []
        d = self.to_dict()
        for name, section in d.items():
            for table in (section if name == "adapters" else [section]):
                lines.append(f"\n[[{name}]]" if name == "adapters" else f"\n[{name}]")
                lines += _table_lines(name, table)
        return "\n".join(lines).lstrip() + "\n"


def _section_dict(obj) -> dict:
    """The fields of a section as a dict; nested tables (``[[data.subsets]]``) as lists of dicts."""
    d = {f_.name: getattr(obj, f_.name) for f_ in fields(obj)}
    return {k: [_section_dict(x) for x in v] if isinstance(v, list) and v and is_dataclass(v[0]) else v
            for k, v in d.items()}


def _table_lines(name: str, table: dict) -> list[str]:
    """``key = value`` lines of one table, then its nested tables as ``[[name.key]]``."""
    nested = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None and k not in nested]
    for key, items in nested.items():
        for item in items:
            lines += [f"\n[[{name}.{key}]]", *_table_lines(f"{name}.{key}", item)]
    return lines


# ------------------------------------------------------------------------------------------------ typing

def _type_ok(value, tp) -> bool:
    """Is ``value`` (as TOML gives it) of the annotated type? ints pass for floats; bools never pass for numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if is_dataclass(tp):
        return isinstance(value, dict)  # a nested table: _build checks its keys
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "tables" if is_dataclass(item) else f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _build(cls: type, section: str, table) -> object:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f_.name for f_ in fields(cls)]
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"[{section}] unknown key {key!r}{hint}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected {_type_name(hints[key])}, "
                              f"got {type(value).__name__}")
        kwargs[key] = float(value) if hints[key] in (float, float | None) and isinstance(value, int) else value
        if typing.get_origin(hints[key]) is list and is_dataclass(item := typing.get_args(hints[key])[0]):
            kwargs[key] = [_build(item, f"{section}.{key}.{i}", v) for i, v in enumerate(value)]
    missing = [f_.name for f_ in fields(cls) if f_.default is MISSING and f_.default_factory is MISSING
               and f_.name not in kwargs]
    if missing:
        raise ConfigError(f"[{section}] missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def from_dict(d: dict) -> TrainConfig:
    """Build and validate a TrainConfig from a TOML-shaped dict."""
    valid = [*SECTIONS, "adapters"]
    for key in d:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            raise ConfigError(f"unknown section [{key}]" + (f"; did you mean [{near[0]}]?" if near else
                                                            f"; valid sections: {', '.join(valid)}"))
    if "data" not in d:
        raise ConfigError("[data] is required (at least instance_dir)")
    if isinstance(d["data"], dict) and d["data"].get("dataset_config") is not None:
        from .data.kohya import KohyaDatasetError, merge

        if not isinstance(d["data"]["dataset_config"], str):
            raise ConfigError(f"[data] dataset_config = {d['data']['dataset_config']!r}: expected a file name")
        try:
            d = {**d, "data": merge(d["data"], lambda table, folder: resolve_input_paths(SubsetConfig, table, folder))}
        except KohyaDatasetError as e:
            raise ConfigError(f"[data] dataset_config: {e}") from None
    rules = d.get("adapters", [])
    if not isinstance(rules, list):
        raise ConfigError("adapters must be an array of tables: write [[adapters]], not [adapters]")
    kwargs = {name: _build(cls, name, d[name]) for name, cls in SECTIONS.items() if name in d}
    return TrainConfig(adapters=[_build(AdapterRule, f"adapters.{i}", r) for i, r in enumerate(rules)], **kwargs)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: --set data.instance_prompt=a sks star


def apply_override(d: dict, item: str) -> None:
    """Apply one ``section.key=value`` (or ``adapters[.N].key=value``) to a TOML-shaped dict, in place."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if sep and parts == ["adapters"]:  # the whole table: adapters=[{preset = "attn", rank = 4}, …]
        rules = _parse_value(text.strip())
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise ConfigError(f"--set {item!r}: expected adapters=[{{preset = \"attn\", …}}, …] (TOML inline tables)")
        d["adapters"] = rules
        return
    if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[0] != "adapters"):
        raise ConfigError(f"--set {item!r}: expected section.key=value (or adapters.N.key=value)")
    value = _parse_value(text.strip())
    if parts[0] == "adapters":
        rules = d.setdefault("adapters", [{}])
        if len(parts) == 3:
            if not parts[1].isdigit() or int(parts[1]) >= len(rules):
                raise ConfigError(f"--set {item!r}: there are {len(rules)} [[adapters]] rules (0..{len(rules) - 1})")
            targets, name, cls = [rules[int(parts[1])]], parts[2], AdapterRule
        else:
            targets, name, cls = rules, parts[1], AdapterRule
    else:
        if parts[0] not in SECTIONS:
            near = difflib.get_close_matches(parts[0], [*SECTIONS, "adapters"], n=1, cutoff=0.5)
            raise ConfigError(f"--set {item!r}: unknown section {parts[0]!r}" +
                              (f"; did you mean {near[0]!r}?" if near else ""))
        targets, name, cls = [d.setdefault(parts[0], {})], parts[1], SECTIONS[parts[0]]
    hints = typing.get_type_hints(cls)
    if name in hints and isinstance(value, (int, float, bool, list)) and str in _flat(hints[name]) \
            and not _type_ok(value, hints[name]):
        value = text.strip()  # the schema wants a string: --set output.dir=2024 is the folder "2024"
    if name in hints and value in ("none", "None", "null") and type(None) in _flat(hints[name]):
        value = None
    for t in targets:
        if value is None:
            t.pop(name, None)
        else:
            t[name] = value


def _flat(tp) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML file, apply ``section.key=value`` overrides, validate; errors name the file and the key.

    Relative input paths in the file (model, instance images) are relative to the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    folder = path.resolve().parent  # resolved first, so that ".." in a value means the real parent folder
    for name, cls in SECTIONS.items():
        if isinstance(d.get(name), dict):
            resolve_input_paths(cls, d[name], folder)
    data = d.get("data")
    for subset in data.get("subsets", []) if isinstance(data, dict) else []:
        if isinstance(subset, dict):
            resolve_input_paths(SubsetConfig, subset, folder)
    for item in overrides:  # --set values are typed at the shell: relative to the working directory
        apply_override(d, item)
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads_config(text: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    d = tomllib.loads(text)
    for item in overrides:
        apply_override(d, item)
    return from_dict(d)


def describe() -> str:
    """Every section and key with its type, default and help (``sdtune train --describe``)."""
    out = []
    for name, cls in [*SECTIONS.items(), ("[data.subsets]", SubsetConfig), ("[adapters]", AdapterRule)]:
        notes = {AdapterRule: "  (one table per rule; later rules override earlier ones)",
                 SubsetConfig: "  (one table per folder; unset keys take [data]'s value)"}
        out.append(f"[{name}]" + notes.get(cls, ""))
        hints = typing.get_type_hints(cls)
        for f_ in fields(cls):
            default = f_.default if f_.default is not MISSING else (
                f_.default_factory() if f_.default_factory is not MISSING else "required")
            where = " (relative: to the config file's folder)" if f_.metadata.get("input_path") else ""
            out.append(f"  {f_.name} ({_type_name(hints[f_.name])}, default {default!r}): "
                       f"{f_.metadata.get('help', '')}{where}")
    return "\n".join(out)
