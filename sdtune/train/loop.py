"""The DreamBooth trainer: one loop for every adapter algorithm (they differ only by their ``AdapterSpec``).

    result = train(load_config("train_configs/demo.toml"))            # or: sdtune train train_configs/demo.toml

``Trainer.setup`` loads the base model, checks the data, generates the class images (prior preservation), attaches
the adapters and builds the optimizer; ``Trainer.run`` is the loop. Each optimizer step averages ``grad_accum``
micro-batches; a micro-batch is ``batch_size`` instance images of one aspect-ratio bucket (plus as many class images)
per process. The loss is the diffusion loss on the base scheduler's prediction type (ε or v), optionally on
zero-terminal-SNR betas and min-SNR-γ / debiased-estimation weighted (the math: ``sdtune.schedules``), averaged
over each latent with its mask (masked loss):
    loss = mean_inst w(t)‖f(z_t, t, c) − target‖² + prior_loss_weight · mean_class w(t)‖…‖²
Data order, crops and noise come from seeded generators whose state is checkpointed, so a resumed run repeats the
uninterrupted run's losses exactly. Multi-process data parallel runs through ``accelerate launch``: each process
takes its slice of the global batch and the adapter gradients are averaged before the step.
Recipe features live in their own modules: optimiser groups (LoRA+, per-rule lr multipliers) and classes in
``optim``, the weight average in ``ema``, the held-out validation loss in ``validation``, previews at several
strengths in ``preview``. Previews, validation and the export use the output weights (``_output_weights``: the EMA
or schedule-free's average when the run keeps one), swapped in and back bit for bit.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import optim, validation
from . import state as ckpt
from ..atomic import write_text as atomic_text
from ..config import ConfigError, TrainConfig
from ..data.dataset import (
    DreamBoothDataset,
    Encoder,
    bucket_shapes,
    denoise,
    masked_mean,
    read_instances,
    warn_long_captions,
)
from ..data.classes import class_dir_default, class_image_shapes, ensure_class_images
from ..data.intake import parse_colour
from ..data.latent_cache import LatentCache, vae_fingerprint
from ..models import model_multiple
from .ema import EMA
from .runlog import RunLog, plot_loss, read_log  # noqa: F401  (read_log: part of the API)
from ..schedules import training_schedule


class TrainingDiverged(RuntimeError):
    """The loss (or gradient) became NaN/inf; ``step`` is where, ``checkpoint`` the last good one (or None)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


class DiskSpaceError(OSError):
    """Not enough free disk for the checkpoints and exports; raised before training starts."""


@dataclass
class TrainEvent:
    """What the progress callback receives after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    lr: float
    preview: str | None = None
    checkpoint: str | None = None
    export: str | None = None  # the A1111 file written at this step (output.save_every)
    val_loss: float | None = None  # on the held-out images, at the steps train.validation_every says


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "finished" | "cancelled"
    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # this session's per-step losses (step start+1 …)
    adapter: Path | None = None  # native adapter.sdtune
    kohya: Path | None = None  # A1111 adapter.safetensors
    checkpoint: Path | None = None
    samples: list[Path] = field(default_factory=list)
    main_process: bool = True  # False on the other processes of a multi-process run (they write nothing)
    resumed_from: Path | None = None  # the checkpoint this session continued from (None: started fresh)


def train(config: TrainConfig, resume: str | Path | None = None, progress: bool = True, *, callback=None,
          cancel=None) -> TrainResult:
    """Train adapters as ``config`` says. ``resume``: "auto", "latest" or a checkpoint folder (see
    ``state.resolve``); ``result.resumed_from`` says which checkpoint it continued from. ``callback(TrainEvent)``
    after every step; ``cancel`` (anything with ``is_set()``, e.g. threading.Event) stops after the current step
    with a checkpoint."""
    trainer = Trainer(config, progress=progress, callback=callback, cancel=cancel)
    trainer.setup()
    return trainer.run(resume)


def attach_adapters(cfg: TrainConfig, model, run_dir: Path, *, base_dtype: str):
    """Attach the config's adapters to the loaded ``model``, store the frozen base in ``base_dtype`` (and
    ``train.base_quant``) and turn on gradient checkpointing. -> (injection, trained text encoders, adapted
    components). Frozen text encoders are stored in ``base_dtype`` too (their outputs are cached; SDXL's two hold
    817 M parameters, so bf16 saves 1.6 GB); the VAE stays fp32 (SDXL's overflows in fp16)."""
    from ..inject import attach
    from ..lowprec import lower_base

    torch.manual_seed(cfg.train.seed)  # identical adapter init on every process
    components = model.components()
    trained = cfg.train.trained_text_encoders(components)  # the others stay frozen and cached
    adapted = {k: m for k, m in components.items() if k == "unet" or k in trained}
    injection = attach(adapted, cfg.rules(), model.arch, svd_cache_dir=cfg.model.svd_cache_dir or run_dir / "svd_cache")
    lower_base(components, injection, dtype=base_dtype, quant=cfg.train.base_quant)
    if cfg.train.gradient_checkpointing:
        model.pipeline.unet.enable_gradient_checkpointing()
        for key in trained:
            components[key].gradient_checkpointing_enable()
    return injection, trained, adapted


def memory_plan(cfg: TrainConfig):
    """``memory.MemoryEstimate`` of the run ``cfg`` on a GPU, with nothing trained or generated (``sdtune train
    --dry-run``): the model is loaded on the CPU, the adapters attached, the base lowered as the config asks, and one
    step at the largest bucket simulated on fake tensors in the config's mixed precision (``sdtune.train.memory``)."""
    from ..models import load
    from . import memory

    model = load(cfg.model.path, allow_pickle=cfg.model.allow_pickle, config=cfg.model.single_file_config)
    for module in model.components().values():
        module.requires_grad_(False)
    loaded = memory.storage_bytes([*model.components().values(), model.pipeline.vae])
    injection, trained, _ = attach_adapters(cfg, model, Path(cfg.output.dir), base_dtype=cfg.train.base_dtype)
    resolution = cfg.data.resolution or model.resolution
    shapes = bucket_shapes(cfg.data, resolution, model_multiple(model.pipeline)) or [(resolution, resolution)]
    params = [p for _, p in optim.trainable(injection)]
    return memory.estimate(cfg, model, params, trained, max(shapes, key=lambda s: s[0] * s[1]), load_bytes=loaded)


class Trainer:
    def __init__(self, config: TrainConfig, *, progress: bool = True, callback=None, cancel=None):
        from accelerate import Accelerator

        self.cfg, self.progress, self.callback, self.cancel = config, progress, callback, cancel
        mixed = config.train.mixed_precision
        if mixed != "no" and not torch.cuda.is_available():
            warnings.warn(f"mixed_precision = {mixed!r} needs a GPU; training in fp32 on the CPU", stacklevel=2)
            mixed = "no"
        self.acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        if self.acc.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
            warnings.warn("started by `accelerate launch --cpu` without mpirun: this is ONE process. For CPU data "
                          "parallel use `accelerate launch --multi_gpu --num_processes N` (torchrun, gloo)",
                          stacklevel=2)
        self.device = self.acc.device
        self.run_dir = Path(config.output.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from ..models import load

        cfg, acc = self.cfg, self.acc
        self.model = load(cfg.model.path, device=self.device, allow_pickle=cfg.model.allow_pickle,
                          config=cfg.model.single_file_config)
        self.preview_blocks = cfg.output.preview_blocks_for(self.model.arch)  # a misfit fails before training
        pipe = self.model.pipeline
        latent = pipe.vae.config.latent_channels
        if pipe.unet.config.in_channels != latent or pipe.unet.config.out_channels != latent:
            raise ConfigError(f"{self.model.source}: the U-Net takes {pipe.unet.config.in_channels} channels, the VAE "
                              f"makes {latent}: an inpainting/depth/other special model; train on a text-to-image base")
        for module in self.model.components().values():
            module.requires_grad_(False)
        pipe.vae.requires_grad_(False)
        self.resolution = cfg.data.resolution or self.model.resolution
        buckets = bucket_shapes(cfg.data, self.resolution, model_multiple(pipe))
        plan = read_instances(cfg.data, self.resolution, buckets, class_prompt=cfg.prior.class_prompt)
        plan, heldout = validation.hold_out(plan, cfg.train.validation_images, cfg.train.seed)
        if acc.is_main_process:
            warn_long_captions(pipe.tokenizer, plan.instances + plan.regs)
        classes = list(plan.regs)  # the user's own regularisation images, then generated ones
        for prompt in plan.class_prompts if cfg.prior.enabled else []:
            class_dir = Path(cfg.prior.class_dir if cfg.prior.class_dir and len(plan.class_prompts) == 1
                             else class_dir_default(cfg.prior.class_dir or self.run_dir, prompt))
            shapes = class_image_shapes(plan.instances, plan.repeats, cfg.prior.num_class_images, self.resolution,
                                        buckets, cfg.data.bucket_upscale)
            with acc.main_process_first():  # the main process generates, the others then read the cache
                for shape, n in shapes.items():
                    classes += ensure_class_images(self.model, class_dir, prompt, n, resolution=self.resolution,
                                                   steps=cfg.prior.sample_steps, guidance=cfg.prior.guidance,
                                                   seed=cfg.train.seed, shape=shape,
                                                   progress=self.progress and acc.is_main_process)
        self.dataset = DreamBoothDataset(plan.instances, classes, resolution=self.resolution, repeats=plan.repeats,
                                         crop=cfg.data.crop, flip=cfg.data.flip, seed=cfg.train.seed, buckets=buckets,
                                         upscale=cfg.data.bucket_upscale, max_pixels=cfg.data.max_pixels,
                                         background=parse_colour(cfg.data.alpha_background))
        self.val_views = validation.views(self.dataset, heldout) if heldout else None

        # the frozen base in low precision (a CPU run has no autocast, so there its dtype stays fp32)
        self.injection, self.trained_encoders, adapted = attach_adapters(
            cfg, self.model, self.run_dir, base_dtype=cfg.train.base_dtype if acc.mixed_precision != "no" else "fp32")
        self.text_trained = bool(self.trained_encoders)
        self.text_frozen = False  # train.text_encoder_steps reached
        components = self.model.components()
        o = cfg.optim
        optim.check_schedule(o.optimizer, cfg.schedule.scheduler)
        named = optim.trainable(self.injection)
        self.params = [p for _, p in named]
        groups = optim.param_groups(self.injection, o.lr_unet, o.lr_text, o.lora_plus_ratio, lr_text_2=o.lr_text_2,
                                    lr_multipliers=optim.rule_multipliers(self.injection, adapted, cfg.lr_multipliers()))
        self.optimizer = acc.prepare(optim.build(o.optimizer, groups, betas=tuple(o.betas), eps=o.eps,
                                                 weight_decay=o.weight_decay, device=self.device))
        self.ema = EMA(named, cfg.train.ema_decay, cfg.train.ema_warmup_steps, cfg.train.ema_on_cpu) \
            if cfg.train.ema_decay else None

        per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        self.total_steps = cfg.train.steps or math.ceil(
            cfg.train.epochs * self.dataset.num_batches(per_step // cfg.train.grad_accum) / cfg.train.grad_accum)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, optim.lr_factor(cfg.schedule.scheduler, cfg.schedule.warmup_steps, self.total_steps))
        try:
            self.schedule = training_schedule(pipe.scheduler.config, cfg.train)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.prediction = self.schedule.prediction
        self.noise_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + acc.process_index)
        self.encoder = Encoder(self.model, cache_latents=cfg.data.cache_latents and cfg.data.crop == "center",
                               cache_text=[k for k in components if k != "unet" and k not in self.trained_encoders],
                               device=self.device, disk=LatentCache(cfg.data.latent_cache_dir, vae_fingerprint(pipe.vae))
                               if cfg.data.latent_cache_dir else None)
        self.text_prior = self._base_class_text(plan.class_prompts) \
            if cfg.prior.enabled and cfg.prior.text_prior_weight and self.text_trained else None
        self._batches: dict[int, list[list[int]]] = {}
        if acc.is_main_process:
            self._check_disk()
            table = self.dataset.bucket_table()
            atomic_text(self.run_dir / "buckets.txt", table + "\n")
            print(table, flush=True)
            atomic_text(self.run_dir / "adapters.txt", self.injection.summary() + "\n")
            print(f"{len(self.injection.adapters)} adapters, {self.injection.num_params():,} trainable parameters "
                  f"(per module: {self.run_dir / 'adapters.txt'})", flush=True)

    def _check_disk(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        o = self.cfg.output
        need = ckpt.bytes_needed(self.injection.num_params(), o.keep_checkpoints, self.ema is not None,
                                 exports=self.total_steps // o.save_every if o.save_every else 0)
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise DiskSpaceError(f"{self.run_dir}: {free / 1e6:.1f} MB free, checkpoints and exports need about "
                                 f"{need / 1e6:.1f} MB (keep_checkpoints = {self.cfg.output.keep_checkpoints}): free "
                                 f"space or lower output.keep_checkpoints")

    # ------------------------------------------------------------------------------------------- data
    def micro_batch(self, k: int) -> list:
        """The views of global micro-batch ``k`` that this process trains on: instance views, then class views."""
        b, p = self.cfg.train.batch_size, self.acc.num_processes
        epoch, j = divmod(k, self.dataset.num_batches(b * p))
        if epoch not in self._batches:  # every global micro-batch lies within one bucket
            self._batches = {epoch: self.dataset.batches(epoch, b * p)}
        mine = self._batches[epoch][j][self.acc.process_index * b:(self.acc.process_index + 1) * b]
        items = [self.dataset.item(q, epoch) for q in mine]
        return [it[0] for it in items] + [it[1] for it in items if len(it) > 1]

    def loss(self, views) -> torch.Tensor:
        """The training loss of one micro-batch (instance views first, then class views)."""
        per = self.per_sample_loss(views, self.noise_gen)
        b = self.cfg.train.batch_size
        loss = per.mean() if len(per) == b else per[:b].mean() + self.cfg.prior.prior_loss_weight * per[b:].mean()
        if self.text_prior is not None and not self.text_frozen:
            loss = loss + self.cfg.prior.text_prior_weight * self.text_drift()
        return loss

    def _base_class_text(self, prompts: list[str]) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """(the class prompts, each alternative once; their encoding by the base text encoders: hidden states
        (K, T, D), SDXL's pooled (K, D') or None): what ``text_drift`` holds the trained encoders to."""
        from ..data.classes import class_prompts
        from ..inject import plain_layers

        texts = list(dict.fromkeys(alt for p in prompts for alt in class_prompts(p)))
        with torch.no_grad(), plain_layers(self.model.components()):
            hidden, pooled = self.encoder.text(texts)
        return texts, hidden, pooled

    def text_drift(self) -> torch.Tensor:
        """‖E(c) − E_base(c)‖² / ‖E_base(c)‖² over the class prompts c (every token position, as the U-Net's
        cross-attention reads them all; SDXL's pooled embedding likewise): how far the trained text encoders have
        moved the class away from the base's words (``prior.text_prior_weight``)."""
        texts, h0, p0 = self.text_prior
        h, p = self.encoder.text(texts)
        drift = (h.float() - h0.float()).pow(2).sum() / h0.float().pow(2).sum()
        if p0 is not None:
            drift = drift + (p.float() - p0.float()).pow(2).sum() / p0.float().pow(2).sum()
        return drift

    @torch.no_grad()
    def eval_loss(self, seed: int = 0, timesteps: tuple[int, ...] = validation.TIMESTEPS, views=None) -> float:
        """Mean loss over ``views`` (default: every training instance image, center crop) at fixed timesteps with
        fixed noise: comparable before and after training, unlike the noisy per-step loss."""
        views = self.dataset.fixed_views() if views is None else views
        g = torch.Generator().manual_seed(seed)
        self._train_mode(False)
        try:
            per = [self.per_sample_loss(views, g, torch.full((len(views),), t)) for t in timesteps]
        finally:
            self._train_mode(True)
        return float(torch.cat(per).mean())

    def per_sample_loss(self, views, gen: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
        """‖f(z_t, t, c) − target‖² per sample, averaged over the latent weighted by its mask (``data.masked_mean``)
        and min-SNR-γ weighted if set; noise and t drawn from ``gen``. Views of different buckets (class images
        beside a non-square batch) go through the U-Net in one call per bucket."""
        cfg, sched = self.cfg.train, self.schedule
        groups = self.dataset.groups(views)
        if len(groups) > 1:  # views of different buckets (class images beside a non-square batch): one call each
            per = torch.empty(len(views), device=self.device)
            for idx in groups:
                per[idx] = self.per_sample_loss([views[i] for i in idx], gen, None if t is None else t[idx])
            return per
        z0, mask = self.encoder.latents(views, self.dataset)
        noise = torch.randn(z0.shape, generator=gen)
        if cfg.noise_offset:
            noise += cfg.noise_offset * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        if t is None:
            t = torch.randint(0, sched.num_timesteps, (len(z0),), generator=gen)
        noise, t = noise.to(z0), t.to(self.device)
        zt = sched.noisy(z0, noise, t)
        hidden, pooled = self.encoder.text([ex.caption for _, ex, _, _ in views])
        with self.acc.autocast():
            pred = denoise(self.model, zt, t, hidden, pooled, self.dataset.time_ids(views))
        per = masked_mean(F.mse_loss(pred.float(), sched.target(z0, noise, t).float(), reduction="none"), mask)
        return per * sched.loss_weight(t, min_snr_gamma=cfg.min_snr_gamma, debiased=cfg.debiased_estimation)

    # ------------------------------------------------------------------------------------------- loop
    def run(self, resume: str | Path | None = None) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        main = acc.is_main_process
        self.resumed_from = None
        start = self._resume(resume) if resume is not None else 0
        if main:
            ckpt.remove_partial(self.ckpt_dir)
            atomic_text(self.run_dir / "config.toml", cfg.to_toml())
        log = RunLog(self.run_dir / "log.csv", start, wandb_project=cfg.output.wandb_project,
                     config=cfg.to_dict()) if main else None
        result = TrainResult(self.run_dir, "finished", start, self.total_steps, main_process=main,
                             resumed_from=self.resumed_from)
        last_ckpt = ckpt.complete(self.ckpt_dir)[-1] if ckpt.complete(self.ckpt_dir) else None
        self._train_mode(True)
        bar = None
        if self.progress and main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=start, desc="training", unit="step", dynamic_ncols=True)
        t0 = time.time()
        try:
            for step in range(start + 1, self.total_steps + 1):
                if self.text_trained and not self.text_frozen and step > (cfg.train.text_encoder_steps or math.inf):
                    self._freeze_text_encoders()
                loss_value, grad_norm = self.optimizer_step(step, last_ckpt)
                lrs = self._scheduled_lrs()
                result.losses.append(loss_value)
                result.step = step
                event = TrainEvent(step, self.total_steps, loss_value, lrs[0])
                last = step == self.total_steps
                if main and self.val_views and validation.due(step, cfg.train.validation_every, self.total_steps):
                    with self._output_weights():
                        event.val_loss = self.eval_loss(cfg.train.seed, views=self.val_views)
                if main:
                    log.write(step, loss_value, lrs, grad_norm, time.time() - t0, event.val_loss)
                every = cfg.output.checkpoint_every
                if last or (every and step % every == 0):
                    last_ckpt = self._checkpoint(step)
                    event.checkpoint = str(last_ckpt)
                every = cfg.output.save_every
                if main and every and step % every == 0 and not last:
                    event.export = str(self.export(step)[1])
                every = cfg.output.sample_every
                if cfg.output.validation_prompts and (last or (every and step % every == 0)) and main:
                    event.preview = str(self.preview(step))
                    log.preview(step, Path(event.preview))
                    result.samples.append(Path(event.preview))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lrs[0]:.2e}")
                    bar.update(1)
                if self.callback is not None and main:
                    self.callback(event)
                if self.cancel is not None and self._cancelled() and not last:
                    if event.checkpoint is None:
                        last_ckpt = self._checkpoint(step)
                    result.status = "cancelled"
                    break
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        result.checkpoint = last_ckpt
        if result.status == "finished":
            result.adapter, result.kohya = self.export() if main else (self.run_dir / "adapter.sdtune",
                                                                       self.run_dir / "adapter.safetensors")
        acc.wait_for_everyone()
        return result

    def optimizer_step(self, step: int, last_ckpt: Path | None) -> tuple[float, float]:
        """Accumulate ``grad_accum`` micro-batches, average over processes, clip, check, step. -> (loss, grad norm)."""
        accum, acc = self.cfg.train.grad_accum, self.acc
        loss_sum = 0.0
        for micro in range(accum):
            loss = self.loss(self.micro_batch((step - 1) * accum + micro))
            acc.backward(loss / accum)
            loss_sum += loss.detach().float()
        loss_value = float(acc.reduce(loss_sum / accum, reduction="mean"))
        self._average_gradients()
        grad_norm = float(acc.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or float("inf")))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._diverged(step, loss_value, grad_norm, last_ckpt)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params, step)
        return loss_value, grad_norm

    def _average_gradients(self) -> None:
        """Data parallel: average the adapter gradients over the processes (one all-reduce of a flat buffer)."""
        if self.acc.num_processes == 1:
            return
        params = [p for p in self.params if p.grad is not None]
        flat = self.acc.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))

    def _diverged(self, step: int, loss: float, grad_norm: float, last_ckpt: Path | None) -> None:
        what = f"loss = {loss}" if not math.isfinite(loss) else f"gradient norm = {grad_norm}"
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
        o = self.cfg.optim
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}. Stopped without saving; {where}. Lower the learning rate "
            f"(optim.lr_unet = {o.lr_unet:g}, try {o.lr_unet / 10:g}) and keep optim.grad_clip on.", step, last_ckpt)

    def _scheduled_lrs(self) -> list[float]:
        """[lr_unet, lr_text (if trained)] after the schedule (LoRA+ and block multipliers apply on top)."""
        factor = self.lr_scheduler.get_last_lr()[0] / self.lr_scheduler.base_lrs[0]
        o = self.cfg.optim
        return [o.lr_unet * factor] + ([0.0 if self.text_frozen else o.lr_text * factor] if self.text_trained else [])

    def _freeze_text_encoders(self) -> None:
        """``train.text_encoder_steps`` reached: the text encoders' adapters get no more gradients (the optimiser
        skips them; nothing backpropagates through the encoders) and their outputs are cached as a frozen
        encoder's are."""
        self.text_frozen = True
        self.encoder.cached_encoders |= set(self.trained_encoders)
        self._train_mode(True)

    def _output_weights(self):
        """Context: the weights previews, validation and the export use (EMA / schedule-free average / raw)."""
        use_ema = self.ema is not None and self.cfg.train.ema_outputs == "ema"
        return optim.eval_weights(self.params, self.optimizer.optimizer, self.ema if use_ema else None)

    def _train_mode(self, on: bool) -> None:
        for key, module in self.model.components().items():
            module.train(on and (key == "unet" or (key in self.trained_encoders and not self.text_frozen)))

    # ------------------------------------------------------------------------------------------- outputs
    def _state(self, step: int) -> dict:
        return {"step": step, "samples_seen": step * self.cfg.train.grad_accum * self.cfg.train.batch_size
                * self.acc.num_processes, "total_steps": self.total_steps,
                "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                "rng": ckpt.rng_state(self.noise_gen), "config": self.cfg.to_toml(),
                "num_processes": self.acc.num_processes} | ({"ema": self.ema.state_dict()} if self.ema else {})

    def _checkpoint(self, step: int) -> Path:
        """Save checkpoint ``step`` (main process) and redraw loss.png; every process waits for it."""
        if self.acc.is_main_process:
            ckpt.save(self.ckpt_dir, step, self.injection, self._state(step), self.cfg.output.keep_checkpoints)
            plot_loss(self.run_dir / "log.csv", self.run_dir / "loss.png")
        self.acc.wait_for_everyone()
        return self.ckpt_dir / f"{ckpt.PREFIX}{step:06d}"

    def _cancelled(self) -> bool:
        """The cancel flag, agreed by all processes (any process's flag stops them all)."""
        flag = torch.tensor([float(self.cancel.is_set())], device=self.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _resume(self, resume: str | Path) -> int:
        path = self.resumed_from = ckpt.resolve(resume, self.ckpt_dir)
        if str(resume) == "auto" and self.acc.is_main_process:
            print(f"--resume auto: resuming from {path}" if path else
                  f"--resume auto: no complete checkpoint in {self.ckpt_dir}, starting fresh", flush=True)
        if path is None:
            return 0
        state, tensors = ckpt.load(path)
        if state["num_processes"] != self.acc.num_processes:
            warnings.warn(f"{path} was written by {state['num_processes']} process(es), this run has "
                          f"{self.acc.num_processes}: the data order changes from here on", stacklevel=3)
        if state["config"] != self.cfg.to_toml():
            warnings.warn(f"the config differs from the one {path} was trained with; continuing with the new one",
                          stacklevel=3)
        self.injection.load_state_dict(tensors, strict=True)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path}: its optimiser state does not fit this run's ({e}): optim.optimizer, "
                              f"optim.lora_plus_ratio, a rule's lr_multiplier or the trained encoders changed; "
                              f"resume with the checkpoint's settings (its config.toml) or start a new run") from None
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                warnings.warn(f"{path} has no EMA state (trained without train.ema_decay): the average starts from "
                              f"its weights", stacklevel=3)
                self.ema = EMA(optim.trainable(self.injection), self.ema.decay, self.ema.warmup_steps,
                               self.cfg.train.ema_on_cpu)
        ckpt.set_rng_state(state["rng"], self.noise_gen)
        if self.acc.process_index:  # each process has its own noise stream; offset it as at the start
            self.noise_gen.manual_seed(self.cfg.train.seed * 7919 + self.acc.process_index + 104729 * state["step"])
        if state["step"] >= self.total_steps:
            warnings.warn(f"{path} is at step {state['step']}, the run has {self.total_steps} steps: nothing to train",
                          stacklevel=3)
        return int(state["step"])

    @torch.no_grad()
    def preview(self, step: int) -> Path:
        """A grid of the validation prompts from the live model with its adapters: one row per prompt and
        strength (``output.sample_strengths``), with ``output.preview_blocks`` applied."""
        from .preview import samples_at_strengths
        from ..sample import SampleRequest, grid

        o = self.cfg.output
        self._train_mode(False)
        try:
            req = SampleRequest(prompts=list(o.validation_prompts), seed=o.sample_seed, steps=o.sample_steps,
                                guidance=o.sample_guidance, count=o.sample_count, size=self.resolution,
                                guidance_rescale=o.sample_guidance_rescale,
                                zero_terminal_snr=self.schedule.zero_terminal)
            with self._output_weights():
                samples = samples_at_strengths(self.model, self.injection, req, o.sample_strengths,
                                               self.preview_blocks)
        finally:
            self._train_mode(True)
        path = self.run_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid([s.image for s in samples], columns=o.sample_count).save(path)
        return path

    def export(self, step: int | None = None) -> tuple[Path | None, Path]:
        """The final adapter: native ``adapter.sdtune`` and the A1111 ``adapter.safetensors``; at an intermediate
        ``step`` (``output.save_every``) only the A1111 file, ``adapter-step-000200.safetensors``."""
        from ..formats.kohya import DTYPES, save_kohya

        o = self.cfg.output
        steps = step or self.total_steps
        native = None if step else self.run_dir / "adapter.sdtune"
        kohya = self.run_dir / (f"adapter-step-{step:06d}.safetensors" if step else "adapter.safetensors")
        with self._output_weights():  # the EMA or schedule-free average when the run keeps one
            if native is not None:
                self.injection.save(native)
            save_kohya(self.injection, kohya, dtype=DTYPES[o.export_dtype], resolution=self.resolution,
                       output_name=o.name or self.run_dir.name, comment=f"sdtune train, {steps} steps",
                       metadata={"ss_steps": str(steps), "ss_seed": str(self.cfg.train.seed),
                                 "ss_learning_rate": str(self.cfg.optim.lr_unet),
                                 "ss_num_train_images": str(len(self.dataset)),
                                 "ss_v_parameterization": str(self.schedule.prediction == "v_prediction"),
                                 "ss_zero_terminal_snr": str(self.schedule.zero_terminal),
                                 **self.dataset.bucket_metadata(self.cfg.data.buckets)})
        return native, kohya
