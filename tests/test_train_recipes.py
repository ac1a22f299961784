"""Recipe features of the trainer on the embedded model: --resume auto, EMA, LoRA+, optimisers, validation loss,
per-block rules, previews at several strengths. Runs are a few steps at rank 2 without prior preservation."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers_train import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.config import loads_config
from sdtune.toy import world as tw
from sdtune.train import state as ckpt
from sdtune.train.loop import Trainer, read_log, train


@pytest.fixture(scope="module")
def inst(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    tw.write_instance_folder("sks", root / "inst", n=4)
    return root / "inst"


config = tiny_config


def _cancel_at(step: int):
    flag = threading.Event()
    return flag, (lambda event: event.step == step and flag.set())


def test_resume_auto_starts_fresh_then_resumes(inst, tmp_path, capsys):
    cfg = config(inst, tmp_path / "run", "train.steps=4")
    flag, stop = _cancel_at(2)
    first = train(cfg, resume="auto", progress=False, callback=stop, cancel=flag)
    assert first.status == "cancelled" and first.resumed_from is None
    assert "no complete checkpoint" in capsys.readouterr().out
    rest = train(cfg, resume="auto", progress=False)
    assert rest.resumed_from is not None and rest.resumed_from.name == "step-000002"
    assert "resuming from" in capsys.readouterr().out and rest.status == "finished" and len(rest.losses) == 2
    with pytest.raises(FileNotFoundError, match="--resume auto starts fresh"):
        train(config(inst, tmp_path / "empty"), resume="latest", progress=False)
    from sdtune.config import ConfigError
    with pytest.raises(ConfigError, match="optimiser state does not fit"), pytest.warns(UserWarning):
        train(config(inst, tmp_path / "run", "train.steps=4", "optim.lora_plus_ratio=4"), resume="auto",
              progress=False)


# ------------------------------------------------------------------------------------------------ EMA

def test_ema_update_formula_and_warmup():
    from sdtune.train.ema import EMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9, warmup_steps=4)
    assert [ema.decay_at(t) for t in (1, 2, 4, 8)] == pytest.approx([0.225, 0.45, 0.9, 0.9])
    want = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        p.data.fill_(value)
        ema.update([p], step)
        d = 0.9 * min(1, step / 4)
        want = d * want + (1 - d) * value
        assert torch.allclose(ema.average["w"], want, atol=1e-6)
    q = torch.nn.Parameter(torch.zeros(3))
    other = EMA([("w", q)], decay=0.9)
    other.load_state_dict(ema.state_dict())
    other.copy_to([q])
    assert torch.equal(q.data, ema.average["w"])
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"v": torch.zeros(3)})


@pytest.mark.parametrize("outputs", ["ema", "raw"])
def test_export_and_previews_use_the_chosen_weights(inst, tmp_path, outputs):
    out = tmp_path / "run"
    trainer = Trainer(config(inst, out, "train.ema_decay=0.5", f"train.ema_outputs={outputs}",
                             "output.validation_prompts=['a sks star']", "output.sample_steps=2",
                             "output.sample_count=1"), progress=False)
    trainer.setup()
    result = trainer.run()
    raw = {k: v.clone() for k, v in trainer.injection.state_dict().items()}
    exported = load_file(out / "adapter.sdtune")
    want = trainer.ema.state_dict() if outputs == "ema" else raw
    assert all(torch.equal(exported[k], want[k].to(exported[k].dtype)) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported) == (outputs == "ema")
    # previews and export swapped the weights back: the live adapters are the raw ones
    assert result.samples and all(torch.equal(v, raw[k]) for k, v in trainer.injection.state_dict().items())
    state, _ = ckpt.load(result.checkpoint)
    assert set(state["ema"]) == set(raw)


def test_save_every_exports_the_weights_that_step_would_finish_with(inst, tmp_path):
    """adapter-step-000002.safetensors of a 4-step run is the file a 2-step run ends with (constant schedule),
    EMA weights included; the final file keeps its name."""
    ema = ("train.ema_decay=0.5",)
    events = []
    train(config(inst, tmp_path / "long", "train.steps=4", "output.save_every=2", *ema), progress=False,
          callback=events.append)
    train(config(inst, tmp_path / "short", "train.steps=2", *ema), progress=False)
    written = sorted(p.name for p in (tmp_path / "long").glob("adapter*.safetensors"))
    assert written == ["adapter-step-000002.safetensors", "adapter.safetensors"]
    assert [Path(e.export).name for e in events if e.export] == ["adapter-step-000002.safetensors"]
    mid, short = tmp_path / "long" / written[0], tmp_path / "short" / "adapter.safetensors"
    a, b = load_file(mid), load_file(short)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in load_file(tmp_path / "long" / written[1]).items())
    with safe_open(str(mid), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"


# ------------------------------------------------------------------------------------------------ LoRA+

B_OF = {"locon": {"lora.up"}, "flora": {"lora.a_out"}, "dora": {"lora.up"}, "spectral": {"lora.a_u"}}


@pytest.mark.parametrize("algo", list(B_OF))
def test_lora_plus_groups_give_the_b_factors_ratio_times_the_lr(fresh_tiny_model, tmp_path, algo):
    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach
    from sdtune.train.optim import build, param_groups

    m = fresh_tiny_model
    spec = AdapterSpec(algo, rank=2)
    inj = attach(m.components(), [("attn", spec), ("te", spec)], m.arch, svd_cache_dir=tmp_path)
    groups = param_groups(inj, 1e-4, 5e-5, lora_plus_ratio=8)
    by_name = {g["name"]: g for g in groups}
    assert {k: g["lr"] for k, g in by_name.items()} == pytest.approx(
        {"unet": 1e-4, "unet.B": 8e-4, "text": 5e-5, "text.B": 4e-4})
    for label, component in (("unet.B", True), ("text.B", False)):
        want = {id(p) for name, a in inj.adapters.items() for n, p in a.trainable_named_parameters()
                if n in B_OF[algo] and (inj.places[name].component == "unet") == component}
        assert want and {id(p) for p in by_name[label]["params"]} == want
    assert sum(len(g["params"]) for g in groups) == sum(
        len(a.trainable_named_parameters()) for a in inj.adapters.values())
    opt = build("adamw", groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, device=torch.device("cpu"))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    assert [g["name"] for g in param_groups(inj, 1e-4, 5e-5)] == ["unet", "text"]  # ratio 1: no B groups


# ------------------------------------------------------------------------------------------------ optimisers

OPTIMIZERS = {"prodigy": ("prodigyopt", ["optim.lr_unet=1.0"]),
              "schedulefree_adamw": ("schedulefree", ["optim.lr_unet=3e-3"]),
              "lion": ("lion_pytorch", ["optim.lr_unet=3e-4"]),
              "adafactor": (None, ["optim.lr_unet=3e-3"])}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_each_optimizer_lowers_the_loss(inst, tmp_path, kind):
    module, overrides = OPTIMIZERS[kind]
    if module:
        pytest.importorskip(module, reason=f"optional extra for {kind}: pip install 'sdtune[optimizers]'")
    trainer = Trainer(config(inst, tmp_path / "run", f"optim.optimizer={kind}", "train.steps=5",
                             "train.batch_size=2", *overrides), progress=False)
    trainer.setup()
    before = trainer.eval_loss()
    result = trainer.run()
    with trainer._output_weights():  # schedule-free: the average x, what previews and the export use
        after = trainer.eval_loss()
    assert result.status == "finished" and after < before, f"{kind}: {before:.5f} -> {after:.5f}"


def test_schedule_free_previews_restore_the_training_weights(inst, tmp_path):
    pytest.importorskip("schedulefree")
    trainer = Trainer(config(inst, tmp_path / "run", "optim.optimizer=schedulefree_adamw", "train.steps=2"),
                      progress=False)
    trainer.setup()
    trainer.run()
    y = [p.detach().clone() for p in trainer.params]
    with trainer._output_weights():
        x = [p.detach().clone() for p in trainer.params]
    assert any(not torch.equal(a, b) for a, b in zip(x, y))  # eval mode swapped in the average
    assert all(torch.equal(p, a) for p, a in zip(trainer.params, y))  # and the exact training weights came back
    assert trainer.optimizer.optimizer.param_groups[0]["train_mode"]


def test_optimizer_errors_name_the_fix(inst, tmp_path, monkeypatch):
    from sdtune.config import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'sdtune\[optimizers\]'"):
        train(config(inst, tmp_path / "a", "optim.optimizer=prodigy"), progress=False)
    with pytest.raises(ConfigError, match="schedule.scheduler = 'constant'"):
        train(config(inst, tmp_path / "b", "optim.optimizer=schedulefree_adamw", "schedule.scheduler=cosine"),
              progress=False)


# ------------------------------------------------------------------------------------------------ validation loss

def test_validation_loss_is_the_same_across_runs_and_resumes(inst, tmp_path):
    extra = ["train.steps=4", "train.validation_images=1", "train.validation_every=2"]
    full = Trainer(config(inst, tmp_path / "a", *extra), progress=False)
    full.setup()
    assert len(full.dataset.instances) == 3 and len(full.val_views) == 1  # one of 4 held out
    assert full.val_views[0][1].path not in {ex.path for ex in full.dataset.instances}
    full.run()
    cfg = config(inst, tmp_path / "b", *extra)
    flag, stop = _cancel_at(2)
    train(cfg, progress=False, callback=stop, cancel=flag)
    train(cfg, resume="auto", progress=False)
    rows_a, rows_b = read_log(tmp_path / "a" / "log.csv"), read_log(tmp_path / "b" / "log.csv")
    val_a = [(r["step"], r["val_loss"]) for r in rows_a if r["val_loss"]]
    assert [s for s, _ in val_a] == ["2", "4"] and all(float(v) > 0 for _, v in val_a)
    assert val_a == [(r["step"], r["val_loss"]) for r in rows_b if r["val_loss"]]  # bit-identical reprs
    assert (tmp_path / "b" / "loss.png").is_file()


# ------------------------------------------------------------------------------------------------ per-block rules

def test_per_block_rules_set_ranks_in_the_file_and_lrs_in_the_optimizer(inst, tmp_path, fresh_tiny_model):
    from sdtune.inject import Injection
    from sdtune.inspect import format_inspection, inspect_file

    out = tmp_path / "run"
    cfg = config(inst, out, "train.steps=1", "train.train_text_encoder=true", "optim.lr_text=1e-4")
    cfg.adapters.append(type(cfg.adapters[0])(preset="attn", rank=4, blocks=["mid_block"], lr_multiplier=0.5))
    cfg.adapters.append(type(cfg.adapters[0])(preset="te", rank=1, layers=[0, 0], lr_multiplier=2.0))
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    groups = {g["name"]: g for g in trainer.optimizer.optimizer.param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == pytest.approx({"unet": 1e-3, "unet×0.5": 5e-4, "text×2": 2e-4})
    mid = {id(p) for n, a in trainer.injection.adapters.items() if "mid_block" in n
           for _, p in a.trainable_named_parameters()}
    assert mid and {id(p) for p in groups["unet×0.5"]["params"]} == mid
    trainer.run()
    info = inspect_file(out / "adapter.safetensors", trainer.model)
    ranks = info["block_ranks"]
    assert ranks["unet.mid_block"] == {"4": len([n for n in trainer.injection.adapters if "mid_block" in n])}
    assert all(set(r) == {"2"} for b, r in ranks.items() if b.startswith("unet.") and b != "unet.mid_block")
    assert [b for b in ranks if b.startswith("te")] == ["te.layers.0"] and ranks["te.layers.0"] == {"1": 6}
    assert "unet.mid_block r4" in format_inspection(info)
    # the native file replays the scoped rules on a fresh model
    again = Injection.load(out / "adapter.sdtune", fresh_tiny_model.components(), fresh_tiny_model.arch)
    assert {n: a.spec.rank for n, a in again.adapters.items()} == {
        n: a.spec.rank for n, a in trainer.injection.adapters.items()}


def test_block_rule_errors():
    from sdtune.config import ConfigError

    inst_free = '[data]\ninstance_dir = "x"\n[[adapters]]\npreset = "attn"\n'
    for extra, match in (('blocks = ["down.0"]', "expected down_blocks.N"),
                         ('layers = [0, 3]', "only for preset 'te'"),
                         ('lr_multiplier = 0', "expected a positive number")):
        with pytest.raises(ConfigError, match=match):
            loads_config(inst_free + extra + "\n")


# ------------------------------------------------------------------------------------------------ previews, W&B

def test_preview_rows_per_strength_and_wandb_logging(inst, tmp_path, monkeypatch):
    import sys
    import types

    from PIL import Image

    from sdtune.inject import plain_layers
    from sdtune.sample import SampleRequest, generate

    logged, finished = [], []

    class FakeRun:  # records what the trainer sends to W&B (the real package needs an account or offline files)
        def log(self, data, step):
            logged.append((step, sorted(data)))

        def finish(self):
            finished.append(True)

    fake = types.SimpleNamespace(init=lambda **kw: logged.append(("init", kw["project"])) or FakeRun(),
                                 Image=lambda path: path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = Trainer(config(inst, tmp_path / "run", "train.steps=2", "optim.lr_unet=1e-2",
                             "output.validation_prompts=['a sks star']", "output.sample_steps=2",
                             "output.sample_count=1", "output.sample_strengths=[0.0, 3.0]",
                             "output.wandb_project='sdtune-test'", "train.validation_images=1"), progress=False)
    trainer.setup()
    result = trainer.run()
    grid = Image.open(result.samples[-1])
    assert grid.size == (32, 64)  # one column, rows: the prompt at strength 0, at strength 3
    at0, at3 = grid.crop((0, 0, 32, 32)), grid.crop((0, 32, 32, 64))
    req = SampleRequest(prompts=["a sks star"], steps=2, count=1, size=32)
    with plain_layers(trainer.model.components()):
        base = generate(trainer.model, req, progress=False)[0].image
    assert list(at0.getdata()) == list(base.getdata())  # strength 0 is the base model
    assert list(at3.getdata()) != list(base.getdata())
    assert logged[0] == ("init", "sdtune-test") and finished == [True]
    assert (1, ["grad_norm", "loss", "lr_unet"]) in logged
    assert (2, ["grad_norm", "loss", "lr_unet", "val_loss"]) in logged and (2, ["preview"]) in logged


def test_preview_blocks_apply_block_weights_to_the_preview_grid(inst, tmp_path):
    from PIL import Image

    from sdtune.inject import plain_layers
    from sdtune.sample import SampleRequest, generate

    trainer = Trainer(config(inst, tmp_path / "run", "train.steps=2", "optim.lr_unet=1e-2",
                             "output.validation_prompts=['a sks star']", "output.sample_steps=2",
                             "output.sample_count=1", f"output.preview_blocks='{','.join(['0'] * 26)}'"),
                      progress=False)  # SD1's 26-value vector at 0: every block (the tiny U-Net uses IN03, OUT02)
    trainer.setup()
    result = trainer.run()
    req = SampleRequest(prompts=["a sks star"], steps=2, count=1, size=32)
    with plain_layers(trainer.model.components()):
        base = generate(trainer.model, req, progress=False)[0].image.tobytes()
    assert Image.open(result.samples[-1]).tobytes() == base  # every block at 0: the base model exactly
    trainer.preview_blocks = None
    assert Image.open(trainer.preview(99)).tobytes() != base  # the same adapters without block weights


def test_preview_blocks_errors_name_the_key(inst, tmp_path):
    from sdtune.config import ConfigError, describe

    assert "preview_blocks" in describe()
    for spec, match in (("nowhere=0", "unknown block 'nowhere'"), ("1,2,3", "3 values"), ("", "0 values")):
        with pytest.raises(ConfigError, match=rf"\[output\] preview_blocks = '{spec}': {match}"):
            config(inst, tmp_path / "run", f"output.preview_blocks='{spec}'")
    sdxl_vector = "1,0,0,1,1,1,1,1,1,0,0,0"  # SDXL's MIDD: loads, then does not fit the SD1 model
    trainer = Trainer(config(inst, tmp_path / "run", f"output.preview_blocks='{sdxl_vector}'"), progress=False)
    with pytest.raises(ConfigError, match=r"\[output\] preview_blocks = .*12 values; SD1 takes 17 or 26"):
        trainer.setup()


def test_wandb_missing_is_a_clear_error(inst, tmp_path, monkeypatch):
    from sdtune.config import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(config(inst, tmp_path / "run", "output.wandb_project='x'"), progress=False)


def test_the_small_flora_demo_has_at_most_30_percent_of_the_locon_demos_parameters(fresh_tiny_model):
    """Issue 20's size claim, counted on the embedded model: the adapters each recipe attaches (U-Net and, when the
    recipe trains it, the text encoder)."""
    from sdtune.config import load_config
    from sdtune.inject import attach
    from sdtune.resources import recipe_path

    def trainable(name: str) -> int:
        cfg = load_config(recipe_path(name))
        comps = fresh_tiny_model.components()
        adapted = {k: m for k, m in comps.items() if k == "unet" or k in cfg.train.trained_text_encoders(comps)}
        injection = attach(adapted, cfg.rules(), fresh_tiny_model.arch)
        try:
            return injection.num_params()
        finally:
            injection.detach()

    locon, small, flora = trainable("demo"), trainable("demo-flora-small"), trainable("demo-flora")
    assert locon == 381_696 and small <= 0.30 * locon < flora < locon
