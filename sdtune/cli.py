"""The ``sdtune`` command line: each command parses its arguments and makes one API call.

Commands: ``sample``, ``export``, ``inspect`` (and ``train``, ``fuse``, ``ui`` as their modules land).
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


def _load_model(a):
    from .models import load

    return load(a.model, allow_pickle=a.allow_pickle, config=a.model_config)


# ------------------------------------------------------------------------------------------------ sample

def cmd_sample(a) -> int:
    from .sample import SampleRequest, generate, save_samples

    request = SampleRequest(prompts=a.prompts, negative_prompt=a.negative, seed=a.seed, steps=a.steps,
                            guidance=a.guidance, size=a.size, count=a.n)
    model = _load_model(a)
    samples = generate(model, request)
    written = save_samples(samples, request, a.out, model.source)
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


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description="Parameter-efficient fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_sample, _add_export, _add_inspect):
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
