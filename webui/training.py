"""The Train tab's back end: the form's defaults from a recipe, the form → config step, one training at a time.

The form is filled from the chosen recipe (``form_defaults``); what the user submits becomes ``--set`` overrides on
that recipe (``form_overrides``), loaded by ``sdtune.config.load_config`` exactly as ``sdtune train RECIPE --set …``
would. The run itself is ``sdtune.train.loop.train`` with its ``callback`` (a TrainEvent after every step) and ``cancel``
(a threading.Event) hooks; the UI polls ``TrainingJob.snapshot()``.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from sdtune.config import ConfigError, TrainConfig, load_config
from sdtune.inject import PRESETS
from sdtune.resources import recipes
from sdtune.train.loop import TrainEvent, train

from .workspace import Refused, Workspace, safe_name

OFF = "off"
MAX_STEPS = 100_000
PREVIEW_STEPS = 20  # sampler steps of the run's previews: four per run, kept cheap
SCALE_KEYS = ("alpha", "scale")  # what the form's "scale" replaces in a recipe rule


@dataclass
class TrainForm:
    """What the Train tab submits. ``targets``: preset -> (algorithm or "off", rank, scale or None), scale being
    α/rank for LoCon/DoRA and s for FLoRA. ``captioned``: the images come with .txt captions."""

    recipe: str
    instance_dir: Path | None = None
    instance_prompt: str = ""
    class_prompt: str = ""
    targets: dict[str, tuple[str, int, float | None]] = field(default_factory=dict)
    steps: int = 100
    lr: float = 1e-4  # U-Net
    lr_text: float = 5e-5  # text encoder
    name: str = "adapter"
    seed: int | None = None  # None: the recipe's; concepts meant to be blended fuse better with different seeds
    captioned: bool = False


def recipe_file(name: str) -> Path:
    path = recipes().get(name)
    if path is None:
        raise Refused(f"unknown recipe {name!r}; choose one of {', '.join(recipes())}")
    return path


def _load(name: str, overrides: list[str] = ()) -> TrainConfig:
    """The recipe through the config schema, as ``sdtune train <recipe> --set …`` loads it (errors name the recipe,
    not its path on the server)."""
    path = recipe_file(name)
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise ConfigError(str(e).replace(str(path), f"recipe {name}")) from None


def form_defaults(name: str) -> TrainForm:
    """The Train form as the recipe fills it: steps, learning rates, per-target algorithm/rank/scale, prompts, seed."""
    cfg = _load(name)
    targets = {p: (OFF, 8, None) for p in PRESETS}
    for preset, spec in cfg.rules():  # later rules override earlier ones; 'te' follows train_text_encoder
        scale = spec.scale if spec.algorithm == "flora" else (spec.alpha / spec.rank if spec.alpha else None)
        targets[preset] = (spec.algorithm, spec.rank, scale)
    return TrainForm(name, None, cfg.data.instance_prompt or "", cfg.prior.class_prompt if cfg.prior.enabled else "",
                     targets, cfg.train.steps or TrainForm.steps, cfg.optim.lr_unet, cfg.optim.lr_text,
                     seed=cfg.train.seed)


def _toml(value) -> str:
    """A TOML value for a ``--set`` override (strings quoted, so a prompt like 'true' stays a string)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value).replace("\x7f", "\\u007f")  # JSON leaves DEL bare; TOML wants it escaped


def _number(value, what: str, low: float, high: float, *, integer: bool = False, open_low: bool = False):
    """``value`` as a number in [low, high] (``open_low``: (low, high]); Refused otherwise."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise Refused(f"{what} {value!r}: expected a number") from None
    inside = math.isfinite(x) and (x > low if open_low else x >= low) and x <= high
    if not inside or (integer and x != int(x)):
        raise Refused(f"{what} {value!r}: expected {'a whole number ' if integer else ''}"
                      f"{'above' if open_low else 'from'} {low:g} up to {high:g}")
    return int(x) if integer else x


def _changed(rule) -> dict:
    """A recipe rule's fields that differ from the schema's defaults."""
    def default(f_):
        return f_.default if f_.default is not MISSING else (
            f_.default_factory() if f_.default_factory is not MISSING else MISSING)
    return {f_.name: getattr(rule, f_.name) for f_ in fields(rule) if getattr(rule, f_.name) != default(f_)}


def _rules(form: TrainForm, recipe: TrainConfig) -> list[dict]:
    """The [[adapters]] table of the form: one rule per target that is on, U-Net targets first. A target keeps the
    recipe's other keys for it (tucker, flora_ranks, dora_axis, …) while its algorithm stays the recipe's."""
    by_preset = {r.preset: r for r in recipe.adapters}
    if recipe.train.train_text_encoder and "te" not in by_preset and recipe.adapters:
        by_preset["te"] = recipe.adapters[0]
    rules = []
    for preset in [p for p in PRESETS if p != "te"] + ["te"]:
        algorithm, rank, scale = form.targets.get(preset, (OFF, 8, None))
        if algorithm == OFF:
            continue
        rank = _number(rank, f"{preset} rank", 1, 4096, integer=True)
        scale = _number(scale or 0, f"{preset} scale", 0, 1e6)
        old = by_preset.get(preset)
        kept = old is not None and old.algorithm == algorithm
        rule = {k: v for k, v in _changed(old).items() if k not in SCALE_KEYS} if kept else {}
        rule |= {"preset": preset, "algorithm": algorithm, "rank": rank}
        if scale and algorithm == "flora":
            rule["scale"] = scale
        elif scale and algorithm in ("locon", "dora"):
            rule["alpha"] = scale * rank
        rules.append(rule)
    return rules


def form_overrides(form: TrainForm, run_dir: Path, ws: Workspace, model_source: str | None) -> list[str]:
    """The form as ``--set section.key=value`` overrides on its recipe. Refused for values no run could use."""
    recipe = _load(form.recipe)
    steps = _number(form.steps, "steps", 1, MAX_STEPS, integer=True)
    lr = _number(form.lr, "learning rate (U-Net)", 0, 1, open_low=True)
    lr_text = _number(form.lr_text, "learning rate (text encoder)", 0, 1, open_low=True)
    seed = None if form.seed is None else _number(form.seed, "seed", 0, 2**32 - 1, integer=True)
    prompt, cls = (form.instance_prompt or "").strip(), (form.class_prompt or "").strip()
    if not prompt and not form.captioned:
        raise Refused("give an instance prompt (e.g. 'a sks star'): the images have no .txt captions")
    rules = _rules(form, recipe)
    if not rules:
        raise Refused("turn on at least one adapter target")
    if all(r["preset"] == "te" for r in rules):
        raise Refused("the text encoder alone cannot be trained here: turn on a U-Net target too")
    previews = [p for p in (prompt, cls) if p] if prompt else recipe.output.validation_prompts
    text = any(r["preset"] == "te" for r in rules)
    return [
        # the UI's model at its native resolution
        f"model.path={_toml(str(model_source)) if model_source else 'none'}", "model.single_file_config=none",
        f"data.instance_dir={_toml(str(form.instance_dir))}", "data.resolution=none",
        f"data.max_pixels={ws.max_pixels}",  # the cap its uploads were checked with
        f"data.instance_prompt={_toml(prompt) if prompt else 'none'}",
        f"prior.enabled={_toml(bool(cls))}", f"prior.class_prompt={_toml(cls)}",
        f"prior.class_dir={_toml(str(ws.class_images / safe_name(cls, 'none')))}",
        f"adapters={_toml(rules)}",
        f"train.steps={steps}", "train.epochs=none",
        f"train.train_text_encoder={_toml(text)}",
        *([] if text else ["train.text_encoder_steps=none"]),  # the recipe's, meaningless without the encoder
        *([f"train.seed={seed}"] if seed is not None else []),
        f"optim.lr_unet={_toml(lr)}", f"optim.lr_text={_toml(lr_text)}",
        f"output.dir={_toml(str(run_dir))}", f"output.name={_toml(run_dir.name)}",
        f"output.sample_every={max(1, steps // 4)}", "output.checkpoint_every=0", "output.sample_count=2",
        f"output.sample_steps={min(recipe.output.sample_steps, PREVIEW_STEPS)}",
        f"output.validation_prompts={_toml(previews)}",
    ]


def build_config(form: TrainForm, run_dir: Path, ws: Workspace, model_source: str | None) -> TrainConfig:
    """The recipe with the form's overrides, validated by the config schema; nothing is written."""
    return _load(form.recipe, form_overrides(form, run_dir, ws, model_source))


@dataclass
class JobState:
    status: str = "idle"  # idle | starting | running | finished | cancelled | failed
    run: str = ""
    step: int = 0
    total: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)  # where the validation loss was measured (train.validation_*)
    val_losses: list[float] = field(default_factory=list)
    preview: str | None = None
    message: str = ""
    adapter: str | None = None  # the library file name of the result


def loss_series(state: JobState) -> dict[str, list]:
    """The Train tab's loss plot: the training loss at every step, then the validation loss at the steps it was
    measured, as one long table whose ``series`` column ``gr.LinePlot(color="series")`` draws as two lines (as
    loss.png shows both). Without validation the table has the training series only."""
    n, m = len(state.steps), len(state.val_steps)
    return {"step": state.steps + state.val_steps, "loss": state.losses + state.val_losses,
            "series": ["training"] * n + ["validation"] * m}


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
            s = self._state
            return replace(s, steps=list(s.steps), losses=list(s.losses), val_steps=list(s.val_steps),
                           val_losses=list(s.val_losses))

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
            if event.val_loss is not None:
                s.val_steps.append(event.step)
                s.val_losses.append(event.val_loss)
            s.preview = event.preview or s.preview
            if not self._cancel.is_set():
                s.message = f"step {event.step}/{event.total_steps}, loss {event.loss:.4f}"

    def _run(self, config: TrainConfig) -> None:
        try:
            result = train(config, resume="auto", progress=False, callback=self._on_event, cancel=self._cancel)
        except Exception as e:  # shown in the UI; the run folder keeps whatever was written
            self._update(status="failed", message=self.ws.shown(f"{type(e).__name__}: {e}"))
            return
        if result.status != "finished" or result.kohya is None:
            self._update(status="cancelled", message=f"cancelled at step {result.step}/{result.total_steps}; "
                                                     f"checkpoint in {self.ws.relative(result.run_dir)}")
            return
        dest = self.ws.free_name(self.ws.library, result.run_dir.name, ".safetensors")
        shutil.copyfile(result.kohya, dest)
        self._update(status="finished", adapter=dest.name, preview=str(result.samples[-1]) if result.samples else None,
                     message=f"finished {result.step} steps: library/{dest.name}")
