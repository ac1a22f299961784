"""The ``sdtune`` command line: each command parses its arguments and makes one API call.

Commands: ``train``, ``sample``, ``export``, ``inspect``, ``fuse``, ``merge``, ``ui``.
The web UI calls the same API functions, never this module.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model: diffusers folder or .safetensors (default: embedded tiny-sd)")
    p.add_argument("--model-config", default=None, help="diffusers folder with the configs for a single-file model")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .ckpt/.pt (runs code: trusted files only)")


def _adapter_weight(text: str) -> tuple[str, float]:
    """ADAPTER[:WEIGHT] -> (path, weight); a suffix that is not a number stays part of the path."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _load_model(a):
    from .models import load

    return load(a.model, allow_pickle=a.allow_pickle, config=a.model_config)


# ------------------------------------------------------------------------------------------------ sample

def cmd_sample(a) -> int:
    from . import compose, sample

    request = sample.SampleRequest(prompts=a.prompts, negative_prompt=a.negative, seed=a.seed, steps=a.steps,
                                   guidance=a.guidance, size=a.size, count=a.n, adapters=a.adapter)
    if a.compose:
        compose.check(a.prompts, len(a.adapter))
    model = _load_model(a)
    samples = compose.run(model, request, composed=a.compose)
    written = sample.save_samples(samples, request, a.out, model.source, composed=a.compose)
    print(f"wrote {len(written['images'])} images and {written['grid']}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images (a PNG grid and the single images)")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("-o", "--out", default="outputs/samples", help="output folder")
    p.add_argument("--adapter", action="append", default=[], type=_adapter_weight, metavar="FILE[:WEIGHT]",
                   help="apply an A1111/kohya/LyCORIS .safetensors adapter at WEIGHT (default 1); repeatable")
    p.add_argument("--compose", action="store_true",
                   help="sample prompts whose concept phrases are bracketed, 'a [sks] star [in qtz style]', with each "
                        "--adapter (in order, or '[2:...]') applied only to its own phrase (composable diffusion)")
    _add_model_args(p)
    p.set_defaults(func=cmd_sample)


# ------------------------------------------------------------------------------------------------ export

def cmd_export(a) -> int:
    from .formats.kohya import save_kohya
    from .inject import Injection

    model = _load_model(a)
    injection = Injection.load(a.adapter, model.components(), model.arch)
    meta = save_kohya(injection, a.out, dtype=DTYPES[a.dtype], plain_locon=a.plain_locon,
                      native_sidecar=a.native_sidecar, resolution=model.resolution, comment=a.comment)
    print(f"wrote {a.out}: {len(injection.adapters)} modules, {meta.get('ss_network_module')}, "
          f"base {meta.get('ss_base_model_version')}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a native sdtune adapter as an A1111/ComfyUI .safetensors file")
    p.add_argument("adapter", help="native adapter file (.sdtune, written by training or Injection.save)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    p.add_argument("--plain-locon", action="store_true",
                   help="fold Tucker cores into lora_down (diffusers' load_lora_weights rejects lora_mid)")
    p.add_argument("--native-sidecar", action="store_true",
                   help="also write <stem>.sdtune so folded algorithms (FLoRA, Spectral) reload exactly")
    p.add_argument("--comment", default=None, help="training comment stored in the metadata")
    _add_model_args(p)
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------------------ inspect

def cmd_inspect(a) -> int:
    from .inspect import format_inspection, inspect_file

    model = _load_model(a) if a.model or a.against_model else None
    info = inspect_file(a.file, model)
    print(json.dumps(info, indent=2, default=str) if a.json else format_inspection(info))
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="describe an adapter file: algorithms, blocks, ranks, base model, unmapped keys")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--against-model", action="store_true",
                   help="map the keys onto the base model (default embedded, or --model) and report unmapped ones")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)


# ------------------------------------------------------------------------------------------------ train

def cmd_train(a) -> int:
    from .config import describe, load_config
    from .train import DiskSpaceError, TrainingDiverged, train

    if a.describe:
        print(describe())
        return 0
    if a.config is None:
        raise ValueError("a config file is required (see train_configs/), or --describe for every key")
    config = load_config(a.config, a.set)
    try:
        result = train(config, resume=a.resume, progress=not a.quiet)
    except (TrainingDiverged, DiskSpaceError) as e:
        print(f"sdtune train: error: {e}", file=sys.stderr)
        return 3
    if result.main_process:
        print(f"{result.status} at step {result.step}/{result.total_steps}: {result.run_dir}"
              + (f" (adapter {result.kohya})" if result.kohya else " (continue with --resume latest)"))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train adapters (DreamBooth, prior preservation) from a TOML config")
    p.add_argument("config", nargs="?", help="training config, e.g. train_configs/demo.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, typed by the schema (repeatable), e.g. --set train.steps=50")
    p.add_argument("--resume", default=None, metavar="latest|CHECKPOINT",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--describe", action="store_true", help="print every config key with its type, default and help")
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------------------------------ merge

def cmd_merge(a) -> int:
    from .formats.checkpoint import save_merged_checkpoint

    model = _load_model(a)
    adapters = [_adapter_weight(t) for t in a.adapters]
    info = save_merged_checkpoint(model, adapters, a.out, dtype=a.dtype, diffusers_dir=a.diffusers_dir)
    print(f"wrote {info['path']}: {info['tensors']} tensors, {info['merged_layers']} layers changed by "
          f"{len(adapters)} adapter(s)" + (f"; diffusers folder {info['diffusers_dir']}" if a.diffusers_dir else ""))
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="bake adapters into the base model: an A1111-layout single-file checkpoint")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]",
                   help="A1111/kohya/LyCORIS .safetensors or native .sdtune adapter, optional strength (default 1)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors checkpoint")
    p.add_argument("--diffusers-dir", default=None, help="also write the merged model as a diffusers folder")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    _add_model_args(p)
    p.set_defaults(func=cmd_merge)


# ------------------------------------------------------------------------------------------------ fuse

def cmd_fuse(a) -> int:
    from . import fusion

    weights = [float(w) for w in a.weights.split(",")] if a.weights else None
    prompts = fusion.prompt_sets(a.prompts or [])
    needs_model = a.model or a.merged_model or prompts or a.method == "zip" or any(map(fusion.is_native, a.adapters))
    model = _load_model(a) if needs_model else None
    components = model.components() if model else None
    inputs = [fusion.load_input(p, components, model.arch if model else None) for p in a.adapters]
    options = dict(rank=a.rank, sides=a.sides, mode=a.mode, energy=a.energy, ridge=a.ridge)
    if model is None:
        result = fusion.fuse(inputs, a.method, weights, **options)
    else:
        from .fusion_zip import ZipOptions

        result = fusion.fuse_on_model(model, inputs, a.method, weights, prompts=prompts, columns=a.columns,
                                      capture_steps=a.capture_steps, zip_options=ZipOptions(steps=a.zip_steps),
                                      **options)
    print(fusion.format_report(result, per_layer=not a.totals_only))
    fusion.save_fused(result, a.out, dtype=DTYPES[a.dtype])
    print(f"wrote {a.out}: {len(result.groups())} modules, rank {sum(r.rank for r in result.layers)} in total")
    if a.merged_model:
        fusion.merge_into(model, result)
        model.pipeline.save_pretrained(a.merged_model, safe_serialization=True)
        print(f"wrote the merged model (diffusers folder) to {a.merged_model}")
    return 0


def _add_fuse(sub) -> None:
    from .fusion import METHODS

    p = sub.add_parser("fuse", help="fuse several adapters into one file, printing per-layer interference")
    p.add_argument("adapters", nargs="+", help="A1111/kohya/LyCORIS .safetensors or native sdtune adapter files")
    p.add_argument("--method", choices=METHODS, default="sum",
                   help="sum: weighted ΔW sum; orthogonal: keep each adapter off the others' dominant subspaces; "
                        "regmean: least-squares ΔW reproducing each concept's outputs; zip: ZipLoRA's learned "
                        "per-column merge, fitted so each concept's prompts denoise as with its adapter alone "
                        "(needs --prompts) (default: sum; zip keeps each concept best, sum renders them together best, "
                        "bench/RESULTS.md)")
    p.add_argument("--weights", default=None, help="comma-separated strengths, one per adapter (default all 1)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (A1111 LoRA/LoCon)")
    p.add_argument("--rank", type=int, default=None, help="truncate each fused layer to this rank (error reported)")
    p.add_argument("--sides", choices=("in", "out", "both"), default="in",
                   help="orthogonal: protect input (row), output (column) or both subspaces")
    p.add_argument("--mode", choices=("symmetric", "sequential"), default="symmetric",
                   help="orthogonal: every adapter alike, or priority in the given order")
    p.add_argument("--energy", type=float, default=1.0, help="orthogonal: share of ‖ΔW‖² whose subspace is protected")
    p.add_argument("--ridge", type=float, default=0.1, help="regmean: ridge, relative to the mean Gram eigenvalue")
    p.add_argument("--prompts", nargs="+", default=None, metavar="PROMPTS",
                   help="one per adapter ('a;b' for several): measure interference (and feed regmean) on the "
                        "activations these prompts produce in the base model, instead of random row-space inputs")
    p.add_argument("--columns", type=int, default=256, help="activation columns kept per layer and concept")
    p.add_argument("--zip-steps", type=int, default=100, help="zip: merger-fitting steps")
    p.add_argument("--capture-steps", type=int, default=4, help="denoising steps run to capture activations")
    p.add_argument("--totals-only", action="store_true", help="print only the total interference")
    p.add_argument("--merged-model", default=None, metavar="DIR",
                   help="also write the base model with the fused ΔW merged in, as a diffusers folder")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    _add_model_args(p)
    p.set_defaults(func=cmd_fuse)


# ------------------------------------------------------------------------------------------------ ui

def cmd_ui(a) -> int:
    try:
        from webui.app import launch
    except ImportError as e:
        raise ValueError(f"the web UI is not available ({e}); install sdtune with its webui package") from None

    launch(host=a.host, port=a.port, workspace=a.workspace, share=a.share, model_source=a.model)
    return 0


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="the web app (Gradio): train, blend, sample and manage adapters in a browser")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; anything else is reachable from the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="sdtune-workspace",
                   help="folder for uploads, runs, samples and the adapter library; the UI reads nothing outside it")
    p.add_argument("--model", default=None, help="base model: diffusers folder or .safetensors (default: embedded tiny-sd)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (use with care)")
    p.set_defaults(func=cmd_ui)


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description="Parameter-efficient fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sample, _add_export, _add_inspect, _add_fuse, _add_merge, _add_ui):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .formats.reader import FormatError
    from .models import ModelLoadError

    try:
        return args.func(args)
    except (ModelLoadError, FormatError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"sdtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
