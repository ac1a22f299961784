"""The web UI's handlers, one method per button, over the sdtune API (the functions ``sdtune.cli`` calls).

They take and return plain values, so tests call them without a browser; a refusal raises ``Refused``.
The base model is loaded once and shared by Sample, Blend and Library; a lock serialises the requests that
add adapter weights into it (``sample.generate`` applies them) or read it. Training loads its own copy (``sdtune.train.loop``).
"""
from __future__ import annotations

import argparse
import math
import shutil
import threading
from pathlib import Path

from sdtune import compose, fusion
from sdtune.apply import load
from sdtune.console import quiet_third_party
from sdtune.data.intake import DEFAULT_MAX_PIXELS
from sdtune.formats.checkpoint import save_merged_checkpoint
from sdtune.inspect import format_inspection, inspect_file
from sdtune.sample import SampleRequest, save_samples
from sdtune.blocks import load_weighted, parse, touched

from .training import TrainForm, TrainingJob, build_config, form_defaults
from .workspace import Refused, Workspace, stamp

MAX_COUNT, MAX_STEPS, MAX_SIZE = 16, 150, 1024


def parse_weights(text: str, n: int) -> list[float]:
    """"0.8, 1" -> [0.8, 1.0]; blank -> 1.0 for each of the ``n`` adapters."""
    parts = [t for t in (text or "").replace(";", ",").split(",") if t.strip()]
    if not parts:
        return [1.0] * n
    try:
        weights = [float(t) for t in parts]
    except ValueError:
        raise Refused(f"weights {text!r}: expected numbers separated by commas, e.g. 0.8, 1.0") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise Refused(f"weights {text!r}: give one finite number per chosen adapter ({n}), or leave blank for 1.0")
    return weights


class Studio:
    def __init__(self, workspace: str | Path, model_source: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.ws = Workspace(workspace, max_pixels)
        self.model_source = model_source
        self.job = TrainingJob(self.ws)
        self._model = None
        self._lock = threading.RLock()

    def model(self):
        from sdtune.models import load

        with self._lock:
            if self._model is None:
                self._model = load(self.model_source)
            return self._model

    # ---------------------------------------------------------------------------------------------- train
    def train_start(self, recipe: str, images: list[str] | None, folder: str, instance_prompt: str,
                    class_prompt: str, targets: dict, steps: int, lr: float, name: str,
                    seed: int | None = None, lr_text: float | None = None) -> str:
        """Start a run on uploaded ``images`` (copied into uploads/) or on ``folder`` inside the workspace.
        ``lr_text`` None: the recipe's. The whole request is validated (images, numbers, prompts, the config
        schema) before anything is written: a refused request leaves no file."""
        self.job.ensure_idle()
        if images:
            sources = self.ws.check_images(images)
            instance_dir = self.ws.uploads / stamp()  # created only once everything is valid
            captioned = any(p.with_suffix(".txt").is_file() for p in sources)
        elif folder and folder.strip():
            sources, instance_dir = [], self.ws.image_folder(folder)
            captioned = any(p.suffix == ".txt" for p in instance_dir.iterdir())
        else:
            raise Refused("upload instance images or choose a folder of images inside the workspace")
        form = TrainForm(recipe, instance_dir, instance_prompt or "", class_prompt or "", targets, steps, lr,
                         form_defaults(recipe).lr_text if lr_text is None else lr_text, name or "adapter", seed,
                         captioned)
        run_dir = self.ws.free_name(self.ws.runs, form.name, "")
        config = build_config(form, run_dir, self.ws, self.model_source)
        if sources:
            self.ws.store_images(sources, instance_dir)
        try:
            self.job.start(config)
        except Refused:  # another start won the race
            if sources:
                shutil.rmtree(instance_dir, ignore_errors=True)
            raise
        return f"started {run_dir.name}: {config.train.steps} steps on {self.ws.relative(instance_dir)}"

    def train_cancel(self) -> str:
        return "cancelling after the current step…" if self.job.cancel() else "no training is running"

    # ---------------------------------------------------------------------------------------------- blend
    def blend(self, names: list[str], weights: str, method: str, out_name: str, merged: bool,
              prompts: str = "", blocks: str = "") -> dict:
        """Fuse library adapters into a new library file (and optionally a merged checkpoint); returns the
        interference report and the files written. ``prompts``: one line per adapter (';' between several of
        one adapter), required by zip; with them interference is measured on those prompts' activations.
        ``blocks``: block weights for every adapter (``sdtune.blocks``), baked into the blend."""
        if not names or len(names) < 2:
            raise Refused("choose at least two adapters to blend")
        if method not in fusion.METHODS:
            raise Refused(f"unknown fusion method {method!r}; expected one of {', '.join(fusion.METHODS)}")
        sets = fusion.prompt_sets((prompts or "").splitlines())
        if sets is not None and len(sets) != len(names):
            raise Refused(f"{len(sets)} prompt line(s) for {len(names)} adapters: write one line per adapter, in the "
                          f"order chosen")
        if method == "zip" and sets is None:
            raise Refused("zip learns the blend from each concept's prompts: write one line of prompts per adapter")
        paths = [self.ws.adapter(n) for n in names]
        ws_ = parse_weights(weights, len(paths))
        with self._lock:
            model = self.model()
            moved = self.block_summary(model, paths, blocks)
            inputs = [load_weighted(p, model.components(), model.arch, (blocks or "").strip() or None) for p in paths]
            result = fusion.fuse_on_model(model, inputs, method, ws_, prompts=sets, progress=False)
            out = self.ws.free_name(self.ws.library, out_name or "blend", ".safetensors")
            fusion.save_fused(result, out)
            files = [out]
            if merged:
                info = save_merged_checkpoint(model, [(out, 1.0)], self.ws.merged / f"{out.stem}-merged.safetensors")
                files.append(Path(info["path"]))
        totals = result.total_interference()
        table = [[n, w, None if t is None else round(t, 4)] for n, w, t in zip(names, ws_, totals)]
        return {"report": moved + fusion.format_report(result, per_layer=True), "totals": table, "files": files}

    @staticmethod
    def block_summary(model, paths: list[Path], blocks: str) -> str:
        """Which blocks ``blocks`` changes in each file (empty when no spec); a bad spec is Refused."""
        if not (blocks or "").strip():
            return ""
        try:
            spec = parse(blocks, model.arch)
            lines = []
            for p in paths:
                moved = touched(load(p, model.components(), model.arch), spec, model.components())
                lines.append(f"block weights on {Path(p).stem}: " + (", ".join(
                    f"{b} ×{w:g} ({n} layers)" for b, (w, n) in moved.items()) or "no layer changed"))
        except ValueError as e:
            raise Refused(str(e)) from None
        return "".join(line + "\n" for line in lines)

    # --------------------------------------------------------------------------------------------- sample
    def sample(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, size: int | None,
               count: int, names: list[str] | None, weights: str, composed: bool = False, blocks: str = "",
               regions: str = "", width: int | None = None) -> dict:
        """Generate with any number of library adapters applied at their weights (``composed``: prompts with
        bracketed phrases get each adapter on its own phrase, ``sdtune.compose``, inside its region when
        ``regions`` gives one per adapter, comma-separated; ``blocks``: block weights for every adapter,
        ``sdtune.blocks``; ``width``: overrides ``size`` for the width); the PNGs (with metadata: prompt, seed, adapters) are written to
        samples/<stamp>/. Returns {"images": their paths, "blocks": which blocks the block weights changed in each
        adapter (``block_summary``, as the Blend tab shows it; empty without a spec)}."""
        prompts = [p.strip() for p in (prompt or "").splitlines() if p.strip()]
        if not prompts:
            raise Refused("write a prompt (one per line for several)")
        if not (1 <= int(count) <= MAX_COUNT and 1 <= int(steps) <= MAX_STEPS):
            raise Refused(f"count must be 1–{MAX_COUNT} and steps 1–{MAX_STEPS}")
        for name, v in (("size", size), ("width", width)):
            if v and not (8 <= int(v) <= MAX_SIZE):
                raise Refused(f"{name} must be 8–{MAX_SIZE} pixels")
        region_list = [r.strip() or None for r in (regions or "").split(",")] if (regions or "").strip() else []
        names = list(names or [])
        paths = [self.ws.adapter(n) for n in names]
        ws_ = parse_weights(weights, len(paths))
        try:
            request = SampleRequest(prompts, negative or "", int(seed), int(steps), float(guidance),
                                    size=int(size) if size else None, width=int(width) if width else None,
                                    count=int(count), adapters=[(str(p), w) for p, w in zip(paths, ws_)],
                                    blocks=[(blocks or "").strip() or None] * len(paths), regions=region_list)
            compose.check_request(request, composed)
        except ValueError as e:
            raise Refused(str(e)) from None
        with self._lock:
            model = self.model()
            moved = self.block_summary(model, paths, blocks)  # a bad spec is Refused before sampling
            samples = compose.run(model, request, composed=composed, progress=False)
        written = save_samples(samples, request, self.ws.samples / stamp(), model.source, composed=composed)
        return {"images": written["images"], "blocks": moved}

    # -------------------------------------------------------------------------------------------- library
    def library_rows(self) -> list[list]:
        rows = []
        for name in self.ws.adapters():
            path = self.ws.adapter(name)
            try:
                info = inspect_file(path)
                algos = ", ".join(f"{k} ×{v}" for k, v in info["algorithms"].items())
                rows.append([name, round(path.stat().st_size / 1e6, 2), info["arch"] or "?", algos, info["modules"],
                             info["num_params"]])
            except Exception as e:  # a damaged file is listed, not fatal to the tab
                rows.append([name, round(path.stat().st_size / 1e6, 2), "?", f"unreadable: {e}", 0, 0])
        return rows

    def library_details(self, name: str) -> str:
        if not name:
            return ""
        return format_inspection(inspect_file(self.ws.adapter(name))).replace(str(self.ws.root) + "/", "")

    def library_import(self, uploads: list[str] | None) -> list[str]:
        if not uploads:
            raise Refused("choose .safetensors files to import")
        return [self.ws.import_adapter(u).name for u in uploads]

    def library_delete(self, name: str) -> str:
        if not name:
            raise Refused("choose an adapter to delete")
        self.ws.adapter(name).unlink()
        return f"deleted {name}"


def main(argv: list[str] | None = None) -> None:
    """Train as the Train tab does with the form left as the recipe fills it (the figure in bench/RESULTS.md)."""
    p = argparse.ArgumentParser(prog="python -m webui.studio", description="train as the web UI's Train tab does, "
                                "with the form as the recipe fills it, on a folder of images inside the workspace")
    p.add_argument("folder", help="folder of instance images, relative to the workspace")
    p.add_argument("--workspace", required=True)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--name", default="webui-defaults")
    a = p.parse_args(argv)
    quiet_third_party()
    studio, d = Studio(a.workspace), form_defaults(a.recipe)
    print(studio.train_start(a.recipe, None, a.folder, d.instance_prompt, d.class_prompt, d.targets, d.steps, d.lr,
                             a.name, d.seed, d.lr_text), flush=True)
    studio.job.wait()
    state = studio.job.snapshot()
    print(f"{state.status}: {state.message}")
    if state.status != "finished":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
