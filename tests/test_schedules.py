"""Noise schedules (sdtune/schedules.py): training targets against diffusers' own schedulers, zero-terminal-SNR
betas, the loss weightings, the zero-terminal sampler, and a v-prediction run on a random tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from helpers_adapters import write_adapter

from sdtune import compose
from sdtune.adapters import AdapterSpec
from sdtune.config import ConfigError, loads_config
from sdtune.models import EMBEDDED
from sdtune.sample import SampleRequest, generate
from sdtune.schedules import NoiseSchedule, sampling_schedule, training_schedule, zero_terminal_snr
from sdtune.toy import world as tw
from sdtune.train.loop import Trainer

BASE_CONFIG = json.loads((EMBEDDED / "scheduler" / "scheduler_config.json").read_text())


def draws(shape=(4, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_terminal", [False, True])
def test_targets_are_the_schedulers_own_tensors(prediction, zero_terminal):
    config = {**BASE_CONFIG, "prediction_type": prediction}
    ours = NoiseSchedule.from_config(config, zero_terminal=zero_terminal)
    theirs = DDPMScheduler.from_config(config, rescale_betas_zero_snr=zero_terminal)
    z0, noise = draws()
    t = torch.tensor([0, 1, 500, 999])
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.equal(ours.noisy(z0, noise, t), theirs.add_noise(z0, noise, t))
    expected = noise if prediction == "epsilon" else theirs.get_velocity(z0, noise, t)
    assert torch.equal(ours.target(z0, noise, t), expected)
    assert ours.prediction == prediction and ours.zero_terminal == zero_terminal


def test_zero_terminal_snr_betas():
    betas = DDPMScheduler.from_config(BASE_CONFIG).betas
    acp_before = torch.cumprod(1 - betas, 0)
    acp = torch.cumprod(1 - zero_terminal_snr(betas), 0)
    assert acp_before[-1] > 4e-3 and acp[-1] == 0  # terminal ᾱ exactly 0 ...
    assert torch.isclose(acp[0], acp_before[0], rtol=1e-6, atol=0)  # ... the first one kept
    assert (acp[1:] < acp[:-1]).all()
    # √ᾱ is an affine map of the old √ᾱ (Algorithm 1: shift, then scale)
    old, new = acp_before.sqrt().double(), acp.sqrt().double()
    k = (new[0] - new[500]) / (old[0] - old[500])
    assert torch.allclose(new, (old - old[-1]) * k, atol=1e-6)
    # a base whose scheduler already says so counts as zero-terminal
    assert NoiseSchedule.from_config({**BASE_CONFIG, "rescale_betas_zero_snr": True}).zero_terminal


@pytest.mark.parametrize("zero_terminal", [False, True])
def test_loss_weights_are_the_same_on_the_epsilon_and_the_v_loss(zero_terminal):
    """min-SNR-γ and debiased estimation are ε-loss weights: a v-model's weighted v-loss must equal the ε-model's
    weighted ε-loss for the same prediction error (v̂ − v = (ε̂ − ε)/√ᾱ)."""
    eps_s = NoiseSchedule.from_config(BASE_CONFIG)
    v_s = NoiseSchedule.from_config({**BASE_CONFIG, "prediction_type": "v_prediction"}, zero_terminal=zero_terminal)
    t = torch.tensor([0, 10, 200, 500, 990])
    snr = eps_s.snr(t)
    assert torch.equal(eps_s.loss_weight(t), torch.ones(5)) and torch.equal(v_s.loss_weight(t), torch.ones(5))
    assert torch.allclose(eps_s.loss_weight(t, min_snr_gamma=5), snr.clamp(max=5) / snr)
    assert torch.allclose(eps_s.loss_weight(t, debiased=True), snr.rsqrt())
    assert torch.allclose(eps_s.loss_weight(t, min_snr_gamma=5, debiased=True), snr.clamp(max=5) / snr ** 1.5)
    _, err_eps = draws((5, 4, 8, 8), 1)
    acp = v_s.alphas_cumprod[t].view(-1, 1, 1, 1)
    for kw in (dict(min_snr_gamma=5.0), dict(debiased=True), dict(min_snr_gamma=1.0, debiased=True)):
        v_loss = v_s.loss_weight(t, **kw) * ((err_eps / acp.sqrt()) ** 2).mean(dim=(1, 2, 3))
        eps_ref = NoiseSchedule(v_s.alphas_cumprod, "epsilon")
        eps_loss = eps_ref.loss_weight(t, **kw) * (err_eps ** 2).mean(dim=(1, 2, 3))
        assert torch.allclose(v_loss, eps_loss, rtol=1e-4), kw
    if zero_terminal:  # SNR = 0 at t = T: v's weights stay finite (0), where 1/√SNR is not
        w = v_s.loss_weight(torch.tensor([999]), min_snr_gamma=5, debiased=True)
        assert torch.isfinite(w).all() and w.item() == 0


def test_zero_terminal_snr_needs_a_v_prediction_base():
    cfg = loads_config('[data]\ninstance_dir = "x"\n[[adapters]]\n[train]\nsteps = 1\nzero_terminal_snr = true\n')
    with pytest.raises(ValueError, match="needs a v-prediction base"):
        training_schedule(BASE_CONFIG, cfg.train)
    assert training_schedule({**BASE_CONFIG, "prediction_type": "v_prediction"}, cfg.train).zero_terminal
    with pytest.raises(ConfigError, match="sample_guidance_rescale"):
        loads_config('[data]\ninstance_dir = "x"\n[[adapters]]\n[output]\nsample_guidance_rescale = 1.5\n')


def test_zero_terminal_sampler_starts_at_pure_noise_and_is_restored(tiny_model):
    pipe = tiny_model.pipeline
    original = pipe.scheduler
    with sampling_schedule(pipe, True) as sched:
        assert pipe.scheduler is sched and sched is not original
        sched.set_timesteps(4)
        assert sched.config.timestep_spacing == "trailing" and sched.timesteps[0] == 999  # the first step is t = T
        assert sched.alphas_cumprod[-1] < 1e-7  # (diffusers keeps 2**-24 so that σ_T stays finite)
    assert pipe.scheduler is original and original.alphas_cumprod[-1] > 4e-3
    # a scheduler that cannot rescale its betas becomes DPM-Solver++ with them
    from diffusers import PNDMScheduler

    from sdtune.schedules import zero_terminal_scheduler
    swapped = zero_terminal_scheduler(PNDMScheduler.from_config(original.config))
    assert isinstance(swapped, DPMSolverMultistepScheduler) and swapped.config.rescale_betas_zero_snr


def test_guidance_rescale_and_zero_terminal_sampling_are_the_same_in_the_composed_sampler(tiny_model, tmp_path):
    """One marked concept is plain sampling (test_compose); it stays so with guidance rescale and zero-terminal-SNR
    sampling, which both samplers must apply the same way, and which both change the images."""
    torch.manual_seed(0)
    write_adapter(tiny_model.components(), tmp_path / "a.safetensors", [("attn", AdapterSpec("locon", rank=2))], 70,
                  size=0.3)
    kw = dict(seed=3, steps=3, count=1, adapters=[(str(tmp_path / "a.safetensors"), 1.0)], guidance_rescale=0.7,
              zero_terminal_snr=True)

    def pixels(samples):
        return np.stack([np.asarray(s.image, dtype=np.int16) for s in samples])

    composed = pixels(compose.generate(tiny_model, SampleRequest(["a [sks] star"], **kw), progress=False))
    plain = pixels(generate(tiny_model, SampleRequest(["a sks star"], **kw), progress=False))
    d = np.abs(composed - plain)
    assert d.mean() < 0.05 and d.max() <= 2
    for off in (dict(guidance_rescale=0.0), dict(zero_terminal_snr=False)):
        other = pixels(generate(tiny_model, SampleRequest(["a sks star"], **{**kw, **off}), progress=False))
        assert np.abs(other - plain).mean() > 1, off


def _random_v_model(folder):
    """A random-weight model with the embedded model's layout at half width, its VAE and tokenizer, predicting v."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdtune.toy import pretrain as P

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**P.UNET_CONFIG, "block_out_channels": (16, 32, 64)})
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **P.TEXT_CONFIG))
    scheduler = DPMSolverMultistepScheduler.from_config({**BASE_CONFIG, "prediction_type": "v_prediction"})
    StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(EMBEDDED / "vae"), text_encoder=te, tokenizer=tokenizer,
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def test_v_prediction_zero_terminal_training_lowers_the_loss(tmp_path):
    """The v path end to end: a random v-prediction model, zero terminal SNR, debiased + min-SNR weights; the
    fixed-noise loss falls, the preview samples and the A1111 file records the schedule."""
    from safetensors import safe_open

    _random_v_model(tmp_path / "model")
    tw.write_instance_folder("sks", tmp_path / "inst", n=2)
    cfg = loads_config(f"""
[model]
path = "{tmp_path / 'model'}"
[data]
instance_dir = "{tmp_path / 'inst'}"
[[adapters]]
preset = "attn"
rank = 2
[optim]
lr_unet = 3e-3
[train]
steps = 5
batch_size = 1
zero_terminal_snr = true
debiased_estimation = true
min_snr_gamma = 5.0
[output]
dir = "{tmp_path / 'run'}"
validation_prompts = ["a sks star"]
sample_steps = 2
sample_count = 1
sample_guidance_rescale = 0.7
""")
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    assert trainer.schedule.prediction == "v_prediction" and trainer.schedule.zero_terminal
    before = trainer.eval_loss(timesteps=(300, 700, 999))
    result = trainer.run()
    after = trainer.eval_loss(timesteps=(300, 700, 999))
    assert after < before, f"fixed-noise v-loss {before:.5f} -> {after:.5f}"
    assert result.samples and result.samples[-1].is_file()
    with safe_open(str(result.kohya), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["ss_zero_terminal_snr"] == "True"


def test_the_trainer_reports_zero_terminal_snr_on_an_epsilon_base_as_a_config_error(tmp_path):
    from sdtune.resources import ASSETS

    cfg = loads_config(f'[data]\ninstance_dir = "{ASSETS / "demo" / "sks"}"\n[[adapters]]\n[train]\nsteps = 1\n'
                       f'zero_terminal_snr = true\n[output]\ndir = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match="zero_terminal_snr = true needs a v-prediction base"):
        Trainer(cfg, progress=False).setup()  # the embedded tiny-sd predicts epsilon
