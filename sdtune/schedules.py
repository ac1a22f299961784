"""Noise schedules, training targets and loss weights (pure tensor math), and the zero-terminal-SNR sampler.

Forward process (DDPM), with ᾱ_t the cumulative product of 1 − β:
    z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε,        SNR(t) = ᾱ_t / (1 − ᾱ_t)
The model's target is the base scheduler's prediction type:
    ε-prediction: ε;     v-prediction (Salimans & Ho 2022): v = √ᾱ_t · ε − √(1 − ᾱ_t) · z_0
Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1):
shift and scale √ᾱ so that √ᾱ_T = 0 while √ᾱ_1 keeps its value. The model then learns pure noise at t = T, as it
meets at sampling; only a v-prediction model can (ε is z_T itself there and says nothing about z_0). Sampling such
a model needs the same betas, timesteps that start at T ("trailing" spacing) and guidance rescale (their §3.4).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction")


def zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2024, Algorithm 1: betas (T,) -> betas whose ᾱ_T is exactly 0 (β_T = 1) and ᾱ_1 unchanged."""
    sqrt_acp = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp ** 2
    return 1 - torch.cat([acp[:1], acp[1:] / acp[:-1]])


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, …) broadcastable against ``like``."""
    return values.flatten().view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class NoiseSchedule:
    """The training view of a base model's scheduler: ᾱ (T,) and the prediction type."""

    alphas_cumprod: Tensor
    prediction: str

    @classmethod
    def from_config(cls, scheduler_config, *, zero_terminal: bool = False) -> NoiseSchedule:
        """From a diffusers scheduler config (any scheduler class: only its betas and prediction type are read).
        A config that already says ``rescale_betas_zero_snr`` counts as ``zero_terminal``."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in dict(scheduler_config).items() if k != "rescale_betas_zero_snr"}
        betas = DDPMScheduler.from_config(config).betas
        if zero_terminal or scheduler_config.get("rescale_betas_zero_snr", False):
            betas = zero_terminal_snr(betas)
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise ValueError(f"the base scheduler predicts {prediction!r}; sdtune trains {' or '.join(PREDICTIONS)}")
        return cls(torch.cumprod(1 - betas, dim=0), prediction)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def zero_terminal(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def _roots(self, z0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # the same operations as diffusers' add_noise/get_velocity, so the tensors are bit-identical to theirs
        acp = self.alphas_cumprod.to(device=z0.device, dtype=z0.dtype)[t.to(z0.device)]
        return _per_sample(acp ** 0.5, z0), _per_sample((1 - acp) ** 0.5, z0)

    def noisy(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε for latents (B, C, h, w) and timesteps (B,)."""
        a, s = self._roots(z0, t)
        return a * z0 + s * noise

    def target(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output: ε, or v = √ᾱ_t ε − √(1 − ᾱ_t) z_0."""
        if self.prediction == "epsilon":
            return noise
        a, s = self._roots(z0, t)
        return a * noise - s * z0

    def snr(self, t: Tensor) -> Tensor:
        acp = self.alphas_cumprod.to(t.device)[t]
        return acp / (1 - acp)

    def loss_weight(self, t: Tensor, *, min_snr_gamma: float | None = None, debiased: bool = False) -> Tensor:
        """Per-sample weights (B,) of the MSE on the model's own target; ones when neither weighting is on.

        Both weightings are defined on the ε-loss: λ(t) = min(SNR, γ)/SNR (min-SNR-γ, Hang et al. 2023) and
        λ(t) = 1/√SNR (debiased estimation, Yu et al. 2024); together they multiply. Since
        ‖v̂ − v‖² = ‖ε̂ − ε‖² · (SNR + 1)/SNR, a v-loss gets λ · SNR/(SNR + 1), which stays finite at SNR = 0.
        """
        snr = self.snr(t)
        if not min_snr_gamma and not debiased:
            return torch.ones_like(snr)
        safe = snr.clamp(min=torch.finfo(snr.dtype).tiny)
        weight_times_snr = snr.clamp(max=min_snr_gamma) if min_snr_gamma else snr  # λ · SNR
        if debiased:
            weight_times_snr = weight_times_snr * safe.rsqrt()
        return weight_times_snr / (safe if self.prediction == "epsilon" else snr + 1)


# ------------------------------------------------------------------------------------------------ sampling

def zero_terminal_scheduler(scheduler):
    """A copy of a diffusers sampler with zero-terminal-SNR betas and trailing timestep spacing (Lin et al. §3.2-3.3).
    Schedulers that cannot rescale their betas are replaced by DPM-Solver++ with the same betas config."""
    import inspect

    from diffusers import DPMSolverMultistepScheduler

    cls = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        cls = DPMSolverMultistepScheduler
    return cls.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


@contextmanager
def sampling_schedule(pipe, zero_terminal: bool):
    """Sample ``pipe`` with :func:`zero_terminal_scheduler` for the duration (no change when ``zero_terminal`` is
    off); the original scheduler is restored afterwards."""
    if not zero_terminal:
        yield pipe.scheduler
        return
    original = pipe.scheduler
    pipe.scheduler = zero_terminal_scheduler(original)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def training_schedule(scheduler_config, train) -> NoiseSchedule:
    """The trainer's schedule: the base scheduler's betas and prediction type, with ``train.zero_terminal_snr``;
    a ValueError for a combination that cannot be trained (the trainer reports it as a ConfigError)."""
    schedule = NoiseSchedule.from_config(scheduler_config, zero_terminal=train.zero_terminal_snr)
    if schedule.zero_terminal and schedule.prediction == "epsilon":
        raise ValueError("[train] zero_terminal_snr = true needs a v-prediction base (the base scheduler predicts "
                          "epsilon, which is the noisy latent itself at zero SNR and says nothing about the image): "
                          "use a v-prediction base or set zero_terminal_snr = false")
    return schedule
