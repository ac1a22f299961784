"""Multi-adapter fusion: load adapter files, check that they belong together, fuse them per layer, measure the
interference and write one A1111 file (or a merged model). The maths lives in ``fusion_math``.

Methods (``METHODS``):
  sum         Σ w_i ΔW_i; low-rank inputs are concatenated exactly (ranks add), dense ones (LoHa, LoKr, full,
              DoRA) are SVD-factored at their numerical rank; ``rank`` truncates, with the error reported.
  orthogonal  ``fusion_math.orthogonal_parts`` (protected sides "in"/"out"/"both", mode "symmetric"/"sequential",
              ``energy``), then re-factored to the numerical rank of the fused ΔW (a compact low-rank file).
  regmean     ``fusion_math.regmean_parts``: the ridge-regularised least-squares ΔW that reproduces each concept's
              own output on its row space and (when given) its captured activations; exact rank Σ r_i without
              activations, else truncated to Σ r_i (or ``rank``), the error reported. Measure it on activations
              other than the ones it was fitted on (``remeasure``). (TIES trim/sign-elect was tried and dropped: on
              row-space inputs it interfered more than ``sum``, 0.37/0.48 vs 0.12/0.27, with 31% refactor error.)
  zip         ZipLoRA's learned merge (``fusion_zip``): per-column merger vectors fitted end to end so that the
              fused model denoises each concept's prompts like that concept's adapter alone, with a cosine
              penalty keeping the inputs on different columns; needs the base model and one prompt set per input
              (``zip_merger``). Exact rank Σ r_i (the merger only rescales ``down``).
A layer that only one input adapts passes through unchanged (w·ΔW) for every method. Train-time orthogonal
adapters (Spectral in distinct slots, LoCon with ``ortho_basis_seed``) need no method: fuse them with ``sum``.

Interference of input i on a layer: ‖W_fused·x − W_i·x‖ / ‖ΔW_i·x‖ over x from concept i's captured activations
(``capture_activations``: forward pre-hooks while the *base* model denoises concept i's prompts; upstream adapters
are not applied, so x is the base model's input to the layer) or, without them, random x from the adapter's own row
space (``FusionResult.x_source`` says which). The total per input is √(Σ_layers num² / Σ_layers den²).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from . import fusion_math as fm
from .formats import rebuild
from .formats.reader import read_kohya, target_layer

METHODS = ("sum", "orthogonal", "regmean", "zip")
_BASE_KEYS = ("ss_new_sd_model_hash", "ss_sd_model_hash", "ss_sd_model_name")


class FusionError(ValueError):
    """Inputs that cannot be fused together (architecture, base model, shapes) or bad fusion options."""


@dataclass
class LayerPart:
    """One input's update on one layer: ΔW = up @ down (float64, matricised), the weight's shape, and the
    relative error of factoring it (0 for LoRA/LoCon/Tucker groups, which are low-rank as stored)."""

    factors: fm.Factors
    shape: tuple[int, ...]
    error: float = 0.0


@dataclass
class FusionInput:
    label: str
    path: Path
    arch: str | None
    metadata: dict[str, str]
    parts: dict[str, LayerPart]
    native: bool = False


# --------------------------------------------------------------------------------------------------- inputs

def is_native(path) -> bool:
    """True for an sdtune native adapter file (``Injection.save``), False for kohya/A1111/LyCORIS files."""
    from .inject import FORMAT

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("sdtune_format") == FORMAT


def group_part(group: dict[str, Tensor], weight: Tensor | None = None) -> LayerPart:
    """A kohya tensor group as factors. DoRA groups need the base ``weight`` (their ΔW depends on it)."""
    shape = tuple(weight.shape) if weight is not None else rebuild.delta_shape(group)
    if rebuild.detect_kind(group) == "lora" and "dora_scale" not in group:
        g = {k: v.double() for k, v in group.items()}
        up = g["lora_up.weight"].reshape(g["lora_up.weight"].shape[0], -1) * rebuild.scale(g)
        down = g["lora_down.weight"]
        if "lora_mid.weight" in g:
            down = torch.einsum("mnkl,ni->mikl", g["lora_mid.weight"], down.reshape(down.shape[0], -1))
        return LayerPart((up, down.reshape(down.shape[0], -1)), shape)
    if "dora_scale" in group and weight is None:
        raise FusionError("a DoRA module's ΔW depends on the base weight: pass the base model (--model)")
    delta = (rebuild.effective_delta(group, weight, dtype=torch.float64) if weight is not None
             else rebuild.group_delta(group, None, torch.float64))
    up, down, err = fm.factorize(delta.reshape(delta.shape[0], -1))
    return LayerPart((up, down), shape, err)


def load_input(path, components: Mapping[str, nn.Module] | None = None, arch: str | None = None, *,
               strict: bool = True) -> FusionInput:
    """Read one adapter file: a native sdtune file (needs ``components``: its adapters are re-attached to read
    their exact ΔW, then detached) or any kohya/A1111/LyCORIS file through ``read_kohya``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix == ".sdtune" or is_native(path):
        from .inject import Injection

        if components is None:
            raise FusionError(f"{path}: a native sdtune file needs the base model to rebuild its ΔW (--model)")
        inj = Injection.load(path, dict(components), arch)
        try:
            with torch.no_grad():
                parts = {n: group_part(a.kohya_tensors(), a.original_weight().detach().double())
                         for n, a in inj.adapters.items()}
        finally:
            inj.detach()
        return FusionInput(path.stem, path, inj.arch, {}, parts, native=True)
    file = read_kohya(path, components, arch, strict=strict)
    parts = {}
    for name, module in file.modules.items():
        weight = None
        if components is not None and module.component is not None:
            weight = target_layer(components, module.component, module.module_path).weight.detach().double()
        parts[name] = group_part(module.tensors, weight)
    return FusionInput(path.stem, path, file.arch, file.metadata, parts)


def check_compatible(inputs: Sequence[FusionInput]) -> str:
    """The shared architecture; a clear FusionError naming both files when architectures, recorded base models
    or the shapes of a shared layer differ."""
    first: dict[str, FusionInput] = {}
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
    shapes: dict[str, tuple[FusionInput, tuple[int, int]]] = {}
    for inp in inputs:
        for name, part in inp.parts.items():
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


# ----------------------------------------------------------------------------------------------------- fuse

@dataclass
class LayerReport:
    name: str
    rank: int
    error: float                               # relative Frobenius error of the written factors (refactoring)
    retained: list[float | None]               # ‖fused part i‖ / ‖w_i ΔW_i‖ (None: input i not on this layer)
    interference: list[tuple[float, float] | None]   # (num², den²) per input, see fusion_math.interference


@dataclass
class FusionResult:
    method: str
    options: dict
    labels: list[str]
    weights: list[float]
    arch: str
    x_source: str
    fused: dict[str, fm.Factors] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)

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


def _norm(f: fm.Factors) -> float:
    return float(fm.svd_factors(*f)[1].square().sum().sqrt())


def fuse(inputs: Sequence[FusionInput], method: str = "sum", weights: Sequence[float] | None = None, *,
         rank: int | None = None, sides: str = "in", mode: str = "symmetric", energy: float = 1.0,
         ridge: float = 0.1, activations: Sequence[Mapping[str, Tensor]] | None = None, samples: int = 64,
         seed: int = 0, merger: Mapping[str, Mapping[int, Tensor]] | None = None) -> FusionResult:
    """Fuse per layer (see the module docstring). ``activations[i]``: {kohya name: x (fan_in, n)} of concept i;
    ``merger``: method zip's {kohya name: {input index: m (fan_in,)}} from ``zip_merger``."""
    if method not in METHODS:
        raise FusionError(f"unknown fusion method {method!r}; expected one of {METHODS}")
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
    options = {"rank": rank} | ({"sides": sides, "mode": mode, "energy": energy} if method == "orthogonal" else {}) \
        | ({"ridge": ridge} if method == "regmean" else {})
    result = FusionResult(method, options, [i.label for i in inputs], weights, arch,
                          "activations" if activations is not None else "row-space")
    gen = torch.Generator().manual_seed(seed)
    names = list(dict.fromkeys(n for inp in inputs for n in inp.parts))
    for name in names:
        present = [i for i, inp in enumerate(inputs) if name in inp.parts]
        parts = [inputs[i].parts[name] for i in present]
        ws = [weights[i] for i in present]
        error = max(p.error for p in parts)
        if len(parts) == 1 or method == "sum":
            fused_parts = [(w * p.factors[0], p.factors[1]) for p, w in zip(parts, ws)]
            up, down = fm.concat([p.factors for p in parts], ws)
            if rank is not None and up.shape[1] > rank:
                up, down, err = fm.compact(up, down, rank)
                error = max(error, err)
        elif method == "orthogonal":
            fused_parts = fm.orthogonal_parts([p.factors for p in parts], ws, sides=sides, mode=mode, energy=energy)
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
            up, down, err = fm.compact(*fm.regmean_parts([p.factors for p in parts], ws, xs, ridge),
                                       rank or sum(p.factors[1].shape[0] for p in parts))
            error = max(error, err)
        result.fused[name] = (up, down)
        result.shapes[name] = max((p.shape for p in parts), key=len)
        retained: list[float | None] = [None] * len(inputs)
        if fused_parts is not None:
            for i, p, fp, w in zip(present, parts, fused_parts, ws):
                base = abs(w) * _norm(p.factors)
                retained[i] = _norm(fp) / base if base > 0 else 1.0
        inter: list[tuple[float, float] | None] = [None] * len(inputs)
        for i in range(len(inputs)):
            own = (weights[i] * inputs[i].parts[name].factors[0], inputs[i].parts[name].factors[1]) \
                if name in inputs[i].parts else None
            if activations is not None:
                x = activations[i].get(name)
            else:
                x = fm.row_space_inputs(own[1], samples, gen) if own is not None else None
            if x is not None:
                inter[i] = fm.interference((up, down), own, x.double())
        result.layers.append(LayerReport(name, down.shape[0], error, retained, inter))
    return result


def remeasure(result: FusionResult, inputs: Sequence[FusionInput], activations: Sequence[Mapping[str, Tensor]]) -> None:
    """Replace the interference figures with ones on other activations (e.g. held-out ones, when ``regmean`` was
    fitted on the activations ``fuse`` got: measuring on the fitting set flatters it)."""
    for report in result.layers:
        f = result.fused[report.name]
        for i, inp in enumerate(inputs):
            part = inp.parts.get(report.name)
            own = (result.weights[i] * part.factors[0], part.factors[1]) if part is not None else None
            x = activations[i].get(report.name)
            report.interference[i] = fm.interference(f, own, x.double()) if x is not None else None
    result.x_source = "activations"


# ------------------------------------------------------------------------------------------------ zip merge

def base_layers(model, names) -> dict[str, nn.Module]:
    """{kohya name: the base model's Linear/Conv2d}; a FusionError naming up to five names the model lacks."""
    from .names import name_map

    table = name_map(model.components(), model.arch)
    missing = [n for n in names if n not in table]
    if missing:
        raise FusionError(f"{len(missing)} layer(s) are not in the base model: {', '.join(missing[:5])}")
    return {n: target_layer(model.components(), *table[n]) for n in names}


def zip_merger(model, inputs: Sequence[FusionInput], prompts: Sequence[Sequence[str]],
               weights: Sequence[float] | None = None, options=None, *, progress: bool = True):
    """Learn method zip's merger vectors on the live base ``model`` (``fusion_zip.learn_merger``); prompts[i] are
    input i's concept prompts. Returns ({kohya name: {input index: m}}, the loss per step)."""
    from .fusion_zip import learn_merger

    if len(prompts) != len(inputs):
        raise FusionError(f"{len(prompts)} prompt sets for {len(inputs)} inputs (zip needs one per input)")
    return learn_merger(model, weighted_layers(model, inputs, weights), prompts, options, progress=progress)


def weighted_layers(model, inputs: Sequence[FusionInput], weights: Sequence[float] | None = None) -> dict:
    """{kohya name: (base layer of ``model``, [(input index, (w_i·up_i, down_i))])} for every layer an input
    adapts: what ``fusion_zip.MergedLayer`` hooks onto."""
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    check_compatible(inputs)
    found = base_layers(model, list(dict.fromkeys(n for inp in inputs for n in inp.parts)))
    return {name: (layer, [(i, (w * inp.parts[name].factors[0], inp.parts[name].factors[1]))
                           for i, (inp, w) in enumerate(zip(inputs, weights)) if name in inp.parts])
            for name, layer in found.items()}


def prompt_sets(texts: Sequence[str]) -> list[list[str]] | None:
    """One prompt set per text, prompts separated by ';': ["a sks star", "a red circle in qtz style; a blue star
    in qtz style"] -> [["a sks star"], ["a red circle in qtz style", "a blue star in qtz style"]]. Blank texts are
    dropped; None when nothing is left."""
    sets = [[q.strip() for q in text.split(";") if q.strip()] for text in texts if text.strip()]
    return sets or None


def fuse_on_model(model, inputs: Sequence[FusionInput], method: str = "sum", weights: Sequence[float] | None = None,
                  *, prompts: Sequence[Sequence[str]] | None = None, columns: int = 256, capture_steps: int = 4,
                  zip_options=None, progress: bool = True, **options) -> FusionResult:
    """``fuse`` plus what needs the live base model (the one entry point of the CLI and the web UI):
    with ``prompts`` (one list per input), interference is measured on, and regmean fed, the activations those
    prompts produce (``capture_activations``); method zip learns its merger from them (``zip_merger``; its loss,
    first step -> mean of the last 10, goes into the report's options)."""
    if method == "zip" and not prompts:
        raise FusionError("method zip learns its merge from each concept's prompts: give one prompt set per adapter "
                          "(e.g. 'a sks star' and 'a red circle in qtz style;a blue star in qtz style')")
    activations = merger = losses = None
    if prompts:
        names = sorted({n for i in inputs for n in i.parts})
        activations = [capture_activations(model, ps, names, columns=columns, steps=capture_steps) for ps in prompts]
    if method == "zip":
        merger, losses = zip_merger(model, inputs, prompts, weights, zip_options, progress=progress)
    result = fuse(inputs, method, weights, activations=activations, merger=merger, **options)
    if losses:
        from .fusion_zip import mean_cosine

        tail = losses[-10:]
        result.options["zip_loss"] = f"{losses[0]:.3g} -> {sum(tail) / len(tail):.3g} in {len(losses)} steps"
        result.options["merger_cos"] = round(mean_cosine(merger), 4)
    return result


# --------------------------------------------------------------------------------------------- activations

@torch.no_grad()
def capture_activations(model, prompts: Sequence[str], names: Sequence[str], *, columns: int = 256,
                        steps: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """{kohya name: x (fan_in, ≤ columns)}: inputs of the named layers while the base model denoises ``prompts``
    (``steps`` steps, no guidance, latents only), as matricised columns (a conv's unfolded patches), sub-sampled
    uniformly at random (seeded)."""
    layers = base_layers(model, names)
    gen = torch.Generator().manual_seed(seed)
    store: dict[str, list[Tensor]] = {}
    handles = []

    def hook(name, layer):
        def pre(_module, args):
            x = args[0].detach().float()
            if isinstance(layer, nn.Conv2d):
                cols = F.unfold(x if x.dim() == 4 else x[None], layer.kernel_size, layer.dilation, layer.padding,
                                layer.stride).transpose(1, 2).reshape(-1, layer.weight[0].numel())
            else:
                cols = x.reshape(-1, x.shape[-1])
            if cols.shape[0] > columns:
                cols = cols[torch.randperm(cols.shape[0], generator=gen)[:columns]]
            store.setdefault(name, []).append(cols)
        return pre

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(hook(name, layer)))
        model.pipeline(list(prompts), num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                       generator=torch.Generator().manual_seed(seed))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, chunks in store.items():
        cols = torch.cat(chunks)
        if cols.shape[0] > columns:
            cols = cols[torch.randperm(cols.shape[0], generator=gen)[:columns]]
        out[name] = cols.T.contiguous()
    return out


# ------------------------------------------------------------------------------------------------- outputs

def save_fused(result: FusionResult, path, *, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Write the fused adapter as an A1111 file (``save_kohya``); fusion method and inputs go in the metadata."""
    from .formats.kohya import save_kohya

    groups = result.groups()
    if not groups:
        raise FusionError("the fused adapter is empty (every layer cancelled out)")
    info = {"method": result.method, "options": result.options, "inputs": result.labels, "weights": result.weights}
    return save_kohya(groups, path, arch=result.arch, dtype=dtype, comment="sdtune fuse " + json.dumps(info),
                      metadata={"ss_fusion": json.dumps(info)})


@torch.no_grad()
def merge_into(model, result: FusionResult) -> None:
    """Add the fused ΔW into the base model's weights in place (a merged checkpoint; save it with
    ``model.pipeline.save_pretrained``)."""
    for name, layer in base_layers(model, list(result.fused)).items():
        weight = layer.weight
        weight.add_(result.delta(name).reshape(weight.shape).to(weight.dtype))


def format_report(result: FusionResult, per_layer: bool = True) -> str:
    """Per-layer and total interference (‖W_fused·x − W_i·x‖ / ‖ΔW_i·x‖) and kept norm per input."""
    head = [f"method {result.method} {result.options}; inputs " +
            ", ".join(f"{lab}×{w:g}" for lab, w in zip(result.labels, result.weights)),
            "interference ‖W_fused·x − W_i·x‖/‖ΔW_i·x‖ on x from "
            + ("each concept's captured activations" if result.x_source == "activations"
               else "random inputs in each adapter's own row space (no activations given)")]
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
