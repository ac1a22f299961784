"""The sdtune web app (Gradio Blocks): Train, Blend, Sample and Library tabs over the sdtune API.

    sdtune ui --workspace ~/sdtune-ws          # http://127.0.0.1:7860
    python -m webui.app --workspace ws         # the same

Layout only: each button calls one ``Studio`` method (``webui/studio.py``), which calls the same sdtune functions
as the CLI. Refusals (``Refused``) and API errors are shown as Gradio error toasts.
"""
from __future__ import annotations

import argparse
import functools
import html
import ipaddress
import warnings
from pathlib import Path

import gradio as gr
import pandas as pd

from sdtune.adapters.base import ALGORITHMS
from sdtune.config import ConfigError
from sdtune.formats.reader import FormatError
from sdtune.fusion import METHODS, FusionError
from sdtune.inject import PRESETS
from sdtune.models import ModelLoadError

from .studio import Studio
from .training import OFF, recipe_targets, recipes
from .workspace import MAX_ADAPTER_BYTES, Refused

USER_ERRORS = (Refused, ConfigError, FormatError, FusionError, ModelLoadError, FileNotFoundError, ValueError)
TARGET_HELP = {"attn": "attention + feed-forward", "resnet": "ResNet convs", "sample": "down/up-sample convs",
               "te": "text encoder"}
LIBRARY_HEADERS = ["file", "MB", "arch", "algorithms", "modules", "parameters"]
CSS = """#train-preview img, #sample-gallery img { image-rendering: pixelated; }
#train-preview img { width: 100%; height: 100%; object-fit: contain; }"""  # toy-world images are 64 px


def _shown(fn):
    """Run a handler; user errors become a Gradio error message instead of a stack trace."""
    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
    return run


def _progress_html(state) -> str:
    pct = 100 * state.step / state.total if state.total else 0
    return (f"<div id='train-progress'><b>{html.escape(state.status)}</b> {html.escape(state.run)} — "
            f"{html.escape(state.message)}<br><progress value='{state.step}' max='{max(state.total, 1)}' "
            f"style='width:100%'></progress> {pct:.0f}%</div>")


def build_app(workspace: Path, model_source=None) -> gr.Blocks:
    studio = Studio(workspace, model_source)
    ws = studio.ws
    names = list(recipes())
    first = "demo" if "demo" in names else (names[0] if names else None)
    defaults = recipe_targets(first) if first else {p: (OFF, 8, None) for p in PRESETS}

    with gr.Blocks(title="sdtune", analytics_enabled=False) as app:
        app.studio = studio
        gr.Markdown(f"## sdtune — train, blend and sample adapters\nWorkspace `{ws.root}` · base model "
                    f"`{model_source or 'embedded tiny-sd'}`")
        with gr.Tabs():
            # ------------------------------------------------------------------------------------------ Train
            with gr.Tab("Train", id="train") as train_tab:
                with gr.Row():
                    images = gr.File(label="Instance images (png, jpg, webp, bmp)", file_count="multiple",
                                     file_types=["image"], elem_id="train-images")
                    with gr.Column():
                        folder = gr.Dropdown(ws.image_folders(), value=None, allow_custom_value=True,
                                             label="…or a folder of images inside the workspace",
                                             elem_id="train-folder")
                        instance_prompt = gr.Textbox(label="Instance prompt", placeholder="a sks star",
                                                     elem_id="train-prompt")
                        class_prompt = gr.Textbox(label="Class prompt (prior preservation; blank = off)",
                                                  placeholder="a star", elem_id="train-class")
                with gr.Row():
                    recipe = gr.Dropdown(names, value=first, label="Recipe (train_configs/*.toml)")
                    steps = gr.Number(100, label="Steps", precision=0, elem_id="train-steps")
                    lr = gr.Number(1e-4, label="Learning rate (U-Net)", elem_id="train-lr")
                    seed = gr.Number(0, label="Seed (adapter init, data order)", precision=0, elem_id="train-seed")
                    run_name = gr.Textbox("adapter", label="Name", elem_id="train-name")
                gr.Markdown("**Adapter per target** — scale is α/rank for LoCon/DoRA, s for FLoRA (0 = default)")
                target_inputs = []
                with gr.Row():
                    for preset in PRESETS:
                        algo, rank, scale = defaults[preset]
                        with gr.Column(min_width=200):
                            target_inputs += [
                                gr.Dropdown([OFF, *ALGORITHMS], value=algo, label=f"{preset}: {TARGET_HELP[preset]}",
                                            elem_id=f"target-{preset}"),
                                gr.Number(rank, label="rank", precision=0, minimum=1),
                                gr.Number(scale or 0, label="scale", minimum=0)]
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                progress = gr.HTML(_progress_html(studio.job.snapshot()))
                with gr.Row():
                    loss_plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                                            title="training loss", elem_id="loss-plot", height=260)
                    preview = gr.Image(label="Preview grid", type="filepath", interactive=False,
                                       elem_id="train-preview", height=260)
                timer = gr.Timer(1.0)
                shown = gr.State(("", -1))
            # ------------------------------------------------------------------------------------------ Blend
            with gr.Tab("Blend", id="blend") as blend_tab:
                with gr.Row():
                    blend_pick = gr.Dropdown(ws.adapters(), multiselect=True, label="Adapters from the library",
                                             elem_id="blend-adapters")
                    blend_weights = gr.Textbox(label="Weights (one per adapter, blank = all 1.0)",
                                               placeholder="1.0, 0.8")
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="sum", label="Fusion method (zip needs prompts)")
                    blend_name = gr.Textbox("blend", label="Output name", elem_id="blend-name")
                    merged = gr.Checkbox(False, label="also write a merged checkpoint (base + blend)")
                blend_prompts = gr.Textbox(label="Concept prompts: one line per adapter, ';' between several "
                                           "(needed by zip; with them, interference is measured on these prompts)",
                                           lines=2, placeholder="a sks star\na red circle in qtz style; a blue star "
                                           "in qtz style", elem_id="blend-prompts")
                blend_btn = gr.Button("Blend", variant="primary", elem_id="blend-run")
                totals = gr.Dataframe(headers=["adapter", "weight", "interference"], label="Interference "
                                      "‖W_fused·x − W_i·x‖ / ‖ΔW_i·x‖ (0 = untouched)", elem_id="blend-totals")
                blend_files = gr.File(label="Written (download)", file_count="multiple", interactive=False,
                                      elem_id="blend-files")
                with gr.Accordion("Per-layer report", open=False):
                    report = gr.Code(label="fusion report", language=None)
            # ----------------------------------------------------------------------------------------- Sample
            with gr.Tab("Sample", id="sample") as sample_tab:
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox("a sks star", label="Prompt (one per line for several)", lines=2,
                                            elem_id="sample-prompt")
                        negative = gr.Textbox(label="Negative prompt")
                        sample_pick = gr.Dropdown(ws.adapters(), multiselect=True, label="Adapters",
                                                  elem_id="sample-adapters")
                        sample_weights = gr.Textbox(label="Adapter weights (blank = all 1.0)", placeholder="1.0, 0.6")
                        composed = gr.Checkbox(False, label="Compose: each adapter only on its own [bracketed] phrase, "
                                                            "in the order picked: 'a [sks] star [in qtz style]'",
                                               elem_id="sample-compose")
                    with gr.Column():
                        sample_seed = gr.Number(0, label="Seed", precision=0)
                        sample_steps = gr.Slider(1, 150, 20, step=1, label="Steps", elem_id="sample-steps")
                        guidance = gr.Slider(1, 15, 5, step=0.5, label="Guidance")
                        size = gr.Number(0, label="Size in pixels (0 = the model's)", precision=0)
                        count = gr.Slider(1, 16, 4, step=1, label="Images per prompt", elem_id="sample-count")
                sample_btn = gr.Button("Generate", variant="primary", elem_id="sample-run")
                gallery = gr.Gallery(label="Samples (PNG metadata: prompt, seed, adapters)", columns=4,
                                     elem_id="sample-gallery", height=320)
            # ---------------------------------------------------------------------------------------- Library
            with gr.Tab("Library", id="library") as library_tab:
                table = gr.Dataframe(studio.library_rows(), headers=LIBRARY_HEADERS, interactive=False,
                                     elem_id="library-table")
                with gr.Row():
                    chosen = gr.Dropdown(ws.adapters(), label="Adapter", elem_id="library-pick")
                    delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
                details = gr.Code(label="inspect", language=None, elem_id="library-details")
                uploads = gr.File(label=f"Import .safetensors (≤ {MAX_ADAPTER_BYTES // 2**20} MB)",
                                  file_count="multiple", file_types=[".safetensors"], elem_id="library-upload")
                lib_status = gr.Markdown(elem_id="library-status")

        # ---------------------------------------------------------------------------------------------- events
        lists = [blend_pick, sample_pick, chosen, table, folder]

        def refresh(*_):
            ch = ws.adapters()
            return (gr.update(choices=ch), gr.update(choices=ch), gr.update(choices=ch), studio.library_rows(),
                    gr.update(choices=ws.image_folders()))

        for tab in (train_tab, blend_tab, sample_tab, library_tab):
            tab.select(refresh, None, lists, show_progress="hidden")

        recipe.change(lambda r: [v or 0 for p in PRESETS for v in recipe_targets(r)[p]], recipe, target_inputs)

        @_shown
        def on_start(rec, files, fold, ip, cp, n, rate, sd, name, *tvals):
            targets = {p: (tvals[3 * i], tvals[3 * i + 1] or 1, tvals[3 * i + 2]) for i, p in enumerate(PRESETS)}
            studio.train_start(rec, files, fold, ip, cp, targets, n, rate, name, sd)
            return _progress_html(studio.job.snapshot())

        start.click(on_start, [recipe, images, folder, instance_prompt, class_prompt, steps, lr, seed, run_name,
                               *target_inputs], progress)
        cancel.click(lambda: gr.Info(studio.train_cancel(), duration=3), None, None)

        def on_tick(last):
            state = studio.job.snapshot()
            key = (state.run + state.status, state.step)
            if key == tuple(last):
                return gr.skip(), gr.skip(), gr.skip(), last, *[gr.skip()] * len(lists)
            plot = pd.DataFrame({"step": state.steps, "loss": state.losses})
            lib = refresh() if state.status == "finished" else [gr.skip()] * len(lists)
            return _progress_html(state), plot, state.preview, key, *lib

        timer.tick(on_tick, shown, [progress, loss_plot, preview, shown, *lists], show_progress="hidden")

        @_shown
        def on_blend(picked, weights, meth, name, with_merged, prompts):
            out = studio.blend(picked, weights, meth, name, with_merged, prompts)
            return out["totals"], [str(p) for p in out["files"]], out["report"], *refresh()

        blend_btn.click(on_blend, [blend_pick, blend_weights, method, blend_name, merged, blend_prompts],
                        [totals, blend_files, report, *lists])

        sample_btn.click(_shown(studio.sample), [prompt, negative, sample_seed, sample_steps, guidance, size, count,
                                                 sample_pick, sample_weights, composed], gallery)

        chosen.change(_shown(studio.library_details), chosen, details)

        @_shown
        def on_import(files):
            added = studio.library_import([str(f) for f in files or []])
            return f"imported {', '.join(added)}", None, *refresh()

        uploads.upload(on_import, uploads, [lib_status, uploads, *lists])

        @_shown
        def on_delete(name):
            return studio.library_delete(name), "", *refresh()

        delete.click(on_delete, chosen, [lib_status, details, *lists])
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def launch(host: str = "127.0.0.1", port: int = 7860, workspace: str | Path = "sdtune-workspace", share: bool = False,
           model_source=None, block: bool = True) -> gr.Blocks:
    """Serve the app. Anything but a loopback host (or ``share``) exposes training, file writes and the
    workspace to the network, hence the warning. ``block=False`` returns once the server runs (tests)."""
    if not _is_loopback(host) or share:
        warnings.warn(f"sdtune ui: serving on {host}{' with a public share link' if share else ''}: anyone who can "
                      f"reach it can train, upload and delete files in the workspace. Use 127.0.0.1 unless you "
                      f"mean it.", stacklevel=2)
    app = build_app(Path(workspace), model_source)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(app.studio.ws.root)],
               max_file_size=MAX_ADAPTER_BYTES, prevent_thread_lock=not block, quiet=not block, css=CSS)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m webui.app", description="the sdtune web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="sdtune-workspace")
    p.add_argument("--model", default=None)
    p.add_argument("--share", action="store_true")
    a = p.parse_args(argv)
    launch(a.host, a.port, a.workspace, a.share, a.model)


if __name__ == "__main__":
    main()
