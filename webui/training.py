"""The Train tab's back end: a TrainConfig from a recipe plus the form, and one background training at a time.

The run itself is ``sdtune.train.train`` (what ``sdtune train`` calls), with its ``callback`` (a TrainEvent after
every step) and ``cancel`` (a threading.Event) hooks; the UI polls ``TrainingJob.snapshot()``.
"""
from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sdtune.config import TrainConfig, from_dict
from sdtune.inject import PRESETS
from sdtune.train import TrainEvent, train

from .workspace import Refused, Workspace, safe_name

RECIPES_DIR = Path(__file__).resolve().parent.parent / "train_configs"
OFF = "off"


def recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> TOML file, from ``train_configs/``."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def read_recipe(name: str) -> dict:
    path = recipes().get(name)
    if path is None:
        raise Refused(f"unknown recipe {name!r}; choose one of {', '.join(recipes())}")
    return tomllib.loads(path.read_text())


def recipe_targets(name: str) -> dict[str, tuple[str, int, float | None]]:
    """Per preset: (algorithm or "off", rank, scale) as the recipe sets them; scale is α/r (FLoRA: s)."""
    d = read_recipe(name)
    out = {p: (OFF, 8, None) for p in PRESETS}
    for rule in d.get("adapters", []):
        algo, rank = rule.get("algorithm", "locon"), int(rule.get("rank", 8))
        scale = rule.get("scale") if algo == "flora" else (rule["alpha"] / rank if "alpha" in rule else None)
        out[rule.get("preset", "attn")] = (algo, rank, scale)
    if d.get("train", {}).get("train_text_encoder") and out["te"][0] == OFF:
        first = next((v for v in out.values() if v[0] != OFF), ("locon", 8, None))
        out["te"] = first
    return out


@dataclass
class TrainForm:
    """What the Train tab submits. ``targets``: preset -> (algorithm or "off", rank, scale or None)."""

    recipe: str
    instance_dir: Path
    instance_prompt: str = ""
    class_prompt: str = ""
    targets: dict[str, tuple[str, int, float | None]] = field(default_factory=dict)
    steps: int = 100
    lr: float = 1e-4
    name: str = "adapter"
    seed: int | None = None  # None: the recipe's; concepts meant to be blended fuse better with different seeds


def _rule(preset: str, algorithm: str, rank: int, scale: float | None) -> dict:
    rule = {"preset": preset, "algorithm": algorithm, "rank": int(rank)}
    if scale:
        if algorithm == "flora":
            rule["scale"] = float(scale)
        elif algorithm in ("locon", "dora"):
            rule["alpha"] = float(scale) * int(rank)
    return rule


def build_config(form: TrainForm, run_dir: Path, ws: Workspace, model_source: str | None) -> TrainConfig:
    """The recipe's TOML with the form's choices applied, validated by the config schema (``from_dict``)."""
    d = read_recipe(form.recipe)
    prompt, cls = form.instance_prompt.strip(), form.class_prompt.strip()
    if not prompt and not any(p.suffix == ".txt" for p in form.instance_dir.iterdir()):
        raise Refused("give an instance prompt (e.g. 'a sks star'): the images have no .txt captions")
    rules = [_rule(p, *form.targets[p]) for p in PRESETS if form.targets.get(p, (OFF,))[0] != OFF]
    if not rules:
        raise Refused("turn on at least one adapter target")
    d["model"] = {k: v for k, v in d.get("model", {}).items() if k not in ("path", "single_file_config")}
    if model_source:
        d["model"]["path"] = str(model_source)
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k != "resolution"}  # the model's own resolution
    d["data"]["instance_dir"] = str(form.instance_dir)
    d["data"].pop("instance_prompt", None)
    if prompt:
        d["data"]["instance_prompt"] = prompt
    d["prior"] = d.get("prior", {}) | {"enabled": bool(cls), "class_prompt": cls,
                                       "class_dir": str(ws.class_images / safe_name(cls, "none"))}
    d["adapters"] = [r for r in rules if r["preset"] != "te"]
    if not d["adapters"]:
        raise Refused("the text encoder alone cannot be trained here: turn on a U-Net target too")
    d["adapters"] += [r for r in rules if r["preset"] == "te"]
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k != "epochs"} | {
        "steps": int(form.steps), "train_text_encoder": any(r["preset"] == "te" for r in rules)}
    if form.seed is not None:
        d["train"]["seed"] = int(form.seed)
    d["optim"] = d.get("optim", {}) | {"lr_unet": float(form.lr)}
    out = d.get("output", {})
    d["output"] = out | {"dir": str(run_dir), "name": run_dir.name, "sample_every": max(1, int(form.steps) // 4),
                         "checkpoint_every": 0, "sample_count": 2, "sample_steps": min(out.get("sample_steps", 20), 20),
                         "validation_prompts": [p for p in (prompt, cls) if p] or out.get("validation_prompts", [])}
    return from_dict(d)


@dataclass
class JobState:
    status: str = "idle"  # idle | starting | running | finished | cancelled | failed
    run: str = ""
    step: int = 0
    total: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    preview: str | None = None
    message: str = ""
    adapter: str | None = None  # the library file name of the result


class TrainingJob:
    """One training at a time in a background thread; a second ``start`` while one runs is Refused."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._lock = threading.Lock()
        self._state = JobState()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_idle(self) -> None:
        """Refused while a training runs (the message names it)."""
        if self.busy:
            s = self._state
            raise Refused(f"a training is already running ({s.run}, step {s.step}/{s.total}); wait for it to finish "
                          f"or cancel it")

    def start(self, config: TrainConfig) -> None:
        with self._lock:
            self.ensure_idle()
            self._cancel = threading.Event()
            self._state = JobState(status="starting", run=Path(config.output.dir).name,
                                   message="loading the model and the images…")
            self._thread = threading.Thread(target=self._run, args=(config,), name="sdtune-train", daemon=True)
            self._thread.start()

    def cancel(self) -> bool:
        """Ask the run to stop after the current step (it writes a checkpoint); False if nothing runs."""
        if not self.busy:
            return False
        self._cancel.set()
        self._update(message="cancelling after this step…")
        return True

    def snapshot(self) -> JobState:
        with self._lock:
            return replace(self._state, steps=list(self._state.steps), losses=list(self._state.losses))

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._state, k, v)

    def _on_event(self, event: TrainEvent) -> None:
        with self._lock:
            s = self._state
            s.status, s.step, s.total = "running", event.step, event.total_steps
            s.steps.append(event.step)
            s.losses.append(event.loss)
            s.preview = event.preview or s.preview
            if not self._cancel.is_set():
                s.message = f"step {event.step}/{event.total_steps}, loss {event.loss:.4f}"

    def _run(self, config: TrainConfig) -> None:
        try:
            result = train(config, progress=False, callback=self._on_event, cancel=self._cancel)
        except Exception as e:  # shown in the UI; the run folder keeps whatever was written
            self._update(status="failed", message=f"{type(e).__name__}: {e}")
            return
        if result.status != "finished" or result.kohya is None:
            self._update(status="cancelled", message=f"cancelled at step {result.step}/{result.total_steps}; "
                                                     f"checkpoint in {self.ws.relative(result.run_dir)}")
            return
        dest = self.ws.free_name(self.ws.library, result.run_dir.name, ".safetensors")
        shutil.copyfile(result.kohya, dest)
        self._update(status="finished", adapter=dest.name, preview=str(result.samples[-1]) if result.samples else None,
                     message=f"finished {result.step} steps: library/{dest.name}")
