"""How much device memory a training run needs, known before it starts (``sdtune train --dry-run``).

    peak ≈ weights + gradients + optimizer state (+ EMA copy) + the step's own tensors

Weights, gradients and optimizer state are counted from the live model's tensors (after the frozen base is lowered to
``train.base_dtype`` / ``base_quant``) and the optimizer's per-parameter state. The step's own tensors are not
guessed: one training micro-batch is run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes,
no data, no arithmetic) through the real modules, at the largest bucket, with the run's autocast dtype, gradient
checkpointing and trained text encoders, forward and backward, and ``LiveBytes`` adds up every tensor storage while
it is alive. Run on real tensors, the same count gives the same bytes (tested), so the fake step is the real step's
allocation trace. What it cannot see: the CUDA context, cuDNN/cuBLAS workspaces, kernels' internal scratch buffers and
the caching allocator's rounding and fragmentation (``torch.cuda.max_memory_allocated`` counts the last two), so the
figure is a floor of what ``nvidia-smi`` shows.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..formats.kohya import DTYPES

# Optimizer state per trainable parameter, in bytes (fp32 states): AdamW and schedule-free AdamW keep two
# moments, Lion one, Prodigy four (two moments, s and the initial point p0). 8-bit AdamW and Adafactor by rule below.
STATE_BYTES = {"adamw": 8, "schedulefree_adamw": 8, "lion": 4, "prodigy": 16}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op creates while any tensor on it is alive: ``now`` and ``peak``
    (bytes above the start). Storages are keyed by their C++ object, so views count once; a storage is freed when
    the last tensor that refers to it dies (torch keeps a tensor's Python object alive while autograd holds it)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, live tensors]
        self.now = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@dataclass
class MemoryEstimate:
    """Bytes on the training device. ``step`` is the peak of one micro-batch's own tensors (forward, backward);
    ``load`` the weights as first loaded (fp32), before the base is lowered; ``shape`` the bucket (w, h)."""

    weights: int
    gradients: int  # the trainable parameters' fp32 gradients: also their own size
    optimizer: int
    ema: int
    step: int
    load: int
    batch: int
    shape: tuple[int, int]

    @property
    def training(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.step

    @property
    def peak(self) -> int:
        return max(self.load, self.training)

    def table(self) -> str:
        unit, div = ("GiB", 2 ** 30) if self.peak >= 2 ** 30 else ("MiB", 2 ** 20)
        rows = [("frozen base and adapters", self.weights), ("gradients", self.gradients),
                ("optimizer state", self.optimizer), ("EMA copy", self.ema),
                (f"one step's tensors (batch {self.batch} at {self.shape[0]}×{self.shape[1]} px)", self.step),
                ("peak while training", self.training)]
        lines = [f"{name:<56} {n / div:8.2f} {unit}" for name, n in rows]
        if self.load > self.training:
            lines.append(f"{'loading the base in fp32, before it is lowered':<56} {self.load / div:8.2f} {unit} "
                         "(the peak)")
        lines.append("not counted: the CUDA context (~0.3–0.5 GiB), library workspaces, allocator fragmentation")
        return "\n".join(lines)


def storage_bytes(modules) -> int:
    """Bytes of the modules' parameters and buffers, each storage once."""
    seen, total = set(), 0
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def optimizer_bytes(kind: str, params: list[torch.Tensor]) -> int:
    """The optimizer's state for ``params``: fp32 per ``STATE_BYTES``; ``adamw8bit`` (bitsandbytes) keeps tensors of
    ≥ 4096 entries in 8 bits (2 bytes per entry) and smaller ones in fp32; Adafactor (no first moment) factors the
    second moment of a tensor of ≥ 2 dims over its last two: one mean per row, one per column."""
    if kind == "adamw8bit":
        return sum(2 * p.numel() if p.numel() >= 4096 else 8 * p.numel() for p in params)
    if kind == "adafactor":
        return sum(4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2]) if p.dim() >= 2 else 4 * p.numel()
                   for p in params)
    return STATE_BYTES[kind] * sum(p.numel() for p in params)


def step_bytes(model, trained_encoders: list[str], params: list[nn.Parameter], batch: int, shape: tuple[int, int],
               autocast_dtype: torch.dtype | None, encode_latents: bool, fake: bool = True) -> int:
    """Peak bytes of one micro-batch's own tensors, from a fake-tensor run of the training step: the VAE encode (no
    gradient; when latents are not cached), the trained text encoders' forward, the U-Net's forward under autocast
    with ``data.denoise``'s conditioning, the loss and its backward to ``params``. ``shape`` = (width, height) in
    pixels, as the bucket tables give it. ``fake=False`` runs the same step on the real tensors (the check that the
    fake run's trace is the real one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    pipe = model.pipeline
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # real tensors an adapter keeps outside its state dict convert too
    convert = (lambda t: mode.from_tensor(t)) if fake else (lambda t: t)
    trainable = {id(p) for p in params}
    comps = {**model.components(), "vae": pipe.vae}
    tensors = {k: {n: convert(t.detach().requires_grad_() if id(t) in trainable and fake else t)
                   for n, t in (*m.named_parameters(), *m.named_buffers())} for k, m in comps.items()}
    fake_params = [tensors[k][n] for k, m in comps.items() for n, t in m.named_parameters() if id(t) in trainable]
    (w, h), factor = shape, int(pipe.vae_scale_factor)
    tokens = pipe.tokenizer.model_max_length
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    counter = LiveBytes()
    with mode if fake else contextlib.nullcontext(), counter:
        if encode_latents:
            with torch.no_grad():
                functional_call(_Encoder(pipe.vae), {f"vae.{n}": t for n, t in tensors["vae"].items()},
                                (torch.zeros(batch, 3, h, w, dtype=pipe.vae.dtype),))
        z0 = torch.zeros(batch, pipe.vae.config.latent_channels, h // factor, w // factor)
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        hidden, pooled = [], None
        for key in (k for k in comps if k.startswith("text_encoder")):
            config = comps[key].config
            if key in trained_encoders:
                xl = model.arch == "sdxl"  # as data.Encoder runs them (outside autocast) and reads them: SDXL's
                out = functional_call(comps[key], tensors[key], (ids,),  # penultimate states, else the last
                                      {"output_hidden_states": True} if xl else {})
                hidden.append(out.hidden_states[-2] if xl else out[0])
                pooled = out[0] if key == "text_encoder_2" else pooled
            else:
                hidden.append(torch.zeros(batch, tokens, config.hidden_size))
                pooled = torch.zeros(batch, config.projection_dim) if key == "text_encoder_2" else pooled
        extra = {} if pooled is None else {"added_cond_kwargs": {
            "text_embeds": pooled, "time_ids": torch.zeros(batch, 6)}}  # as data.denoise conditions SDXL
        with autocast:
            pred = functional_call(pipe.unet, tensors["unet"], (z0, torch.zeros(batch, dtype=torch.long)),
                                   {"encoder_hidden_states": torch.cat(hidden, dim=-1), **extra}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), z0)
        grads = torch.autograd.grad(loss, fake_params)
        del grads, loss, pred
    return counter.peak


class _Encoder(nn.Module):
    """The VAE's encode path as a module forward (``functional_call`` calls forward)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.mean


def estimate(cfg, model, params: list[nn.Parameter], trained_encoders: list[str], shape: tuple[int, int],
             load_bytes: int = 0) -> MemoryEstimate:
    """The estimate for config ``cfg`` on ``model`` with its adapters attached (trainable ``params``), the base lowered
    as the run lowers it, at bucket ``shape`` (w, h): ``batch_size`` instance images, plus as many class images with
    prior preservation. ``load_bytes``: the weights as loaded, before lowering."""
    trainable = 4 * sum(p.numel() for p in params)
    batch = cfg.train.batch_size * (2 if cfg.prior.enabled else 1)
    dtype = DTYPES.get(cfg.train.mixed_precision)  # None for "no"
    caching = cfg.data.cache_latents and cfg.data.crop == "center"
    step = step_bytes(model, trained_encoders, params, batch, shape, dtype, encode_latents=not caching)
    return MemoryEstimate(
        weights=storage_bytes([*model.components().values(), model.pipeline.vae]), gradients=trainable,
        optimizer=optimizer_bytes(cfg.optim.optimizer, params),
        ema=trainable if cfg.train.ema_decay and not cfg.train.ema_on_cpu else 0, step=step, load=load_bytes,
        batch=batch, shape=shape)
