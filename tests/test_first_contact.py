"""A user's first minute: packaged data and recipes, recipe-relative paths, a quiet console.

The whole door (a wheel built from the checkout, installed in a fresh venv outside it, sampling and training the
packaged demo offline) is proven by ``.ci/wheel-smoke``, which ``.ci/run`` runs after this suite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sdtune.config import ConfigError, load_config
from sdtune.models import EMBEDDED
from sdtune.resources import ASSETS, RECIPES, recipe_path, recipes

ROOT = Path(__file__).resolve().parent.parent


def test_run_time_data_lives_in_the_package():
    package = ROOT / "sdtune"
    for path in (ASSETS, RECIPES):
        assert path.resolve().is_relative_to(package.resolve())
    assert (ASSETS / "tiny-sd" / "model_index.json").is_file()
    assert (ASSETS / "judge" / "judge.safetensors").is_file()
    assert sorted((ASSETS / "demo" / "sks").glob("*.png"))
    assert "SDTUNE_EMBEDDED" in os.environ or EMBEDDED == ASSETS / "tiny-sd"
    # the checkout's short paths are links to the same folders
    assert (ROOT / "assets").resolve() == ASSETS.resolve()
    assert (ROOT / "train_configs").resolve() == RECIPES.resolve()


def test_wheel_carries_models_judge_demo_and_recipes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("sdtune-*.whl")
    assert wheel.stat().st_size <= 50 * 2**20
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("sdtune/assets/tiny-sd/unet/diffusion_pytorch_model.safetensors",
                   "sdtune/assets/tiny-sd/tokenizer/tokenizer.json",
                   "sdtune/assets/judge/judge.safetensors",
                   "sdtune/assets/demo/sks/sks_000.png", "sdtune/assets/demo/sks/sks_000.txt",
                   "sdtune/recipes/demo.toml", "webui/app.py"):
        assert needed in names, needed


def test_a_recipe_is_found_by_name_or_path(tmp_path, monkeypatch):
    assert {"demo", "locon", "flora", "dora", "spectral"} <= set(recipes())
    monkeypatch.chdir(tmp_path)
    assert recipe_path("demo") == RECIPES / "demo.toml"
    (tmp_path / "demo").mkdir()  # a folder of that name is not a config: still the packaged recipe
    assert recipe_path("demo") == RECIPES / "demo.toml"
    (tmp_path / "mine.toml").write_text("[data]\ninstance_dir = 'x'\n")
    assert recipe_path("mine.toml") == Path("mine.toml")
    with pytest.raises(FileNotFoundError, match="demo, "):
        recipe_path("dmeo")


RULE = '[[adapters]]\npreset = "attn"\n'


def test_relative_input_paths_follow_the_recipe_and_outputs_the_working_dir(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "mine.toml"
    recipe.parent.mkdir()
    recipe.write_text('[model]\npath = "../models/base"\n[data]\ninstance_dir = "photos"\ninstance_prompt = "a sks dog"\n'
                      '[prior]\nclass_dir = "cache/class"\n[output]\ndir = "runs/mine"\n' + RULE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe)
    assert Path(cfg.data.instance_dir) == tmp_path / "recipes" / "photos"
    assert Path(cfg.model.path) == tmp_path / "models" / "base"
    assert cfg.output.dir == "runs/mine" and cfg.prior.class_dir == "cache/class"  # outputs: where you run
    # --set values are typed at the shell: relative to the working directory, as any shell path
    cfg = load_config(recipe, ["data.instance_dir=here"])
    assert cfg.data.instance_dir == "here"
    # absolute paths stay as written
    recipe.write_text(f'[data]\ninstance_dir = "{tmp_path / "abs"}"\ninstance_prompt = "x"\n' + RULE)
    assert load_config(recipe).data.instance_dir == str(tmp_path / "abs")


def test_every_packaged_recipe_loads_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = load_config(recipe_path("demo"))
    assert Path(demo.data.instance_dir).resolve() == (ASSETS / "demo" / "sks").resolve()
    assert Path(demo.data.instance_dir).is_dir()
    for name in recipes():
        try:
            load_config(recipe_path(name))
        except ConfigError as e:  # a recipe for the user's own model names placeholder paths; it must still parse
            pytest.fail(f"{name}: {e}")


NOISE = ("transformers", "torchvision", "diffusers", "Loading", "Warning", "WARNING", "deprecated")


def test_a_normal_command_prints_only_sdtune_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "DIFFUSERS_VERBOSITY"))}
    out = subprocess.run([sys.executable, "-m", "sdtune.cli", "sample", "a red circle", "-n", "1", "--steps", "2",
                          "-o", str(tmp_path / "s")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in (out.stdout + out.stderr).replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "the command printed nothing"
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, noisy
    assert any(line.startswith("wrote ") for line in lines)


def test_real_warnings_stay_visible():
    """Only the known noise is dropped: another transformers warning still reaches the user."""
    import logging

    from sdtune.console import quiet_third_party

    quiet_third_party()
    logger = logging.getLogger("transformers.utils.import_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something the user must know")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something the user must know"]
