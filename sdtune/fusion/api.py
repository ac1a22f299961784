"""Multi-adapter fusion: check that adapter files belong together, fuse them per layer, measure the interference
and write one A1111 file (or a merged model). Inputs are ``sdtune.apply.LoadedFile``s (``apply.load``); the maths
lives in ``fusion.math`` (per layer) and ``fusion.zip`` (learned, end to end).

Methods, each with its options dataclass (``OPTIONS``; a method's name alone means its defaults):
  sum         ``SumOptions``: Σ w_i ΔW_i; low-rank inputs are concatenated exactly (ranks add), dense ones (LoHa,
              LoKr, full, DoRA) arrive SVD-factored at their numerical rank; ``rank`` truncates, the error reported.
  orthogonal  ``OrthogonalOptions``: ``fusion.math.orthogonal_parts`` (protected sides "in"/"out"/"both", mode
              "symmetric"/"sequential", ``energy``), then re-factored to the numerical rank of the fused ΔW.
  regmean     ``RegmeanOptions``: ``fusion.math.regmean_parts``, the ridge-regularised least-squares ΔW that
              reproduces each concept's own output on its row space and (when given) its captured activations; exact
              rank Σ r_i without activations, else truncated to Σ r_i (or ``rank``), the error reported. Measure it
              on activations other than the ones it was fitted on (``remeasure``).
  zip         ``ZipOptions``: ZipLoRA's learned merge (``fusion.zip``): per-column merger vectors fitted end to end
              so that the fused model denoises each concept's prompts like that concept's adapter alone; needs the
              base model and one prompt set per input (``zip_merger``). Exact rank Σ r_i (the merger only rescales
              ``down``).
A layer that only one input adapts passes through unchanged (w·ΔW) for every method. Train-time orthogonal
adapters (Spectral in distinct slots, LoCon with ``ortho_basis_seed``) are fused with ``sum``: their weights do not
overlap, but their crosstalk on real activations can (bench/RESULTS.md measures it).

Interference of input i on a layer: ‖W_fused·x − W_i·x‖ / ‖ΔW_i·x‖ over x from concept i's captured activations
(``fusion.capture``: forward pre-hooks while the *base* model denoises concept i's prompts; upstream adapters are not
applied, so x is the base model's input to the layer) or, without them, random x from the adapter's own row space
(``FusionResult.x_source`` says which). The total per input is √(Σ_layers num² / Σ_layers den²).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..adapters.functional import Factors, merged_weight
from ..apply import LoadedFile, find_layers, hook_parts
from . import math as fm
from .capture import capture_activations
from .zip import ZipOptions

_BASE_KEYS = ("ss_new_sd_model_hash", "ss_sd_model_hash", "ss_sd_model_name")


class FusionError(ValueError):
    """Inputs that cannot be fused together (architecture, base model, shapes) or bad fusion options."""


# ---------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class SumOptions:
    """Method sum; ``rank`` truncates each fused layer (None: keep the exact concatenation)."""

    rank: int | None = None


@dataclass(frozen=True)
class OrthogonalOptions:
    """Method orthogonal (``fusion.math.orthogonal_parts``): ``sides`` protected ("in" | "out" | "both"), ``mode``
    "symmetric" (every input alike) | "sequential" (priority in input order), ``energy`` the share of each ‖ΔW_i‖²
    whose subspace is protected, in (0, 1]."""

    rank: int | None = None
    sides: str = "in"
    mode: str = "symmetric"
    energy: float = 1.0

    def __post_init__(self) -> None:
        if self.sides not in ("in", "out", "both"):
            raise FusionError(f"orthogonal: sides must be 'in', 'out' or 'both', got {self.sides!r}")
        if self.mode not in ("symmetric", "sequential"):
            raise FusionError(f"orthogonal: mode must be 'symmetric' or 'sequential', got {self.mode!r}")
        if not 0.0 < self.energy <= 1.0:
            raise FusionError(f"orthogonal: energy must be in (0, 1], got {self.energy}")


@dataclass(frozen=True)
class RegmeanOptions:
    """Method regmean (``fusion.math.regmean_parts``): ``ridge`` relative to the mean Gram eigenvalue."""

    rank: int | None = None
    ridge: float = 0.1


OPTIONS = {"sum": SumOptions, "orthogonal": OrthogonalOptions, "regmean": RegmeanOptions, "zip": ZipOptions}
METHODS = tuple(OPTIONS)
FuseOptions = SumOptions | OrthogonalOptions | RegmeanOptions | ZipOptions


def method_options(method: str, **values) -> FuseOptions:
    """``method``'s options dataclass from keyword values; keys that method does not take are ignored (the CLI and
    the web UI pass every option they have)."""
    if method not in OPTIONS:
        raise FusionError(f"unknown fusion method {method!r}; expected one of {METHODS}")
    cls = OPTIONS[method]
    return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def method_name(options: FuseOptions) -> str:
    return next(name for name, cls in OPTIONS.items() if isinstance(options, cls))


# --------------------------------------------------------------------------------------------------- inputs

def check_compatible(inputs: Sequence[LoadedFile]) -> str:
    """The shared architecture; a clear FusionError naming both files when architectures, recorded base models
    or the shapes of a shared layer differ."""
    first: dict[str, LoadedFile] = {}
    for inp in inputs:
        if inp.arch is not None:
            if "arch" in first and first["arch"].arch != inp.arch:
                a = first["arch"]
                raise FusionError(f"architectures differ: {a.path} is {a.arch.upper()}, {inp.path} is "
                                  f"{inp.arch.upper()}; adapters for different model families cannot be fused")
            first.setdefault("arch", inp)
        for key in _BASE_KEYS:
            value = inp.metadata.get(key)
            if not value:
                continue
            value = Path(value).name if key == "ss_sd_model_name" else value
            if key in first:
                other = first[key]
                theirs = other.metadata[key]
                theirs = Path(theirs).name if key == "ss_sd_model_name" else theirs
                if theirs != value:
                    raise FusionError(f"base models differ: {other.path} was trained on {key}={theirs!r}, "
                                      f"{inp.path} on {key}={value!r}")
            else:
                first[key] = inp
    shapes: dict[str, tuple[LoadedFile, tuple[int, int]]] = {}
    for inp in inputs:
        for name, part in inp.layers.items():
            mat = (part.factors[0].shape[0], part.factors[1].shape[1])
            if name in shapes and shapes[name][1] != mat:
                other, theirs = shapes[name]
                raise FusionError(f"base models differ: layer {name} is {theirs[0]}×{theirs[1]} in {other.path} "
                                  f"but {mat[0]}×{mat[1]} in {inp.path}")
            shapes.setdefault(name, (inp, mat))
    if "arch" not in first:
        raise FusionError("no input says which architecture it is for (no metadata, no telling names); pass the "
                          "base model (--model) so that names and shapes can be checked")
    return first["arch"].arch


def _ortho_keys(inp: LoadedFile) -> set[tuple[int, str, int]] | None:
    """{(ortho_basis_seed, ortho_pick, ortho_index)} of a file's orthogonal-LoCon rules (from sdtune's
    ``sdtune_rules`` metadata), empty when it has none, None when the file does not say (not trained by sdtune)."""
    rules = inp.metadata.get("sdtune_rules")
    if not rules:
        return None
    try:
        specs = [spec for _, spec in json.loads(rules)]
    except (ValueError, TypeError):
        return None
    return {(s["ortho_basis_seed"], s.get("ortho_pick", "block"), s.get("ortho_index", 0))
            for s in specs if isinstance(s, dict) and s.get("ortho_basis_seed") is not None}


def basis_notes(inputs: Sequence[LoadedFile]) -> list[str]:
    """What training with Orthogonal Adaptation's shared basis (``AdapterSpec.ortho_basis_seed``) says about fusing
    these inputs: disjoint blocks of one basis have exactly orthogonal down factors (the weights do not overlap,
    though the crosstalk ΔW_j·x_i on real activations can still be large: the interference figures say); one block
    used twice, or different bases, overlap."""
    keys = [_ortho_keys(i) for i in inputs]
    trained = [(inp, k) for inp, k in zip(inputs, keys) if k]
    if len(trained) < 2:
        return []
    notes = []
    if len({key[:2] for _, k in trained for key in k}) > 1:
        notes.append("orthogonal-basis inputs use different bases or picks (ortho_basis_seed / ortho_pick): "
                     "their input spaces are not orthogonal; train every concept on one seed and one pick")
    for x in range(len(trained)):
        for y in range(x + 1, len(trained)):
            (a, ka), (b, kb) = trained[x], trained[y]
            for seed, pick, index in sorted(ka & kb):
                if pick == "block":
                    notes.append(f"{a.label} and {b.label} were trained on the same block (ortho_index {index}) of "
                                 f"basis {seed}: they share input directions; retrain one with another ortho_index")
    if not notes:
        kinds = sorted({pick for _, k in trained for _, pick, _ in k})
        notes.append(f"{len(trained)} inputs trained on " + ("disjoint blocks of one orthogonal basis: exactly "
                     "orthogonal down factors" if kinds == ["block"] else "rows drawn at random from one orthogonal "
                     "basis: orthogonal down factors except where two draws coincide (about rank²/width of a "
                     "layer's rows)") + "; their crosstalk on each concept's activations is the interference below")
    return notes


# ----------------------------------------------------------------------------------------------------- fuse

@dataclass
class LayerReport:
    name: str
    rank: int
    error: float                               # relative Frobenius error of the written factors (refactoring)
    retained: list[float | None]               # ‖fused part i‖ / ‖w_i ΔW_i‖ (None: input i not on this layer)
    interference: list[tuple[float, float] | None]   # (num², den²) per input, see fusion.math.interference


@dataclass
class FusionResult:
    method: str
    options: dict
    labels: list[str]
    weights: list[float]
    arch: str
    x_source: str
    fused: dict[str, Factors] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # what the inputs' training says about fusing them (basis_notes)

    def delta(self, name: str) -> Tensor:
        """The fused ΔW of a layer in the weight's shape (float64)."""
        return fm.dense(self.fused[name]).reshape(self.shapes[name])

    def total_interference(self) -> list[float | None]:
        """Per input: √(Σ_layers ‖W_fused x − W_i x‖² / Σ_layers ‖ΔW_i x‖²)."""
        out = []
        for i in range(len(self.labels)):
            pairs = [r.interference[i] for r in self.layers if r.interference[i] is not None]
            num, den = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
            out.append(math.sqrt(num / den) if den > 0 else None)
        return out

    def groups(self) -> dict[str, dict[str, Tensor]]:
        """kohya tensor groups (float32): down (R, in[, kh, kw]), up (out, R[, 1, 1]), α = R so α/R = 1."""
        out = {}
        for name, (up, down) in self.fused.items():
            r, shape = down.shape[0], self.shapes[name]
            if r == 0:
                continue                                   # nothing left on this layer (reported as rank 0)
            out[name] = {"lora_down.weight": down.reshape(r, *shape[1:]).float().contiguous(),
                         "lora_up.weight": up.reshape(shape[0], r, *[1] * (len(shape) - 2)).float().contiguous(),
                         "alpha": torch.tensor(float(r))}
        return out


def fuse(inputs: Sequence[LoadedFile], method: str | FuseOptions = "sum", weights: Sequence[float] | None = None,
         *, activations: Sequence[Mapping[str, Tensor]] | None = None, samples: int = 64, seed: int = 0,
         merger: Mapping[str, Mapping[int, Tensor]] | None = None) -> FusionResult:
    """Fuse per layer (see the module docstring). ``method``: a method's options, or its name for the defaults;
    ``activations[i]``: {kohya name: x (fan_in, n)} of concept i (else ``samples`` random row-space inputs, seeded
    by ``seed``); ``merger``: method zip's {kohya name: {input index: m (fan_in,)}} from ``zip_merger``."""
    options = method_options(method) if isinstance(method, str) else method
    method = method_name(options)
    rank = options.rank
    if not inputs:
        raise FusionError("nothing to fuse")
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise FusionError(f"{len(weights)} weights for {len(inputs)} inputs")
    if method == "zip" and merger is None:
        raise FusionError("method zip needs merger vectors: learn them with zip_merger (the CLI needs --prompts)")
    if activations is not None and len(activations) != len(inputs):
        raise FusionError(f"{len(activations)} activation sets for {len(inputs)} inputs")
    arch = check_compatible(inputs)
    result = FusionResult(method, asdict(options), [i.label for i in inputs], weights, arch,
                          "activations" if activations is not None else "row-space", notes=basis_notes(inputs))
    gen = torch.Generator().manual_seed(seed)
    names = list(dict.fromkeys(n for inp in inputs for n in inp.layers))
    for name in names:
        present = [i for i, inp in enumerate(inputs) if name in inp.layers]
        parts = [inputs[i].layers[name] for i in present]
        ws = [weights[i] for i in present]
        error = max(p.error for p in parts)
        if len(parts) == 1 or method == "sum":
            fused_parts = [(w * p.factors[0], p.factors[1]) for p, w in zip(parts, ws)]
            up, down = fm.concat([p.factors for p in parts], ws)
            if rank is not None and up.shape[1] > rank:
                up, down, err = fm.compact(up, down, rank)
                error = max(error, err)
        elif method == "orthogonal":
            fused_parts = fm.orthogonal_parts([p.factors for p in parts], ws, sides=options.sides, mode=options.mode,
                                              energy=options.energy)
            up, down, err = fm.compact(*fm.concat(fused_parts, [1.0] * len(parts)), rank)
            error = max(error, err)
        elif method == "zip":
            fused_parts = [(w * p.factors[0], p.factors[1] * merger[name][i]) for i, p, w in zip(present, parts, ws)]
            up, down, err = fm.compact(*fm.concat(fused_parts, [1.0] * len(parts)), rank)
            error = max(error, err)
        else:
            xs = [activations[i].get(name).double() if activations is not None and name in activations[i] else None
                  for i in present]
            fused_parts = None
            up, down, err = fm.compact(*fm.regmean_parts([p.factors for p in parts], ws, xs, options.ridge),
                                       rank or sum(p.factors[1].shape[0] for p in parts))
            error = max(error, err)
        result.fused[name] = (up, down)
        result.shapes[name] = max((p.shape for p in parts), key=len)
        retained: list[float | None] = [None] * len(inputs)
        if fused_parts is not None:
            for i, p, fp, w in zip(present, parts, fused_parts, ws):
                base = abs(w) * fm.norm(p.factors)
                retained[i] = fm.norm(fp) / base if base > 0 else 1.0
        inter: list[tuple[float, float] | None] = [None] * len(inputs)
        for i in range(len(inputs)):
            own = (weights[i] * inputs[i].layers[name].factors[0], inputs[i].layers[name].factors[1]) \
                if name in inputs[i].layers else None
            if activations is not None:
                x = activations[i].get(name)
            else:
                x = fm.row_space_inputs(own[1], samples, gen) if own is not None else None
            if x is not None:
                inter[i] = fm.interference((up, down), own, x.double())
        result.layers.append(LayerReport(name, down.shape[0], error, retained, inter))
    return result


def remeasure(result: FusionResult, inputs: Sequence[LoadedFile], activations: Sequence[Mapping[str, Tensor]]) -> None:
    """Replace the interference figures with ones on other activations (e.g. held-out ones, when ``regmean`` was
    fitted on the activations ``fuse`` got: measuring on the fitting set flatters it)."""
    for report in result.layers:
        f = result.fused[report.name]
        for i, inp in enumerate(inputs):
            part = inp.layers.get(report.name)
            own = (result.weights[i] * part.factors[0], part.factors[1]) if part is not None else None
            x = activations[i].get(report.name)
            report.interference[i] = fm.interference(f, own, x.double()) if x is not None else None
    result.x_source = "activations"


# ------------------------------------------------------------------------------------------------ zip merge

def zip_merger(model, inputs: Sequence[LoadedFile], prompts: Sequence[Sequence[str]],
               weights: Sequence[float] | None = None, options: ZipOptions | None = None, *, progress: bool = True):
    """Learn method zip's merger vectors on the live base ``model`` (``fusion.zip.learn_merger``); prompts[i] are
    input i's concept prompts. Returns ({kohya name: {input index: m}}, the loss per step)."""
    from .zip import learn_merger

    if len(prompts) != len(inputs):
        raise FusionError(f"{len(prompts)} prompt sets for {len(inputs)} inputs (zip needs one per input)")
    check_compatible(inputs)
    layers = hook_parts(model.components(), model.arch, inputs, weights)
    return learn_merger(model, layers, prompts, options, progress=progress)


def prompt_sets(texts: Sequence[str]) -> list[list[str]] | None:
    """One prompt set per text, prompts separated by ';': ["a sks star", "a red circle in qtz style; a blue star
    in qtz style"] -> [["a sks star"], ["a red circle in qtz style", "a blue star in qtz style"]]. Blank texts are
    dropped; None when nothing is left."""
    sets = [[q.strip() for q in text.split(";") if q.strip()] for text in texts if text.strip()]
    return sets or None


def fuse_on_model(model, inputs: Sequence[LoadedFile], method: str | FuseOptions = "sum",
                  weights: Sequence[float] | None = None, *, prompts: Sequence[Sequence[str]] | None = None,
                  columns: int = 256, capture_steps: int = 4, progress: bool = True) -> FusionResult:
    """``fuse`` plus what needs the live base model (the one entry point of the CLI and the web UI):
    with ``prompts`` (one list per input), interference is measured on, and regmean fed, the activations those
    prompts produce (``capture_activations``); method zip learns its merger from them (``zip_merger``; its loss,
    first step -> mean of the last 10, goes into the report's options)."""
    options = method_options(method) if isinstance(method, str) else method
    method = method_name(options)
    if method == "zip" and not prompts:
        raise FusionError("method zip learns its merge from each concept's prompts: give one prompt set per adapter "
                          "(e.g. 'a sks star' and 'a red circle in qtz style;a blue star in qtz style')")
    activations = merger = losses = None
    if prompts:
        names = sorted({n for i in inputs for n in i.layers})
        activations = [capture_activations(model, ps, names, columns=columns, steps=capture_steps) for ps in prompts]
    if method == "zip":
        merger, losses = zip_merger(model, inputs, prompts, weights, options, progress=progress)
    result = fuse(inputs, options, weights, activations=activations, merger=merger)
    if losses:
        from .zip import mean_cosine

        tail = losses[-10:]
        result.options["zip_loss"] = f"{losses[0]:.3g} -> {sum(tail) / len(tail):.3g} in {len(losses)} steps"
        result.options["merger_cos"] = round(mean_cosine(merger), 4)
    return result


# ------------------------------------------------------------------------------------------------- outputs

def save_fused(result: FusionResult, path, *, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write the fused adapter as an A1111 file (``save_kohya``); fusion method and inputs go in the metadata."""
    from ..formats.kohya import save_kohya

    groups = result.groups()
    if not groups:
        raise FusionError("the fused adapter is empty (every layer cancelled out)")
    info = {"method": result.method, "options": result.options, "inputs": result.labels, "weights": result.weights}
    return save_kohya(groups, path, arch=result.arch, dtype=dtype, comment="sdtune fuse " + json.dumps(info),
                      metadata={"ss_fusion": json.dumps(info)})


@torch.no_grad()
def merge_into(model, result: FusionResult) -> None:
    """Add the fused ΔW into the base model's weights in place (``merged_weight`` for every layer first, then all
    assigned: nothing changes if one fails; save the model with ``model.pipeline.save_pretrained``)."""
    layers = find_layers(model.components(), model.arch, list(result.fused))
    new = {name: merged_weight(layer.weight, result.delta(name).reshape(layer.weight.shape).to(layer.weight.dtype),
                               name) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.weight.copy_(new[name])


def format_report(result: FusionResult, per_layer: bool = True) -> str:
    """Per-layer and total interference (‖W_fused·x − W_i·x‖ / ‖ΔW_i·x‖) and kept norm per input."""
    head = [f"method {result.method} {result.options}; inputs " +
            ", ".join(f"{lab}×{w:g}" for lab, w in zip(result.labels, result.weights)),
            "interference ‖W_fused·x − W_i·x‖/‖ΔW_i·x‖ on x from "
            + ("each concept's captured activations" if result.x_source == "activations"
               else "random inputs in each adapter's own row space (no activations given)")] \
        + [f"note: {n}" for n in result.notes]
    cols = ["layer", "rank", "refactor err"] + [f"{lab}: interf/kept" for lab in result.labels]
    rows = []
    for r in result.layers if per_layer else []:
        cells = [r.name, str(r.rank), f"{r.error:.1e}"]
        for inter, kept in zip(r.interference, r.retained):
            if inter is None:
                cells.append("-")
                continue
            num, den = inter
            ratio = f"{math.sqrt(num / den):.3g}" if den > 0 else f"|Δx|={math.sqrt(num):.2g}"
            cells.append(ratio + (f"/{kept:.2f}" if kept is not None else ""))
        rows.append(cells)
    totals = result.total_interference()
    rows.append(["TOTAL", str(sum(r.rank for r in result.layers)), f"{max((r.error for r in result.layers), default=0):.1e}"]
                + [f"{t:.4g}" if t is not None else "-" for t in totals])
    widths = [max(len(c[i]) for c in [cols] + rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [cols] + rows]
    return "\n".join(head + lines)
