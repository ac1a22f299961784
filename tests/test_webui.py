"""The web UI's refusals and config building, through its handler functions (no browser, no model)."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_train import tiny_config
from PIL import Image
from safetensors.torch import save_file

from sdtune.resources import recipes
from sdtune.toy import world as tw
from sdtune.train.loop import TrainResult
from sdtune.train.runlog import read_log
from webui import training, workspace
from webui.studio import Studio, parse_weights
from webui.training import TrainForm, build_config, form_defaults
from webui.workspace import Refused

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TARGETS = {"attn": ("locon", 2, None), "resnet": ("flora", 2, 4.0), "sample": ("off", 8, None),
           "te": ("off", 8, None)}


@pytest.fixture
def studio(tmp_path):
    return Studio(tmp_path / "ws")


@pytest.fixture
def images(tmp_path):
    return tw.write_instance_folder("sks", tmp_path / "src", n=2)


def test_non_image_uploads_are_refused_and_nothing_is_kept(studio, images, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not an image</html>")
    script = tmp_path / "run.sh"
    script.write_text("echo hi")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(Path(images[0]).read_bytes()[:200])
    for bad in (fake, script, truncated):
        with pytest.raises(Refused, match=bad.name):
            studio.train_start("demo", [*images, str(bad)], "", "a sks star", "", TARGETS, 2, 1e-3, "x")
    assert list(studio.ws.uploads.iterdir()) == []  # all or nothing
    assert not studio.job.busy


def test_a_refused_training_request_writes_nothing(studio, images):
    """Issue 18: the whole form (numbers, prompts, targets, image headers) is checked before any upload is copied."""
    bad_requests = [dict(steps=0), dict(lr=0), dict(lr_text=-1), dict(name="../x", steps=None),
                    dict(targets={p: ("off", 2, None) for p in TARGETS})]
    for bad in bad_requests:
        args = dict(prompt="a sks star", targets=TARGETS, steps=2, lr=1e-3, name="x", lr_text=None) | bad
        with pytest.raises(Refused):
            studio.train_start("demo", images, "", args["prompt"], "", args["targets"], args["steps"], args["lr"],
                               args["name"], None, args["lr_text"])
    studio.ws.max_pixels = 63 * 63  # the toy images are 64 × 64: over the cap, refused from the header
    with pytest.raises(Refused, match="megapixels"):
        studio.train_start("demo", images, "", "a sks star", "", TARGETS, 2, 1e-3, "x")
    assert list(studio.ws.uploads.iterdir()) == [] and list(studio.ws.runs.iterdir()) == []
    assert not studio.job.busy


def test_paths_outside_the_workspace_are_refused(studio, tmp_path, images):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(Path(images[0]).read_bytes())
    (studio.ws.root / "link").symlink_to(outside)
    for path in ("../outside", str(outside), "link", "uploads/../../outside", "/etc"):
        with pytest.raises(Refused, match="outside"):
            studio.train_start("demo", None, path, "a sks star", "", TARGETS, 2, 1e-3, "x")
    (tmp_path / "evil.safetensors").write_bytes(b"x")
    for name in ("../evil.safetensors", str(tmp_path / "evil.safetensors"), "../../etc/passwd"):
        with pytest.raises(Refused):
            studio.library_delete(name)
        with pytest.raises(Refused):
            studio.sample("a star", "", 0, 2, 5.0, 0, 1, [name], "")
        with pytest.raises(Refused):
            studio.library_details(name)
    assert (tmp_path / "evil.safetensors").exists()
    with pytest.raises(Refused, match="no such folder"):
        studio.train_start("demo", None, "missing", "a sks star", "", TARGETS, 2, 1e-3, "x")
    with pytest.raises(Refused, match="unknown recipe"):
        studio.train_start("../../etc/passwd", images, "", "a", "", TARGETS, 2, 1e-3, "x")


def test_a_second_training_is_refused_while_one_runs_and_cancel_stops_it(studio, images, monkeypatch):
    started = threading.Event()

    def fake_train(config, *, callback, cancel, **_):  # sdtune.train.loop.train's hooks: callback and cancel
        started.set()
        assert cancel.wait(30)
        return TrainResult(Path(config.output.dir), "cancelled", 1, config.train.steps)

    monkeypatch.setattr(training, "train", fake_train)
    studio.train_start("demo", images, "", "a sks star", "", TARGETS, 2, 1e-3, "first")
    assert started.wait(30) and studio.job.busy
    uploads_before = sorted(studio.ws.uploads.iterdir())
    with pytest.raises(Refused, match="already running"):
        studio.train_start("demo", images, "", "a sks star", "", TARGETS, 2, 1e-3, "second")
    assert sorted(studio.ws.uploads.iterdir()) == uploads_before  # refused before copying anything
    assert studio.train_cancel().startswith("cancelling")
    studio.job.wait(30)
    state = studio.job.snapshot()
    assert state.status == "cancelled" and "step 1/2" in state.message
    assert studio.train_cancel() == "no training is running"


def test_invalid_or_oversized_safetensors_are_refused(studio, tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"lora_down.weight": torch.zeros(2, 2)}, pickled)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    no_adapter = tmp_path / "foo.safetensors"
    save_file({"foo": torch.zeros(3)}, no_adapter)
    for bad in (garbage, pickled, ckpt, truncated, empty, no_adapter):
        with pytest.raises(Refused):
            studio.library_import([str(bad)])
    monkeypatch.setattr(workspace, "MAX_ADAPTER_BYTES", 16)
    with pytest.raises(Refused, match="limit"):
        studio.library_import([str(good)])
    assert studio.ws.adapters() == []


def test_the_loss_plot_draws_the_validation_loss_beside_the_training_loss(studio, tmp_path):
    inst = tmp_path / "inst"
    tw.write_instance_folder("sks", inst, n=3)
    studio.job.start(tiny_config(inst, tmp_path / "run", "train.steps=3", "train.validation_images=1",
                                 "train.validation_every=2"))
    studio.job.wait(120)
    state = studio.job.snapshot()
    assert state.status == "finished", state.message
    plot = training.loss_series(state)
    rows = list(zip(plot["step"], plot["series"]))
    assert rows == [(1, "training"), (2, "training"), (3, "training"), (2, "validation"), (3, "validation")]
    assert plot["loss"][:3] == state.losses and all(v > 0 for v in plot["loss"][3:])
    logged = [float(r["val_loss"]) for r in read_log(tmp_path / "run" / "log.csv") if r["val_loss"]]
    assert plot["loss"][3:] == logged  # the same figures as log.csv and loss.png
    untrained = training.loss_series(training.JobState(steps=[1], losses=[0.5]))
    assert untrained == {"step": [1], "loss": [0.5], "series": ["training"]}


def test_blend_and_sample_refuse_bad_requests(studio):
    with pytest.raises(Refused, match="at least two"):
        studio.blend(["a.safetensors"], "", "sum", "b", False)
    with pytest.raises(Refused, match="method"):
        studio.blend(["a.safetensors", "b.safetensors"], "", "magic", "b", False)
    with pytest.raises(Refused, match="zip learns the blend from each concept's prompts"):
        studio.blend(["a.safetensors", "b.safetensors"], "", "zip", "b", False, " \n ")
    with pytest.raises(Refused, match="1 prompt line"):
        studio.blend(["a.safetensors", "b.safetensors"], "", "zip", "b", False, "a sks star; a star")
    with pytest.raises(Refused, match="prompt"):
        studio.sample("  ", "", 0, 2, 5.0, 0, 1, [], "")
    with pytest.raises(Refused, match="count"):
        studio.sample("a star", "", 0, 2, 5.0, 0, 1000, [], "")
    with pytest.raises(Refused, match="needs the adapters"):
        studio.sample("a [sks] star [in qtz style]", "", 0, 2, 5.0, 0, 1, [], "", True)
    assert parse_weights("", 2) == [1.0, 1.0] and parse_weights("0.5; 1", 2) == [0.5, 1.0]
    for text in ("1", "a, b", "nan, 1"):
        with pytest.raises(Refused, match="weights"):
            parse_weights(text, 2)


def test_sample_composed_puts_each_adapter_on_its_phrase(studio, tiny_model, tmp_path):
    from helpers_adapters import write_adapter

    from sdtune.adapters import AdapterSpec

    for k, name in enumerate(("obj", "sty")):
        write_adapter(tiny_model.components(), tmp_path / f"{name}.safetensors",
                      [("attn", AdapterSpec("locon", rank=2))], 70 + k, size=0.5)
    names = studio.library_import([str(tmp_path / "obj.safetensors"), str(tmp_path / "sty.safetensors")])
    paths = studio.sample("a [sks] star [in qtz style]\na star", "", 0, 2, 5.0, 0, 2, names, "", True)["images"]
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    assert json.loads(Image.open(paths[0]).text["sdtune"])["composed"] is True
    with pytest.raises(Refused, match="among 1..2"):
        studio.sample("a [sks] star [3:in qtz style]", "", 0, 2, 5.0, 0, 1, names, "", True)
    # regions: one per adapter, side by side on a wider canvas
    regional = studio.sample("[a sks star] [a star in qtz style]", "", 0, 1, 5.0, 0, 1, names, "", True,
                             regions="left, right", width=128)["images"]
    png = Image.open(regional[0])
    assert png.size == (128, 64) and json.loads(png.text["sdtune"])["regions"] == ["left", "right"]
    for regions, composed, why in (("left, right", False, "Compose in the web UI"), ("left", True, "one region per adapter"),
                                   ("left, middle", True, "X0:Y0:X1:Y1")):
        with pytest.raises(Refused, match=why):
            studio.sample("[a sks star] [a star]", "", 0, 1, 5.0, 0, 1, names, "", composed, regions=regions)


def test_sample_shows_which_blocks_the_block_weights_changed(studio, tiny_model, tmp_path):
    from helpers_adapters import write_adapter

    from sdtune.adapters import AdapterSpec

    write_adapter(tiny_model.components(), tmp_path / "obj.safetensors", [("attn", AdapterSpec("locon", rank=2))],
                  71, size=0.5)
    names = studio.library_import([str(tmp_path / "obj.safetensors")])
    plain = studio.sample("a star", "", 0, 2, 5.0, 0, 1, names, "")
    assert plain["blocks"] == "" and len(plain["images"]) == 1
    mid = studio.sample("a star", "", 0, 2, 5.0, 0, 1, names, "", blocks="mid_block=0")
    assert mid["blocks"].startswith("block weights on obj: M00 ×0 (") and "IN" not in mid["blocks"]
    assert json.loads(Image.open(mid["images"][0]).text["sdtune"])["adapters"][0]["blocks"] == "mid_block=0"
    preset = studio.sample("a star", "", 0, 2, 5.0, 0, 1, names, "", blocks="MIDD")["blocks"]
    assert "IN01 ×0" in preset and "M00" not in preset  # MIDD keeps the deep blocks, zeroes the shallow ones
    with pytest.raises(Refused, match="unknown block"):
        studio.sample("a star", "", 0, 2, 5.0, 0, 1, names, "", blocks="nowhere=0")


def test_config_from_recipe_and_form(studio):
    folder = studio.ws.root / "datasets" / "sks"
    form = TrainForm("demo", folder, "a sks star", "", TARGETS | {"te": ("locon", 4, 0.5)}, steps=8, lr=2e-3,
                     lr_text=3e-4)
    run = studio.ws.runs / "r"
    cfg = build_config(form, run, studio.ws, None)
    assert [(r.preset, r.algorithm, r.rank) for r in cfg.adapters] == [("attn", "locon", 2), ("resnet", "flora", 2),
                                                                        ("te", "locon", 4)]
    assert cfg.adapters[1].scale == 4.0 and cfg.adapters[2].alpha == 2.0 and cfg.train.train_text_encoder
    assert cfg.train.steps == 8 and cfg.optim.lr_unet == 2e-3 and cfg.optim.lr_text == 3e-4 and not cfg.prior.enabled
    assert cfg.model.path is None and cfg.data.instance_dir == str(folder) and cfg.output.dir == str(run)
    assert cfg.output.validation_prompts == ["a sks star"] and cfg.output.sample_every == 2
    assert not folder.exists() and list(studio.ws.runs.iterdir()) == []  # building a config writes nothing
    cfg = build_config(TrainForm("demo", folder, "a sks star", "../../a star", TARGETS), run, studio.ws, "/models/x")
    assert cfg.prior.enabled and cfg.prior.class_prompt == "../../a star"
    assert Path(cfg.prior.class_dir).parent == studio.ws.class_images  # the prompt names a folder, safely
    assert cfg.model.path == "/models/x" and cfg.train.seed == 0
    cfg = build_config(TrainForm("demo", folder, "a sks star", "", TARGETS, seed=7), run, studio.ws, None)
    assert cfg.train.seed == 7
    with pytest.raises(Refused, match="at least one"):
        build_config(TrainForm("demo", folder, "a", "", {p: ("off", 2, None) for p in TARGETS}), run, studio.ws, None)
    for bad, match in ((dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(lr=0), "U-Net"),
                       (dict(lr_text=float("nan")), "text encoder"), (dict(instance_prompt=""), "instance prompt"),
                       (dict(targets=TARGETS | {"attn": ("locon", 0, None)}), "attn rank")):
        with pytest.raises(Refused, match=match):
            build_config(replace(form, **bad), run, studio.ws, None)


def test_a_recipe_that_stops_the_text_encoder_builds_with_the_text_encoder_off(studio, tmp_path, monkeypatch):
    """train.text_encoder_steps needs a trained text encoder: a form that turns the 'te' target off drops it rather
    than failing on the recipe's setting."""
    recipe = tmp_path / "te-stop.toml"
    recipe.write_text(recipes()["demo"].read_text().replace("[train]\n", "[train]\ntext_encoder_steps = 200\n"))
    monkeypatch.setattr(training, "recipe_file", lambda name: recipe)
    folder = studio.ws.root / "datasets" / "sks"
    on = build_config(TrainForm("te-stop", folder, "a sks star", "", TARGETS | {"te": ("locon", 4, None)}),
                      studio.ws.runs / "r", studio.ws, None)
    assert on.train.train_text_encoder and on.train.text_encoder_steps == 200
    off = build_config(TrainForm("te-stop", folder, "a sks star", "", TARGETS), studio.ws.runs / "r", studio.ws, None)
    assert not off.train.train_text_encoder and off.train.text_encoder_steps is None


def test_the_form_as_a_recipe_fills_it_is_the_recipe(studio):
    """Issue 15: choosing a recipe fills the form with its steps, learning rates, targets and ranks; the config the
    form then builds trains what the recipe says, with the UI's own paths and previews."""
    for name, path in recipes().items():
        raw = tomllib.loads(path.read_text())
        d = form_defaults(name)
        assert d.steps == raw["train"]["steps"] and d.lr == raw["optim"]["lr_unet"]
        assert d.lr_text == raw["optim"].get("lr_text", 5e-5)
        for rule in raw["adapters"]:
            assert d.targets[rule["preset"]][:2] == (rule["algorithm"], rule["rank"])
        assert (d.targets["te"][0] != "off") == bool(raw["train"].get("train_text_encoder"))
    d = form_defaults("demo")
    d.instance_dir, d.captioned = studio.ws.root / "datasets" / "sks", True
    cfg = build_config(d, studio.ws.runs / "r", studio.ws, None)
    recipe = training._load("demo")
    assert cfg.optim == recipe.optim and cfg.schedule == recipe.schedule and cfg.train == recipe.train
    assert [(r.preset, r.spec()) for r in cfg.adapters] == recipe.rules()
    assert cfg.prior.enabled and cfg.prior.class_prompt == recipe.prior.class_prompt
    assert cfg.prior.num_class_images == recipe.prior.num_class_images
    assert cfg.data.instance_prompt is None  # the demo's images carry their .txt captions


def test_sdtune_ui_command_launches_on_loopback_by_default(monkeypatch, tmp_path):
    import webui.app
    import webui.server
    from sdtune.cli import main

    real_launch, calls = webui.server.launch, []
    monkeypatch.setattr(webui.server, "launch", lambda **kw: calls.append(kw))
    assert main(["ui", "--workspace", str(tmp_path), "--port", "7999"]) == 0
    assert main(["ui", "--workspace", str(tmp_path), "--host", "0.0.0.0", "--allowed-host", "studio.lan"]) == 0
    assert calls == [{"host": "127.0.0.1", "port": 7999, "workspace": str(tmp_path), "share": False,
                      "model_source": None, "allowed_host": None},
                     {"host": "0.0.0.0", "port": 7860, "workspace": str(tmp_path), "share": False,
                      "model_source": None, "allowed_host": ["studio.lan"]}]

    def stop(*args):
        raise RuntimeError("stopped before serving")

    monkeypatch.setattr(webui.app, "build_app", stop)
    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # launch points them into the workspace; monkeypatch restores them
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", "")
    with pytest.warns(UserWarning, match="anyone who can reach it.*--allowed-host"), \
            pytest.raises(RuntimeError, match="stopped"):
        real_launch(host="0.0.0.0", workspace=tmp_path)


def test_train_and_sample_on_the_embedded_sdxl_base(tmp_path, images):
    """The Train tab on an SDXL base (the app launched with the embedded SDXL model): a short run trains the U-Net and
    both text encoders, its A1111 file carries SDXL's LDM names, its previews are drawn, and the Sample tab renders
    it at the base's resolution."""
    from safetensors import safe_open

    from sdtune.resources import ASSETS

    studio = Studio(tmp_path / "ws", model_source=str(ASSETS / "tiny-sdxl"))
    targets = {**TARGETS, "te": ("locon", 2, None)}
    studio.train_start("demo", images, "", "a sks star", "", targets, 2, 1e-3, "xl")
    studio.job.wait(300)
    state = studio.job.snapshot()
    assert state.status == "finished", state.message
    assert state.preview and Path(state.preview).is_file()
    path = studio.ws.library / state.adapter
    with safe_open(str(path), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    assert prefixes == {"unet", "te1", "te2"}
    out = studio.sample("a sks star", "", 0, 2, 5.0, 0, 1, [state.adapter], "", False)["images"]
    assert Image.open(out[0]).size == (tw.IMAGE_SIZE, tw.IMAGE_SIZE)
