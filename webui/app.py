"""The sdtune web app (Gradio Blocks): Train, Blend, Sample and Library tabs over the sdtune API.

Layout only: each button calls one ``Studio`` method (``webui/studio.py``), which calls the same sdtune functions
as the CLI. Refusals (``Refused``) and API errors are shown as Gradio error toasts, with workspace-relative paths.
Serving it (temp folder, Host check) is ``webui/server.py``: import this module only after that set-up.
"""
from __future__ import annotations

import functools
import html
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder

from sdtune.adapters.base import ALGORITHMS
from sdtune.config import ConfigError
from sdtune.data.intake import DEFAULT_MAX_PIXELS
from sdtune.formats.reader import FormatError
from sdtune.fusion import METHODS, FusionError
from sdtune.inject import PRESETS
from sdtune.models import ModelLoadError
from sdtune.resources import recipes

from .studio import Studio
from .training import OFF, JobState, TrainForm, form_defaults, loss_series
from .workspace import MAX_ADAPTER_BYTES, MiB, Refused, Workspace

USER_ERRORS = (Refused, ConfigError, FormatError, FusionError, ModelLoadError, FileNotFoundError, ValueError)
TARGET_HELP = {"attn": "attention + feed-forward", "resnet": "ResNet convs", "sample": "down/up-sample convs",
               "te": "text encoder"}
LIBRARY_HEADERS = ["file", "MB", "arch", "algorithms", "modules", "parameters"]
CSS = """#train-preview img, #sample-gallery img { image-rendering: pixelated; }
#train-preview img { width: 100%; height: 100%; object-fit: contain; }"""  # toy-world images are 64 px
DELETE_CACHE = (600, 3600)  # every 10 min, Gradio deletes its cached uploads and copies older than an hour


class Uploads:
    """Files Gradio received for this app: they must lie in its upload folder (``GRADIO_TEMP_DIR``, private to
    the workspace); a FileData naming any other path is refused, and refused files are deleted."""

    def __init__(self):
        self.folder = Path(get_upload_folder()).resolve()

    def paths(self, files) -> list[str]:
        paths = [str(f) for f in files or []]
        for p in paths:
            if not Path(p).resolve().is_relative_to(self.folder):
                raise Refused(f"{Path(p).name}: not a file uploaded to this server")
        return paths

    def discard(self, paths) -> None:
        for p in paths:
            if Path(p).resolve().is_relative_to(self.folder):
                Path(p).unlink(missing_ok=True)


def _shown(ws: Workspace, uploads: Uploads):
    """Decorator: user errors become a Gradio error message (workspace-relative paths, no stack trace); the
    uploaded files a refusal names are deleted."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except USER_ERRORS as e:
                uploads.discard(getattr(e, "files", ()))
                raise gr.Error(ws.shown(str(e)), print_exception=False) from None
        return run
    return wrap


def _progress_html(state) -> str:
    pct = 100 * state.step / state.total if state.total else 0
    return (f"<div id='train-progress'><b>{html.escape(state.status)}</b> {html.escape(state.run)} — "
            f"{html.escape(state.message)}<br><progress value='{state.step}' max='{max(state.total, 1)}' "
            f"style='width:100%'></progress> {pct:.0f}%</div>")


def _form_values(d: TrainForm) -> list:
    """The Train form's fields that a recipe fills (``recipe_fields`` in build_app): steps, rates, seed, class prompt,
    then algorithm, rank, scale per target."""
    return [d.steps, d.lr, d.lr_text, d.seed, d.class_prompt,
            *[v or 0 for p in PRESETS for v in d.targets[p]]]


def build_app(workspace: Path, model_source=None, max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    studio = Studio(workspace, model_source, max_pixels)
    ws = studio.ws
    uploads = Uploads()
    guarded = _shown(ws, uploads)
    names = list(recipes())
    first = "demo" if "demo" in names else names[0]
    defaults = form_defaults(first)

    with gr.Blocks(title="sdtune", analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
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
                        instance_prompt = gr.Textbox(defaults.instance_prompt, label="Instance prompt (for images "
                                                     "without a .txt caption; blank = every image needs one)", placeholder="a sks star",
                                                     elem_id="train-prompt")
                        class_prompt = gr.Textbox(defaults.class_prompt, label="Class prompt (prior preservation; "
                                                  "blank = off)", placeholder="a star", elem_id="train-class")
                with gr.Row():
                    recipe = gr.Dropdown(names, value=first, label="Recipe (fills the form below)",
                                         elem_id="train-recipe")
                    steps = gr.Number(defaults.steps, label="Steps", precision=0, elem_id="train-steps")
                    lr = gr.Number(defaults.lr, label="Learning rate (U-Net)", elem_id="train-lr")
                    lr_text = gr.Number(defaults.lr_text, label="Learning rate (text encoder)", elem_id="train-lr-text")
                    seed = gr.Number(defaults.seed, label="Seed (adapter init, data order)", precision=0,
                                     elem_id="train-seed")
                    run_name = gr.Textbox("adapter", label="Name", elem_id="train-name")
                gr.Markdown("**Adapter per target** — scale is α/rank for LoCon/DoRA, s for FLoRA (0 = default)")
                target_inputs = []
                with gr.Row():
                    for preset in PRESETS:
                        algo, rank, scale = defaults.targets[preset]
                        with gr.Column(min_width=200):
                            target_inputs += [
                                gr.Dropdown([OFF, *ALGORITHMS], value=algo, label=f"{preset}: {TARGET_HELP[preset]}",
                                            elem_id=f"target-{preset}"),
                                gr.Number(rank, label="rank", precision=0, minimum=1, elem_id=f"target-{preset}-rank"),
                                gr.Number(scale or 0, label="scale", minimum=0, elem_id=f"target-{preset}-scale")]
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                progress = gr.HTML(_progress_html(studio.job.snapshot()))
                with gr.Row():
                    loss_plot = gr.LinePlot(pd.DataFrame(loss_series(JobState())), x="step", y="loss", color="series",
                                            title="loss", elem_id="loss-plot", height=260)
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
                    method = gr.Radio(list(METHODS), value="sum", label="Fusion method (zip: keeps two concepts best, needs prompts)")
                    blend_name = gr.Textbox("blend", label="Output name", elem_id="blend-name")
                    merged = gr.Checkbox(False, label="also write a merged checkpoint (base + blend)")
                blend_prompts = gr.Textbox(label="Concept prompts: one line per adapter, ';' between several "
                                           "(needed by zip; with them, interference is measured on these prompts)",
                                           lines=2, placeholder="a sks star\na red circle in qtz style; a blue star "
                                           "in qtz style", elem_id="blend-prompts")
                blend_blocks = gr.Textbox(label="Block weights (A1111 notation: a preset such as MIDD, a 17-value "
                                          "SD1 / 12-value SDXL vector, or BLOCK=VALUE pairs; blank = none)",
                                          placeholder="MIDD", elem_id="blend-blocks")
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
                        sample_blocks = gr.Textbox(label="Block weights (A1111 notation, blank = none)",
                                                   placeholder="MIDD or mid_block=0,te=0.5", elem_id="sample-blocks")
                        sample_regions = gr.Textbox(label="Compose regions, one per adapter (left, right, top, bottom, "
                                                          "full or x0:y0:x1:y1; blank = whole image)",
                                                    placeholder="left, right", elem_id="sample-regions")
                    with gr.Column():
                        sample_seed = gr.Number(0, label="Seed", precision=0)
                        sample_steps = gr.Slider(1, 150, 20, step=1, label="Steps", elem_id="sample-steps")
                        guidance = gr.Slider(1, 15, 5, step=0.5, label="Guidance")
                        size = gr.Number(0, label="Size in pixels (0 = the model's)", precision=0)
                        sample_width = gr.Number(0, label="Width in pixels (0 = the size; e.g. 128 for two regions "
                                                          "side by side)", precision=0, elem_id="sample-width")
                        count = gr.Slider(1, 16, 4, step=1, label="Images per prompt", elem_id="sample-count")
                sample_btn = gr.Button("Generate", variant="primary", elem_id="sample-run")
                gallery = gr.Gallery(label="Samples (PNG metadata: prompt, seed, adapters)", columns=4,
                                     elem_id="sample-gallery", height=320)
                sample_moved = gr.Textbox(label="Blocks the block weights changed (blank = no block weights)",
                                          interactive=False, lines=1, max_lines=8, elem_id="sample-blocks-summary")
            # ---------------------------------------------------------------------------------------- Library
            with gr.Tab("Library", id="library") as library_tab:
                table = gr.Dataframe(studio.library_rows(), headers=LIBRARY_HEADERS, interactive=False,
                                     elem_id="library-table")
                with gr.Row():
                    chosen = gr.Dropdown(ws.adapters(), label="Adapter", elem_id="library-pick")
                    delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
                details = gr.Code(label="inspect", language=None, elem_id="library-details")
                imports = gr.File(label=f"Import .safetensors (≤ {MAX_ADAPTER_BYTES // MiB} MiB)",
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

        recipe_fields = [steps, lr, lr_text, seed, class_prompt, *target_inputs]  # _form_values' order
        recipe.change(guarded(lambda r: _form_values(form_defaults(r))), recipe, recipe_fields)

        @guarded
        def on_start(rec, files, fold, ip, cp, n, rate, rate_text, sd, name, *tvals):
            targets = {p: (tvals[3 * i], tvals[3 * i + 1], tvals[3 * i + 2]) for i, p in enumerate(PRESETS)}
            studio.train_start(rec, uploads.paths(files), fold, ip, cp, targets, n, rate, name, sd, rate_text)
            return _progress_html(studio.job.snapshot())

        start.click(on_start, [recipe, images, folder, instance_prompt, class_prompt, steps, lr, lr_text, seed,
                               run_name, *target_inputs], progress, api_name="train_start")
        cancel.click(lambda: gr.Info(studio.train_cancel(), duration=3), None, None)

        def on_tick(last):
            state = studio.job.snapshot()
            key = (state.run + state.status, state.step)
            if key == tuple(last):
                return gr.skip(), gr.skip(), gr.skip(), last, *[gr.skip()] * len(lists)
            plot = pd.DataFrame(loss_series(state))
            lib = refresh() if state.status == "finished" else [gr.skip()] * len(lists)
            return _progress_html(state), plot, state.preview, key, *lib

        timer.tick(on_tick, shown, [progress, loss_plot, preview, shown, *lists], show_progress="hidden")

        @guarded
        def on_blend(picked, weights, meth, name, with_merged, prompts, blocks):
            out = studio.blend(picked, weights, meth, name, with_merged, prompts, blocks)
            return out["totals"], [str(p) for p in out["files"]], out["report"], *refresh()

        blend_btn.click(on_blend, [blend_pick, blend_weights, method, blend_name, merged, blend_prompts,
                                   blend_blocks], [totals, blend_files, report, *lists])

        @guarded
        def on_sample(*values):
            out = studio.sample(*values)
            return out["images"], out["blocks"]

        sample_btn.click(on_sample, [prompt, negative, sample_seed, sample_steps, guidance, size, count, sample_pick,
                                     sample_weights, composed, sample_blocks, sample_regions, sample_width],
                         [gallery, sample_moved])

        chosen.change(guarded(studio.library_details), chosen, details)

        @guarded
        def on_import(files):
            paths = uploads.paths(files)
            try:
                added = studio.library_import(paths)
            finally:  # copied into the library, or refused: Gradio's copy is not needed either way
                uploads.discard(paths)
            return f"imported {', '.join(added)}", None, *refresh()

        imports.upload(on_import, imports, [lib_status, imports, *lists], api_name="library_import")

        @guarded
        def on_delete(name):
            return studio.library_delete(name), "", *refresh()

        delete.click(on_delete, chosen, [lib_status, details, *lists])
    return app

