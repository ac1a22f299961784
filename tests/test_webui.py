"""The web UI's refusals and config building, through its handler functions (no browser, no model)."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtune import toyworld as tw
from sdtune.train import TrainResult
from webui import training, workspace
from webui.app import _is_loopback
from webui.studio import Studio, parse_weights
from webui.training import TrainForm, build_config, recipe_targets
from webui.workspace import Refused

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

    def fake_train(config, progress, callback, cancel):  # sdtune.train.train's hooks: callback and cancel
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
    for bad in (garbage, pickled, ckpt, truncated, empty):
        with pytest.raises(Refused):
            studio.library_import([str(bad)])
    monkeypatch.setattr(workspace, "MAX_ADAPTER_BYTES", 16)
    with pytest.raises(Refused, match="limit"):
        studio.library_import([str(good)])
    assert studio.ws.adapters() == []


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
    paths = studio.sample("a [sks] star [in qtz style]\na star", "", 0, 2, 5.0, 0, 2, names, "", True)
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    assert json.loads(Image.open(paths[0]).text["sdtune"])["composed"] is True
    with pytest.raises(Refused, match="among 1..2"):
        studio.sample("a [sks] star [3:in qtz style]", "", 0, 2, 5.0, 0, 1, names, "", True)


def test_config_from_recipe_and_form(studio, images):
    folder = studio.ws.store_images(images)
    form = TrainForm("demo", folder, "a sks star", "", TARGETS | {"te": ("locon", 4, 0.5)}, steps=8, lr=2e-3)
    run = studio.ws.runs / "r"
    cfg = build_config(form, run, studio.ws, None)
    assert [(r.preset, r.algorithm, r.rank) for r in cfg.adapters] == [("attn", "locon", 2), ("resnet", "flora", 2),
                                                                        ("te", "locon", 4)]
    assert cfg.adapters[1].scale == 4.0 and cfg.adapters[2].alpha == 2.0 and cfg.train.train_text_encoder
    assert cfg.train.steps == 8 and cfg.optim.lr_unet == 2e-3 and not cfg.prior.enabled
    assert cfg.model.path is None and cfg.data.instance_dir == str(folder) and cfg.output.dir == str(run)
    assert cfg.output.validation_prompts == ["a sks star"] and cfg.output.sample_every == 2
    cfg = build_config(TrainForm("demo", folder, "a sks star", "../../a star", TARGETS), run, studio.ws, "/models/x")
    assert cfg.prior.enabled and cfg.prior.class_prompt == "../../a star"
    assert Path(cfg.prior.class_dir).parent == studio.ws.class_images  # the prompt names a folder, safely
    assert cfg.model.path == "/models/x" and cfg.train.seed == 0
    cfg = build_config(TrainForm("demo", folder, "a sks star", "", TARGETS, seed=7), run, studio.ws, None)
    assert cfg.train.seed == 7
    with pytest.raises(Refused, match="at least one"):
        build_config(TrainForm("demo", folder, "a", "", {p: ("off", 2, None) for p in TARGETS}), run, studio.ws, None)
    assert recipe_targets("demo")["te"][0] == "locon"  # demo trains the text encoder


def test_only_loopback_counts_as_private():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")


def test_sdtune_ui_command_launches_on_loopback_by_default(monkeypatch, tmp_path):
    import webui.app
    from sdtune.cli import main

    real_launch, calls = webui.app.launch, []
    monkeypatch.setattr(webui.app, "launch", lambda **kw: calls.append(kw))
    assert main(["ui", "--workspace", str(tmp_path), "--port", "7999"]) == 0
    assert calls == [{"host": "127.0.0.1", "port": 7999, "workspace": str(tmp_path), "share": False,
                      "model_source": None}]

    def stop(*args):
        raise RuntimeError("stopped before serving")

    monkeypatch.setattr(webui.app, "build_app", stop)
    with pytest.warns(UserWarning, match="anyone who can reach it"), pytest.raises(RuntimeError, match="stopped"):
        real_launch(host="0.0.0.0", workspace=tmp_path)
