"""The ``sdtune`` command line: each command parses its arguments and makes one API call."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model: diffusers folder or .safetensors (default: embedded tiny-sd)")
    p.add_argument("--model-config", default=None, help="diffusers folder with the configs for a single-file model")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .ckpt/.pt (runs code: trusted files only)")


def _load_model(a):
    from .models import load

    return load(a.model, allow_pickle=a.allow_pickle, config=a.model_config)


def cmd_sample(a) -> int:
    from .sample import SampleRequest, generate, save_samples

    request = SampleRequest(prompts=a.prompts, negative_prompt=a.negative, seed=a.seed, steps=a.steps,
                            guidance=a.guidance, size=a.size, count=a.n)
    model = _load_model(a)
    samples = generate(model, request)
    written = save_samples(samples, request, a.out, model.source)
    print(f"wrote {len(written['images'])} images and {written['grid']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description="Parameter-efficient fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .models import ModelLoadError

    try:
        return args.func(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"sdtune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
