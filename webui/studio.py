"""The web UI's handlers, one method per button, over the sdtune API (the functions ``sdtune.cli`` calls).

They take and return plain values, so tests call them without a browser; a refusal raises ``Refused``.
The base model is loaded once and shared by Sample, Blend and Library; a lock serialises the requests that
add adapter weights into it (``sample.generate`` applies them) or read it. Training loads its own copy (``sdtune.train``).
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

from sdtune import compose, fusion
from sdtune.formats.checkpoint import save_merged_checkpoint
from sdtune.inspect import format_inspection, inspect_file
from sdtune.sample import SampleRequest, save_samples

from .training import TrainForm, TrainingJob, build_config
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
    def __init__(self, workspace: str | Path, model_source: str | None = None):
        self.ws = Workspace(workspace)
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
                    seed: int | None = None) -> str:
        """Start a run on uploaded ``images`` (kept in uploads/) or on ``folder`` inside the workspace."""
        self.job.ensure_idle()  # before anything is copied
        if images:
            instance_dir = self.ws.store_images(images)
        elif folder and folder.strip():
            instance_dir = self.ws.image_folder(folder)
        else:
            raise Refused("upload instance images or choose a folder of images inside the workspace")
        if not (1 <= int(steps) <= 100_000) or not (0 < float(lr) < 1):
            raise Refused(f"steps {steps} / learning rate {lr}: expected 1–100000 steps and 0 < lr < 1")
        form = TrainForm(recipe, instance_dir, instance_prompt, class_prompt, targets, int(steps), float(lr),
                         name or "adapter", None if seed is None else int(seed))
        run_dir = self.ws.free_name(self.ws.runs, f"{form.name}", "")
        config = build_config(form, run_dir, self.ws, self.model_source)
        self.job.start(config)
        return f"started {run_dir.name}: {form.steps} steps on {self.ws.relative(instance_dir)}"

    def train_cancel(self) -> str:
        return "cancelling after the current step…" if self.job.cancel() else "no training is running"

    # ---------------------------------------------------------------------------------------------- blend
    def blend(self, names: list[str], weights: str, method: str, out_name: str, merged: bool,
              prompts: str = "") -> dict:
        """Fuse library adapters into a new library file (and optionally a merged checkpoint); returns the
        interference report and the files written. ``prompts``: one line per adapter (';' between several of
        one adapter), required by zip; with them interference is measured on those prompts' activations."""
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
            inputs = [fusion.load_input(p, model.components(), model.arch) for p in paths]
            result = fusion.fuse_on_model(model, inputs, method, ws_, prompts=sets, progress=False)
            out = self.ws.free_name(self.ws.library, out_name or "blend", ".safetensors")
            fusion.save_fused(result, out)
            files = [out]
            if merged:
                info = save_merged_checkpoint(model, [(out, 1.0)], self.ws.merged / f"{out.stem}-merged.safetensors")
                files.append(Path(info["path"]))
        totals = result.total_interference()
        table = [[n, w, None if t is None else round(t, 4)] for n, w, t in zip(names, ws_, totals)]
        return {"report": fusion.format_report(result, per_layer=True), "totals": table, "files": files}

    # --------------------------------------------------------------------------------------------- sample
    def sample(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, size: int | None,
               count: int, names: list[str] | None, weights: str, composed: bool = False) -> list[str]:
        """Generate with any number of library adapters applied at their weights (``composed``: prompts with
        bracketed phrases get each adapter on its own phrase, ``sdtune.compose``); the PNGs (with metadata:
        prompt, seed, adapters) are written to samples/<stamp>/. Returns their paths."""
        prompts = [p.strip() for p in (prompt or "").splitlines() if p.strip()]
        if not prompts:
            raise Refused("write a prompt (one per line for several)")
        if not (1 <= int(count) <= MAX_COUNT and 1 <= int(steps) <= MAX_STEPS):
            raise Refused(f"count must be 1–{MAX_COUNT} and steps 1–{MAX_STEPS}")
        if size and not (8 <= int(size) <= MAX_SIZE):
            raise Refused(f"size must be 8–{MAX_SIZE} pixels")
        names = list(names or [])
        paths = [self.ws.adapter(n) for n in names]
        ws_ = parse_weights(weights, len(paths))
        try:
            request = SampleRequest(prompts, negative or "", int(seed), int(steps), float(guidance),
                                    int(size) if size else None, int(count), [(str(p), w) for p, w in zip(paths, ws_)])
            if composed:
                compose.check(prompts, len(paths))
        except ValueError as e:
            raise Refused(str(e)) from None
        with self._lock:
            model = self.model()
            samples = compose.run(model, request, composed=composed, progress=False)
        written = save_samples(samples, request, self.ws.samples / stamp(), model.source, composed=composed)
        return written["images"]

    # -------------------------------------------------------------------------------------------- library
    def library_rows(self) -> list[list]:
        rows = []
        for name in self.ws.adapters():
            path = self.ws.library / name
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
