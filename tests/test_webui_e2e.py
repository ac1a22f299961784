"""The web app end to end in a real headless Chromium (Debian's ``chromium`` + Playwright's Python client).

Checks that choosing a recipe fills the Train form with that recipe's values, trains two toy-world concepts on the
embedded model (one from uploaded images, one from a workspace folder), sees the loss plot and a preview, imports an
adapter, blends two, samples with the blend and checks the files on disk. About a minute on 2 CPU cores.
Screenshots of each tab are written only when asked: SDTUNE_SCREENSHOTS=1 writes docs/screenshots/ (the ones in
docs/webui.md), SDTUNE_SCREENSHOTS=DIR writes DIR.

Needs:  apt-get install -y chromium && pip install playwright      (never `playwright install`)
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from sdtune.resources import recipes
from sdtune.toy import world as tw

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INSTALL = "apt-get update && apt-get install -y chromium && pip install playwright"
_ASKED = os.environ.get("SDTUNE_SCREENSHOTS", "")
SHOTS = (None if _ASKED in ("", "0") else
         Path(__file__).resolve().parent.parent / "docs" / "screenshots" if _ASKED == "1" else Path(_ASKED))
WAIT = 300_000  # ms: one training on a busy 2-core machine (previews included)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; the web UI test needs Debian's chromium: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the Playwright Python client is missing: {INSTALL}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from webui import launch

    ws = tmp_path_factory.mktemp("ws")
    tw.write_instance_folder("ohwx", ws / "datasets" / "ohwx", n=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(port=port, workspace=ws, block=False)
    yield f"http://127.0.0.1:{port}", ws
    app.close()


def expect(page, selector: str, text: str | None = None, timeout_ms: int = WAIT, count: int = 1) -> None:
    """Wait until ``count`` elements match ``selector`` (showing ``text``); fail at once with its message if the app
    shows an error toast."""
    target = page.locator(selector, has_text=text)
    errors = page.locator(".toast-body.error, #train-progress:has-text('failed')")
    deadline = time.monotonic() + timeout_ms / 1000
    while target.count() < count:
        if errors.count():
            pytest.fail(f"the app showed an error while waiting for {text!r}: {errors.first.inner_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{selector} did not show {text!r} within {timeout_ms / 1000:.0f} s")
        page.wait_for_timeout(250)


def shot(page, tab: str) -> None:
    if SHOTS is None:  # tests never rewrite tracked files unless asked
        return
    page.wait_for_timeout(1000)  # let Gradio's fade-in of fresh outputs finish
    page.screenshot(path=str(SHOTS / f"{tab}.png"), full_page=True)


def pick(page, combobox: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown (single or multi-select)."""
    box = page.locator(f"{combobox} input").first
    box.fill(option)  # filters and opens the list (a click would toggle it)
    page.get_by_role("option", name=option, exact=True).click()
    box.press("Escape")
    page.locator("h2").first.click()  # close the list (for the screenshots)


def set_text(page, field: str, text: str) -> None:
    page.locator(f"{field} textarea, {field} input").first.fill(str(text))


def value(page, field: str) -> str:
    return page.locator(f"{field} textarea, {field} input").first.input_value()


def check_form_is_recipe(page, name: str) -> None:
    """The Train form shows the recipe's own values (read from its TOML, not through the app's code)."""
    raw = tomllib.loads(recipes()[name].read_text())
    expect_value(page, "#train-steps", raw["train"]["steps"])
    assert float(value(page, "#train-lr")) == raw["optim"]["lr_unet"]
    assert float(value(page, "#train-lr-text")) == raw["optim"].get("lr_text", 5e-5)
    assert int(value(page, "#train-seed")) == raw["train"]["seed"]
    rules = {r["preset"]: r for r in raw["adapters"]}
    if raw["train"].get("train_text_encoder") and "te" not in rules:
        rules["te"] = raw["adapters"][0]  # the schema adds 'te' with the first rule's settings
    for preset in ("attn", "resnet", "sample", "te"):
        rule = rules.get(preset, {"algorithm": "off"})
        assert value(page, f"#target-{preset}") == rule["algorithm"]
        if preset in rules:
            assert int(value(page, f"#target-{preset}-rank")) == rule["rank"]
    assert value(page, "#train-class") == (raw["prior"]["class_prompt"] if raw["prior"]["enabled"] else "")


def expect_value(page, field: str, expected, timeout_ms: int = 10_000) -> None:
    deadline = time.monotonic() + timeout_ms / 1000
    while value(page, field) != str(expected):
        if time.monotonic() > deadline:
            pytest.fail(f"{field} shows {value(page, field)!r}, expected {expected!r}")
        page.wait_for_timeout(100)


def train(page, name: str, prompt: str, steps: int, seed: int) -> None:
    set_text(page, "#train-name", name)
    set_text(page, "#train-seed", seed)
    set_text(page, "#train-prompt", prompt)
    set_text(page, "#train-class", "")  # no prior preservation: the demo's 48 class images take minutes
    set_text(page, "#train-steps", steps)
    page.locator("#train-start").click()
    expect(page, "#train-progress", f"finished {steps} steps: library/{name}.safetensors")


def test_train_blend_sample_in_a_browser(browser, server, tmp_path):
    url, ws = server
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(url)

    # the form as the demo recipe fills it, also after choosing another recipe and coming back
    check_form_is_recipe(page, "demo")
    pick(page, "#train-recipe", "locon")
    expect_value(page, "#train-steps", 1500)
    check_form_is_recipe(page, "locon")
    pick(page, "#train-recipe", "demo")
    expect_value(page, "#train-steps", 600)
    check_form_is_recipe(page, "demo")

    # Train 1: uploaded toy-world images
    images = tw.write_instance_folder("sks", tmp_path / "sks", n=3)
    page.locator("#train-images input[type=file]").set_input_files(images)
    expect(page, "#train-images", "sks_002", 30_000)  # shown as "sks_002" ".png"
    train(page, "sks", "a sks star", 4, seed=0)
    assert page.locator("#loss-plot canvas, #loss-plot svg").count() > 0  # vega drew the loss curve
    src = page.locator("#train-preview img").get_attribute("src")
    assert src and "step-000004" in src
    assert page.locator("#train-preview img").evaluate("i => i.complete && i.naturalWidth") > 0
    shot(page, "train")

    # Train 2: a folder inside the workspace (the uploads are cleared by a reload)
    page.reload()
    pick(page, "#train-folder", "datasets/ohwx")
    train(page, "ohwx", "a ohwx circle", 3, seed=1)  # its own init: the blend can keep both

    # Library: import an adapter by upload, inspect it
    page.get_by_role("tab", name="Library").click()
    page.locator("#library-upload input[type=file]").set_input_files(str(ws / "runs" / "sks" / "adapter.safetensors"))
    expect(page, "#library-status", "imported adapter.safetensors")
    pick(page, "#library-pick", "sks.safetensors")
    expect(page, "#library-details", "architecture")
    for name in ("adapter.safetensors", "ohwx.safetensors", "sks.safetensors"):
        assert page.locator("#library-table", has_text=name).count() == 1
    shot(page, "library")

    # Blend the two trained adapters, with a merged checkpoint
    page.get_by_role("tab", name="Blend").click()
    pick(page, "#blend-adapters", "sks.safetensors")
    pick(page, "#blend-adapters", "ohwx.safetensors")
    page.locator("#blend-prompts textarea").fill("a sks star\na ohwx circle")   # interference on their activations
    page.get_by_label("also write a merged checkpoint (base + blend)").check()
    page.locator("#blend-run").click()
    expect(page, "#blend-files", "blend-merged")  # shown as "blend-merged" ".safetensors"
    assert page.locator("#blend-totals", has_text="ohwx.safetensors").count() == 1
    shot(page, "blend")

    # Sample with the blend
    page.get_by_role("tab", name="Sample").click()
    set_text(page, "#sample-prompt", "a sks star\na ohwx circle")
    pick(page, "#sample-adapters", "blend.safetensors")
    page.locator("#sample-steps input[type=number]").fill("8")
    page.locator("#sample-count input[type=number]").fill("2")
    set_text(page, "#sample-blocks", "mid_block=0")  # the blend without its mid-block layers
    page.locator("#sample-run").click()
    expect(page, "#sample-gallery img", count=4)
    assert page.locator("#sample-gallery img").count() == 4
    assert value(page, "#sample-blocks-summary").startswith("block weights on blend: M00 ×0 (")
    shot(page, "sample")

    # what the browser showed is on disk
    lib = ws / "library"
    assert {p.name for p in lib.glob("*.safetensors")} == {"sks.safetensors", "ohwx.safetensors",
                                                          "adapter.safetensors", "blend.safetensors"}
    assert (ws / "merged" / "blend-merged.safetensors").stat().st_size > 0
    assert (ws / "runs" / "sks" / "samples" / "step-000004.png").is_file()
    run = tomllib.loads((ws / "runs" / "sks" / "config.toml").read_text())  # the form's edits over the recipe's
    demo = tomllib.loads(recipes()["demo"].read_text())
    assert run["train"]["steps"] == 4 and run["optim"]["lr_unet"] == demo["optim"]["lr_unet"]
    assert run["optim"]["lr_text"] == demo["optim"]["lr_text"]
    assert run["train"]["batch_size"] == demo["train"]["batch_size"]
    assert [(r["preset"], r["algorithm"], r["rank"]) for r in run["adapters"]] == [
        ("attn", "locon", 8), ("resnet", "locon", 8), ("te", "locon", 8)]
    (folder,) = (ws / "samples").iterdir()
    pngs = sorted(folder.glob("0*.png"))
    assert len(pngs) == 4
    meta = json.loads(Image.open(pngs[2]).text["sdtune"])
    assert meta["prompt"] == "a ohwx circle" and meta["seed"] == 0 and meta["steps"] == 8
    assert [{"file": Path(a["file"]).name, "weight": a["weight"]} for a in meta["adapters"]] == [{"file": "blend.safetensors", "weight": 1.0}]
    assert meta["adapters"][0]["blocks"] == "mid_block=0"
    assert re.search(r"Seed: 0", Image.open(pngs[0]).text["parameters"])
    if SHOTS is not None:
        for tab in ("train", "blend", "sample", "library"):
            assert (SHOTS / f"{tab}.png").stat().st_size > 10_000
