"""The preflight memory estimate (``sdtune train --dry-run``, ``sdtune.train.memory``): the fake-tensor step traces the
same bytes as the real step, gradient checkpointing and batch size move it the right way, the optimizer state is the
optimizers' own, and the CLI writes nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.config import load_config
from sdtune.models import load
from sdtune.resources import ASSETS, recipe_path
from sdtune.train import memory, optim
from sdtune.train.loop import attach_adapters


def _attached(recipe: str, *overrides: str, model_path=None):
    cfg = load_config(recipe_path(recipe), list(overrides))
    model = load(model_path)
    for m in model.components().values():
        m.requires_grad_(False)
    injection, trained, _ = attach_adapters(cfg, model, Path("unused"), base_dtype=cfg.train.base_dtype)
    return cfg, model, trained, [p for _, p in optim.trainable(injection)]


@pytest.mark.parametrize("model_path", [None, ASSETS / "tiny-sdxl"], ids=["sd1", "sdxl"])
def test_the_fake_step_traces_the_real_steps_bytes(model_path):
    """The same step (VAE encode, trained text encoders, U-Net, loss, backward) on fake and on real tensors: the
    live-bytes peaks agree within 0.5 %; checkpointing lowers it, a larger batch raises it."""
    cfg, model, trained, params = _attached("demo-sdxl" if model_path else "demo", model_path=model_path)
    assert trained  # the text encoder(s) are in the traced graph
    args = (model, trained, params, 4, (64, 64), None, True)
    fake, real = memory.step_bytes(*args), memory.step_bytes(*args, fake=False)
    assert abs(fake - real) / real < 0.005, (fake, real)
    assert memory.step_bytes(model, trained, params, 8, (64, 64), None, True) > 1.5 * fake
    model.pipeline.unet.enable_gradient_checkpointing()
    assert memory.step_bytes(*args) < fake


@pytest.mark.parametrize("kind", ["adamw", "adafactor", "lion", "prodigy", "schedulefree_adamw"])
def test_optimizer_state_is_the_optimizers_own(kind):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(8, 32), (16, 4, 3, 3), (16,), (300, 20)]]
    opt = optim.build(kind, [{"params": params, "lr": 1e-3}], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                      device=torch.device("cpu"))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    held = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1)
    assert memory.optimizer_bytes(kind, params) == held


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from sdtune.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "demo", "--dry-run", "--set", "train.mixed_precision=bf16", "--set",
                 "train.base_dtype=bf16"]) == 0
    out = capsys.readouterr().out
    assert "peak while training" in out and "one step's tensors (batch 8 at 64×64 px)" in out
    assert list(tmp_path.iterdir()) == []


def test_estimate_adds_up_and_lowering_the_base_shows():
    cfg, model, trained, params = _attached("demo")
    fp32 = memory.estimate(cfg, model, params, trained, (64, 64))
    assert fp32.gradients == 4 * sum(p.numel() for p in params)
    assert fp32.optimizer == 2 * fp32.gradients and fp32.ema == 0 and fp32.batch == 8  # prior doubles the batch
    assert fp32.peak == fp32.weights + fp32.gradients + fp32.optimizer + fp32.step
    cfg16, model16, trained16, params16 = _attached("demo", "train.base_dtype=bf16", "train.mixed_precision=bf16",
                                                    "train.train_text_encoder=false")
    bf16 = memory.estimate(cfg16, model16, params16, trained16, (64, 64))
    assert bf16.weights < 0.7 * fp32.weights and bf16.step < fp32.step
    # a frozen text encoder is stored in the base dtype too (its outputs are cached); the VAE stays fp32
    assert {p.dtype for p in model16.pipeline.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model16.pipeline.vae.parameters()} == {torch.float32}
