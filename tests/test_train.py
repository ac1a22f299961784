"""The trainer on the embedded model: a short run per algorithm, exact resume, a SIGKILLed run, guards.

Every run is a few steps at batch 1–2 with tiny ranks; class images (2) are generated once per module.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.config import ConfigError, loads_config
from sdtune.data.dataset import DataError, scan_instance_dir
from sdtune.formats.reader import read_kohya
from sdtune.toy import world as tw
from sdtune.train import state as ckpt
from sdtune.train.loop import DiskSpaceError, Trainer, TrainingDiverged, read_log, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Instance images (4 sks stars with captions) and a class-image cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("train")
    tw.write_instance_folder("sks", root / "inst", n=4)
    return root


def config(shared: Path, out: Path, *overrides: str):
    text = f"""
[data]
instance_dir = "{shared / 'inst'}"
[prior]
enabled = true
class_prompt = "a star"
class_dir = "{shared / 'class'}"
num_class_images = 2
sample_steps = 2
[[adapters]]
preset = "attn"
rank = 2
[[adapters]]
preset = "resnet"
rank = 2
[optim]
lr_unet = 1e-3
[train]
steps = 4
batch_size = 1
[output]
dir = "{out}"
validation_prompts = ["a sks star"]
sample_steps = 2
sample_count = 1
"""
    return loads_config(text, list(overrides))


ALGOS = {
    "locon": [],
    "flora": ["adapters.algorithm=flora"],
    "dora": ["adapters.algorithm=dora"],
    "spectral": ["adapters.algorithm=spectral", "optim.lr_unet=1e-3"],
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_short_run_per_algorithm_learns_and_writes_everything(algo, shared, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(shared, out, "train.steps=5", "train.batch_size=2", "output.checkpoint_every=2",
                             "optim.lr_unet=3e-3", *ALGOS[algo]), progress=False)
    trainer.setup()
    before = trainer.eval_loss()
    result = trainer.run()
    after = trainer.eval_loss()
    assert result.status == "finished" and result.step == 5 and len(result.losses) == 5
    assert all(math.isfinite(v) for v in result.losses)
    assert after < before, f"{algo}: fixed-noise loss {before:.5f} -> {after:.5f}"
    for name in ("adapter.sdtune", "adapter.safetensors", "config.toml", "log.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3, 4, 5]
    assert [p.name for p in ckpt.complete(out / "checkpoints")] == ["step-000004", "step-000005"]  # keep 2
    assert result.samples and all(p.is_file() for p in result.samples)
    assert Image.open(result.samples[-1]).size == (64, 64)
    file = read_kohya(out / "adapter.safetensors", trainer.model.components(), trainer.model.arch)
    assert set(file.modules) == set(trainer.injection.adapters)
    assert file.metadata["ss_steps"] == "5"
    summary = (out / "adapters.txt").read_text()
    assert f"{trainer.injection.num_params():,}" in summary.splitlines()[-1] and algo in summary
    # the resolved config in the run folder reloads to the same config
    assert loads_config((out / "config.toml").read_text()) == trainer.cfg


def _cancel_at(step: int):
    flag = threading.Event()
    return flag, (lambda event: event.step == step and flag.set())


def test_resume_repeats_the_uninterrupted_run_exactly(shared, tmp_path):
    # the hard settings: accumulation, warm-up + cosine, random crops and flips, prior preservation, noise offset,
    # EMA with warm-up (the export is the average, so the adapter check below covers it), LoRA+ groups
    extra = ["train.steps=6", "train.grad_accum=2", "schedule.scheduler=cosine", "schedule.warmup_steps=2",
             "data.crop=random", "data.flip=true", "train.noise_offset=0.05", "train.min_snr_gamma=5",
             "train.ema_decay=0.8", "train.ema_warmup_steps=2", "optim.lora_plus_ratio=4",
             "output.validation_prompts=[]"]
    full = train(config(shared, tmp_path / "a", *extra), progress=False)
    cfg = config(shared, tmp_path / "b", *extra)
    flag, stop = _cancel_at(3)
    first = train(cfg, progress=False, callback=stop, cancel=flag)
    assert first.status == "cancelled" and first.step == 3 and first.adapter is None
    rest = train(cfg, resume="latest", progress=False)
    assert rest.status == "finished" and len(rest.losses) == 3
    assert full.losses == first.losses + rest.losses  # bit-identical floats, step for step
    assert read_log(tmp_path / "a" / "log.csv") == [
        {**r, "seconds": a["seconds"]} for r, a in zip(read_log(tmp_path / "b" / "log.csv"),
                                                        read_log(tmp_path / "a" / "log.csv"))]
    a, b = load_file(tmp_path / "a" / "adapter.sdtune"), load_file(tmp_path / "b" / "adapter.sdtune")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = ckpt.load(full.checkpoint)[0]["ema"], ckpt.load(rest.checkpoint)[0]["ema"]
    assert ema_a.keys() == a.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_sigkill_mid_run_resumes_from_the_last_checkpoint(shared, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdtune.cli", "train", str(tmp_path / "cfg.toml"), "--quiet"]
    (tmp_path / "cfg.toml").write_text(config(shared, out, "train.steps=400", "output.checkpoint_every=2",
                                              "output.validation_prompts=[]").to_toml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(ckpt.complete(out / "checkpoints")) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # what a kill during a save leaves behind: a half-written temp folder
    (out / "checkpoints" / ".tmp-step-999999-1").mkdir()
    (out / "checkpoints" / ".tmp-step-999999-1" / "trainer.pt").write_bytes(b"\x80half")
    latest = ckpt.complete(out / "checkpoints")[-1]
    step = int(latest.name.split("-")[1])
    state, tensors = ckpt.load(latest)  # loadable
    assert state["step"] == step and tensors
    with pytest.warns(UserWarning, match="config differs"):  # train.steps changed
        result = train(config(shared, out, f"train.steps={step + 2}", "output.checkpoint_every=2",
                              "output.validation_prompts=[]"), resume="latest", progress=False)
    assert result.status == "finished" and result.step == step + 2 and len(result.losses) == 2
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == list(range(1, step + 3))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "adapter.safetensors").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(config(shared, out, "train.steps=6", "output.checkpoint_every=2"), progress=False)
    trainer.setup()
    real = trainer.loss
    calls = []

    def loss(views):  # an inf appears in step 4
        calls.append(1)
        value = real(views)
        return value * float("inf") if len(calls) == 4 else value

    monkeypatch.setattr(trainer, "loss", loss)
    with pytest.raises(TrainingDiverged) as e:
        trainer.run()
    message = str(e.value)
    assert "step 4" in message and "lower the learning rate" in message.lower() and "step-000002" in message
    assert e.value.step == 4 and e.value.checkpoint.name == "step-000002"
    assert [p.name for p in ckpt.complete(out / "checkpoints")] == ["step-000002"]
    state, tensors = ckpt.load(e.value.checkpoint)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "adapter.safetensors").exists()


def test_huge_learning_rate_diverges_with_a_message(shared, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+.*try 1e\+29"):
        train(config(shared, tmp_path / "run", "optim.lr_unet=1e30", "optim.grad_clip=none", "train.steps=6",
                     "output.validation_prompts=[]"), progress=False)


def test_text_encoder_changes_only_when_trained(shared, tmp_path):
    def te_state(trainer):
        return {k: v.clone() for k, v in trainer.model.pipeline.text_encoder.state_dict().items()}

    off = Trainer(config(shared, tmp_path / "off", "train.steps=3", "output.validation_prompts=[]"), progress=False)
    off.setup()
    before = te_state(off)
    off.run()
    assert not any(off.injection.places[n].component == "text_encoder" for n in off.injection.adapters)
    after = te_state(off)
    assert all(torch.equal(before[k], after[k]) for k in before)

    # with gradient checkpointing in both models: the adapters inside checkpointed blocks must still get gradients
    on = Trainer(config(shared, tmp_path / "on", "train.steps=3", "train.train_text_encoder=true",
                        "train.gradient_checkpointing=true", "optim.lr_text=1e-2", "output.validation_prompts=[]"),
                 progress=False)
    on.setup()
    te_names = [n for n in on.injection.adapters if on.injection.places[n].component == "text_encoder"]
    assert te_names and len(on.optimizer.param_groups) == 2 and on.optimizer.param_groups[1]["lr"] == 1e-2
    before = {k: v.clone() for k, v in on.injection.state_dict().items() if k.startswith("lora_te")}
    base_before = {k: v.clone() for k, v in te_state(on).items() if ".lora." not in k}
    on.run()
    after = on.injection.state_dict()
    assert on.model.pipeline.unet.is_gradient_checkpointing
    ups = [k for k in before if k.endswith(".lora.up")]
    assert ups and all(not torch.equal(before[k], after[k]) for k in ups)  # every TE adapter got gradients
    assert all(torch.equal(base_before[k], v) for k, v in te_state(on).items() if k in base_before)  # base frozen
    assert any(k.startswith("lora_te") for k in load_file(tmp_path / "on" / "adapter.safetensors"))


def test_text_encoder_steps_freezes_the_text_adapters_and_resumes_exactly(shared, tmp_path):
    extra = ["train.steps=5", "train.train_text_encoder=true", "train.text_encoder_steps=2", "optim.lr_text=1e-2",
             "output.validation_prompts=[]"]
    trainer = Trainer(config(shared, tmp_path / "a", *extra), progress=False)
    trainer.setup()
    states = []
    trainer.callback = lambda event: states.append({k: v.clone() for k, v in trainer.injection.state_dict().items()})
    full = trainer.run()
    te = [k for k in states[0] if k.startswith("lora_te") and k.endswith(".lora.up")]
    unet = [k for k in states[0] if k.startswith("lora_unet") and k.endswith(".lora.up")]
    assert te and unet
    changed = lambda keys, i: any(not torch.equal(states[i][k], states[i + 1][k]) for k in keys)
    assert changed(te, 0)                                   # step 2 still trains the text encoder
    assert not any(changed(te, i) for i in (1, 2, 3))       # steps 3–5 leave it as it was
    assert all(changed(unet, i) for i in (1, 2, 3))         # while the U-Net goes on
    assert [float(r["lr_text"]) > 0 for r in read_log(tmp_path / "a" / "log.csv")] == [True, True, False, False, False]
    # a resume after the freeze repeats the uninterrupted run bit for bit
    cfg = config(shared, tmp_path / "b", *extra)
    flag, stop = _cancel_at(3)
    first = train(cfg, progress=False, callback=stop, cancel=flag)
    rest = train(cfg, resume="latest", progress=False)
    assert full.losses == first.losses + rest.losses
    a, b = load_file(tmp_path / "a" / "adapter.sdtune"), load_file(tmp_path / "b" / "adapter.sdtune")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="needs train_text_encoder"):
        config(shared, tmp_path / "c", "train.text_encoder_steps=2")


def test_text_prior_weight_holds_the_class_encoding_to_the_base(shared, tmp_path):
    drift = {}
    for w in (1e-9, 100.0):
        t = Trainer(config(shared, tmp_path / str(w), "train.steps=4", "train.train_text_encoder=true",
                           "optim.lr_text=1e-2", f"prior.text_prior_weight={w}", "output.validation_prompts=[]"),
                    progress=False)
        t.setup()
        assert t.text_prior[0] == ["a star"] and float(t.text_drift()) == 0.0  # zero-initialised up factors
        t.run()
        drift[w] = float(t.text_drift())
    assert 0 < drift[100.0] < drift[1e-9] / 4, drift
    off = Trainer(config(shared, tmp_path / "off", "prior.text_prior_weight=1"), progress=False)
    off.setup()
    assert off.text_prior is None  # no text encoder trains: nothing to hold


def _corrupt(folder: Path) -> None:
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "broken.txt").write_text("a sks star")


def test_corrupt_image_stops_before_training_or_is_skipped(shared, tmp_path):
    inst = tmp_path / "inst"
    tw.write_instance_folder("sks", inst, n=2)
    _corrupt(inst)
    out = tmp_path / "run"
    cfg = config(shared, out, f"data.instance_dir={inst}", "train.steps=1", "output.validation_prompts=[]")
    with pytest.raises(DataError, match="broken.png.*corrupt"):
        train(cfg, progress=False)
    assert not (out / "log.csv").exists()
    cfg = config(shared, out, f"data.instance_dir={inst}", "train.steps=1", "output.validation_prompts=[]",
                 "data.skip_bad_images=true")
    with pytest.warns(UserWarning, match="broken.png"):
        result = train(cfg, progress=False)
    assert result.status == "finished"


def test_data_guards(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_instance_dir(tmp_path / "missing", 64, prompt="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_instance_dir(tmp_path / "empty", 64, prompt="x")
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (32, 48)).save(small / "tiny.png")
    with pytest.raises(DataError, match=r"tiny.png: 32×48 is smaller than the training resolution 64"):
        scan_instance_dir(small, 64, prompt="x")
    with pytest.raises(DataError, match="tiny.png: no caption: write tiny.txt"):
        scan_instance_dir(small, 32, prompt=None)
    (small / "tiny.txt").write_text("a sks star\n")
    assert scan_instance_dir(small, 32, prompt=None)[0].caption == "a sks star"


def test_class_image_cache_belongs_to_one_prompt_and_one_base_model(fresh_tiny_model, tmp_path):
    """Prior preservation replays the base model's own prior: a cache made by another model is refused."""
    from sdtune.data.classes import ensure_class_images

    kw = dict(resolution=64, steps=2, guidance=5.0, progress=False)
    first = ensure_class_images(fresh_tiny_model, tmp_path, "a star", 1, **kw)
    stamp = (tmp_path / "class_00000.png").stat().st_mtime_ns
    assert ensure_class_images(fresh_tiny_model, tmp_path, "a star", 1, **kw) == first      # cached, not redrawn
    assert (tmp_path / "class_00000.png").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="made for prompt 'a star', not 'a circle'"):
        ensure_class_images(fresh_tiny_model, tmp_path, "a circle", 1, **kw)
    with torch.no_grad():
        fresh_tiny_model.pipeline.unet.conv_out.bias.add_(0.01)
    with pytest.raises(DataError, match="made for base model .* delete that folder"):
        ensure_class_images(fresh_tiny_model, tmp_path, "a star", 1, **kw)


def test_class_prompt_alternatives_cycle_and_extend_the_cache(fresh_tiny_model, tmp_path):
    """A style's class prompt lists subjects with '|': image i shows alternative i mod k with seed i // k, so the
    same image comes out whether it is drawn alone or in a batch, and a larger count only adds images."""
    from PIL import Image, ImageChops

    from sdtune.data.classes import class_prompts, ensure_class_images
    from sdtune.sample import SampleRequest, generate

    assert class_prompts(" a circle | a square|") == ["a circle", "a square"]
    with pytest.raises(DataError, match="empty"):
        class_prompts(" | ")
    kw = dict(resolution=64, steps=2, guidance=5.0, progress=False)
    three = ensure_class_images(fresh_tiny_model, tmp_path, "a circle | a square", 3, **kw)
    assert [e.caption for e in three] == ["a circle", "a square", "a circle"]
    stamp = (tmp_path / "class_00001.png").stat().st_mtime_ns
    five = ensure_class_images(fresh_tiny_model, tmp_path, "a circle | a square", 5, **kw)
    assert [e.caption for e in five] == ["a circle", "a square", "a circle", "a square", "a circle"]
    assert (tmp_path / "class_00001.png").stat().st_mtime_ns == stamp
    assert ensure_class_images(fresh_tiny_model, tmp_path, "a circle|a square", 5, **kw) == five   # same prompt
    # image 3 = the square's second draw: seed 1, as if generated alone
    alone = generate(fresh_tiny_model, SampleRequest(["a square"], seed=1, count=1, steps=2, guidance=5.0, size=64),
                     progress=False)[0].image
    assert ImageChops.difference(Image.open(five[3].path).convert("RGB"), alone.convert("RGB")).getbbox() is None


def test_not_enough_disk_is_an_error_before_training(shared, tmp_path, monkeypatch):
    import shutil

    from sdtune.train import loop as train_module

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(train_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    out = tmp_path / "run"
    with pytest.raises(DiskSpaceError, match="MB free"):
        train(config(shared, out, "train.steps=1"), progress=False)
    assert not (out / "checkpoints").exists() and not (out / "log.csv").exists()


@pytest.mark.slow
def test_two_process_data_parallel_with_accelerate_launch(shared, tmp_path):
    """Two CPU processes through ``accelerate launch`` train together (gloo all-reduce of the adapter gradients).

    accelerate 1.x starts CPU processes with torchrun under ``--multi_gpu`` (the Accelerator is told cpu=True when
    no GPU exists); ``--cpu --num_processes 2`` alone needs mpirun and otherwise starts a single process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(config(shared, out, "train.steps=3", "output.validation_prompts=[]").to_toml())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtune.cli", "train",
           str(cfg_path), "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(r["step"]) for r in read_log(out / "log.csv")] == [1, 2, 3]
    assert (out / "adapter.safetensors").is_file()
    state, _ = ckpt.load(ckpt.complete(out / "checkpoints")[-1])
    assert state["num_processes"] == 2 and state["samples_seen"] == 3 * 2
