"""The ``sdtune`` command line: each command parses its arguments, loads what it needs (the base model, the adapter
files) and calls the API; ``fuse`` then also writes its file and, with --merged-model, the merged model.

Commands: ``train``, ``sample``, ``export``, ``inspect``, ``convert``, ``resize``, ``extract``, ``fuse``, ``merge``,
``ui``.
The web UI calls the same API functions, never this module.
"""
from __future__ import annotations

import argparse
import json
import sys

from .console import quiet_third_party



def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model: diffusers folder or .safetensors (default: embedded tiny-sd)")
    p.add_argument("--model-config", default=None, help="diffusers folder with the configs for a single-file model")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle .ckpt/.pt (runs code: trusted files only)")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    from .formats.kohya import DTYPES   # imported late: main() quiets third-party logging before the parser is built

    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the tensors written")


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


def _add_blocks_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", action="append", default=[], metavar="SPEC",
                   help="block weights (A1111 LoRA-block-weight notation: a preset such as MIDD, a 17/26-value "
                        "SD1 or 12/20-value SDXL vector, or BLOCK=VALUE pairs; see docs/file-tools.md): one spec for "
                        "every adapter, or one per adapter in order ('-' for none)")


def _block_specs(specs: list[str], n: int) -> list[str | None]:
    """--blocks values -> one spec (or None) per adapter."""
    if not specs:
        return [None] * n
    if len(specs) not in (1, n):
        raise ValueError(f"{len(specs)} --blocks specs for {n} adapters: give one for all, or one per adapter")
    specs = specs * n if len(specs) == 1 else specs
    return [None if s.strip() in ("", "-") else s for s in specs]


def _weighted_files(paths, specs, model) -> list:
    """Each adapter file loaded against the model, block-weighted where a spec is given; prints what moved."""
    from .blocks import load_weighted, parse, touched

    files = []
    for path, spec in zip(paths, specs):
        files.append(load_weighted(path, model.components(), model.arch, spec))
        if spec:
            from .apply import load

            moved = touched(load(path, model.components(), model.arch), parse(spec, model.arch), model.components())
            print(f"blocks {spec!r} on {path}: " + (", ".join(f"{b} ×{w:g} ({n} layers)" for b, (w, n)
                                                              in moved.items()) or "no layer changed"))
    return files


# ------------------------------------------------------------------------------------------------ sample

def cmd_sample(a) -> int:
    from . import compose, sample

    request = sample.SampleRequest(prompts=a.prompts, negative_prompt=a.negative, seed=a.seed, steps=a.steps,
                                   guidance=a.guidance, size=a.size, width=a.width, height=a.height,
                                   count=a.n, adapters=a.adapter, blocks=_block_specs(a.blocks, len(a.adapter)),
                                   guidance_rescale=a.guidance_rescale, zero_terminal_snr=a.zero_terminal_snr,
                                   regions=a.region)
    compose.check_request(request, a.compose)
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
    p.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                   help="rescale the guided prediction (Lin et al. 2024), in [0, 1]; 0.7 suits --zero-terminal-snr")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="sample with zero-terminal-SNR betas and trailing timesteps (for adapters trained with "
                        "train.zero_terminal_snr, or such bases)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: --size)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 (default: --size)")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("-o", "--out", default="outputs/samples", help="output folder")
    p.add_argument("--adapter", action="append", default=[], type=_adapter_weight, metavar="FILE[:WEIGHT]",
                   help="apply an A1111/kohya/LyCORIS .safetensors adapter at WEIGHT (default 1); repeatable")
    p.add_argument("--compose", action="store_true",
                   help="sample prompts whose concept phrases are bracketed, 'a [sks] star [in qtz style]', with each "
                        "--adapter (in order, or '[2:...]') applied only to its own phrase (composable diffusion)")
    p.add_argument("--region", action="append", default=[], metavar="left|right|top|bottom|full|X0:Y0:X1:Y1",
                   help="with --compose: where each --adapter's phrase acts, one per adapter in order (fractions of the "
                        "image); e.g. '[a sks star] [an ohwx circle]' --region left --region right --width 128")
    _add_blocks_arg(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_sample)


# ------------------------------------------------------------------------------------------------ export

def cmd_export(a) -> int:
    from .formats.kohya import DTYPES, save_kohya
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
    _add_dtype(p)
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


# ------------------------------------------------------------------------------------------------ convert

def cmd_convert(a) -> int:
    from .formats.convert import convert_file

    components = _load_model(a).components() if a.model else None
    conv = convert_file(a.file, a.out, a.to, arch=a.arch, components=components, partial=a.partial,
                        peft_component=a.component)
    print(conv.summary())
    print(f"wrote {a.out} ({a.to})")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a LoRA between diffusers/PEFT and kohya/A1111 names, exactly")
    p.add_argument("file", help="LoRA .safetensors: kohya/A1111, diffusers (save_lora_weights) or PEFT")
    p.add_argument("-o", "--out", required=True, help="output .safetensors")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers", "peft"), help="target format")
    p.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default=None,
                   help="the file's architecture when neither its metadata nor its names tell")
    p.add_argument("--partial", action="store_true",
                   help="write what converts and list the rest (default: refuse, listing the keys without a mapping)")
    p.add_argument("--component", default="unet",
                   help="PEFT files (base_model.model.… keys) hold one component: which one (default unet)")
    _add_model_args(p)
    p.set_defaults(func=cmd_convert)


# ------------------------------------------------------------------------------------------------ resize

def cmd_resize(a) -> int:
    from .formats.kohya import DTYPES
    from .tools.resize import format_report, resize_file, save_resized

    rules = [(r, v) for r, v in (("rank", a.rank), ("sv_ratio", a.sv_ratio), ("sv_cumulative", a.sv_cumulative),
                                 ("sv_fro", a.sv_fro)) if v is not None]
    if len(rules) != 1:
        raise ValueError("give exactly one of --rank, --sv-ratio, --sv-cumulative, --sv-fro")
    model = _load_model(a) if a.model else None
    result = resize_file(a.file, *rules[0], max_rank=a.max_rank, components=model.components() if model else None,
                         arch=model.arch if model else None)
    print(format_report(result, per_layer=not a.totals_only))
    report = save_resized(result, a.out, dtype=DTYPES[a.dtype] if a.dtype else None)
    print(f"wrote {a.out} and {report}")
    return 0


def _add_resize(sub) -> None:
    p = sub.add_parser("resize", help="lower an adapter file's rank per layer (fixed, or kohya's dynamic rules)")
    p.add_argument("file", help="A1111/kohya/LyCORIS .safetensors (LoRA, LoCon, Tucker, DoRA) or native .sdtune")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (the report goes to <out>.resize.json)")
    p.add_argument("--rank", type=float, default=None, help="fixed rank for every layer")
    p.add_argument("--sv-ratio", type=float, default=None, help="keep singular values above σ₁ / this ratio (≥ 1)")
    p.add_argument("--sv-cumulative", type=float, default=None,
                   help="keep the smallest prefix holding this share of Σσ (0–1]")
    p.add_argument("--sv-fro", type=float, default=None, help="keep this Frobenius share of each layer's ΔW (0–1]")
    p.add_argument("--max-rank", type=int, default=None, help="cap for the dynamic rules")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="output dtype (default: the input's)")
    p.add_argument("--totals-only", action="store_true", help="print only the summary line")
    _add_model_args(p)
    p.set_defaults(func=cmd_resize)


# ------------------------------------------------------------------------------------------------ extract

def cmd_extract(a) -> int:
    from .formats.kohya import DTYPES
    from .models import load
    from .tools.extract import extract, format_report, save_extracted

    rule, param = ("rank", a.rank) if a.mode == "fixed" else (a.mode, a.param)
    if param is None:
        raise ValueError(f"--mode {a.mode} needs --param")
    base = load(a.base, allow_pickle=a.allow_pickle, config=a.model_config)
    tuned = load(a.tuned, allow_pickle=a.allow_pickle, config=a.model_config)
    if base.arch != tuned.arch:
        raise ValueError(f"--base is {base.arch.upper()}, --tuned is {tuned.arch.upper()}: not the same architecture")
    result = extract(base.components(), tuned.components(), base.arch, rule, param, max_rank=a.max_rank,
                     convs=not a.no_convs, text_encoders=not a.unet_only, min_change=a.min_change)
    print(format_report(result, per_layer=not a.totals_only))
    report = save_extracted(result, a.out, dtype=DTYPES[a.dtype], sources=(a.base, a.tuned))
    print(f"wrote {a.out} and {report}")
    return 0


def _add_extract(sub) -> None:
    from .tools.ranks import RULES

    p = sub.add_parser("extract", help="extract a LoCon (or LoRA) file from a fine-tuned checkpoint and its base")
    p.add_argument("--base", required=True, help="the base model: diffusers folder or single-file .safetensors")
    p.add_argument("--tuned", required=True, help="the fine-tune of it (same architecture)")
    p.add_argument("-o", "--out", required=True, help="output .safetensors (the report goes to <out>.extract.json)")
    p.add_argument("--mode", default="fixed", choices=("fixed",) + tuple(r for r in RULES if r != "rank"),
                   help="rank rule: fixed (--rank), LyCORIS's threshold / ratio / quantile or kohya's sv_* (--param)")
    p.add_argument("--rank", type=int, default=16, help="rank for --mode fixed (default 16)")
    p.add_argument("--param", type=float, default=None, help="the rule's parameter for the other modes")
    p.add_argument("--max-rank", type=int, default=None, help="cap for the dynamic modes")
    p.add_argument("--no-convs", action="store_true", help="leave out k×k convolutions (a plain LoRA file)")
    p.add_argument("--unet-only", action="store_true", help="leave out the text encoders")
    p.add_argument("--min-change", type=float, default=1e-6,
                   help="skip layers with ‖ΔW‖/‖W‖ at or below this (unchanged layers)")
    p.add_argument("--totals-only", action="store_true", help="print only the summary")
    _add_dtype(p)
    p.add_argument("--model-config", default=None, help="diffusers folder with the configs for single-file models")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle .ckpt/.pt (runs code: trusted files only)")
    p.set_defaults(func=cmd_extract)


# ------------------------------------------------------------------------------------------------ train

def cmd_train(a) -> int:
    from .config import describe, load_config
    from .resources import recipe_path, recipes
    from .train.loop import DiskSpaceError, TrainingDiverged, train

    if a.describe:
        print(describe())
        return 0
    if a.config is None:
        raise ValueError(f"a config file or a packaged recipe ({', '.join(recipes())}) is required, or --describe "
                         f"for every key")
    config = load_config(recipe_path(a.config), a.set)
    if a.dry_run:
        from .train.loop import memory_plan

        print(f"GPU memory of one training step of {a.config} (nothing is trained or written):")
        print(memory_plan(config).table())
        return 0
    try:
        result = train(config, resume=a.resume, progress=not a.quiet)
    except (TrainingDiverged, DiskSpaceError) as e:
        print(f"sdtune train: error: {e}", file=sys.stderr)
        return 3
    if result.main_process:
        print(f"{result.status} at step {result.step}/{result.total_steps}: {result.run_dir}"
              + (f" (adapter {result.kohya})" if result.kohya else " (continue with --resume auto)"))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train adapters (DreamBooth, prior preservation) from a TOML config")
    p.add_argument("config", nargs="?", help="training config (e.g. train_configs/demo.toml) or the name of a packaged "
                                             "recipe (demo, locon, flora, dora, spectral)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, typed by the schema (repeatable), e.g. --set train.steps=50")
    p.add_argument("--resume", default=None, metavar="auto|latest|CHECKPOINT",
                   help="auto: continue from the run folder's newest complete checkpoint if there is one, else start "
                        "fresh (says which); latest: the newest, an error if none; or a checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--describe", action="store_true", help="print every config key with its type, default and help")
    p.add_argument("--dry-run", action="store_true",
                   help="estimate the run's peak GPU memory (weights, gradients, optimizer state, one step's tensors "
                        "at the largest bucket, in the config's precision) and exit; runs on the CPU")
    p.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------------------------------ merge

def cmd_merge(a) -> int:
    from .formats.checkpoint import save_merged_checkpoint

    model = _load_model(a)
    adapters = [_adapter_weight(t) for t in a.adapters]
    specs = _block_specs(a.blocks, len(adapters))
    if any(specs):  # bake the block weights: the weighted files go in instead of the paths
        files = _weighted_files([p for p, _ in adapters], specs, model)
        adapters = [(f if s else p, w) for f, s, (p, w) in zip(files, specs, adapters)]
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
    _add_blocks_arg(p)
    _add_dtype(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_merge)


# ------------------------------------------------------------------------------------------------ fuse

def cmd_fuse(a) -> int:
    """Parse → load the inputs (against the base model when one is needed) → ``fuse_on_model`` (``fuse`` without a
    model) → write; --merged-model also merges the result into the model (``merge_into``) and saves it."""
    from . import fusion
    from .apply import is_native, load
    from .formats.kohya import DTYPES

    weights = [float(w) for w in a.weights.split(",")] if a.weights else None
    prompts = fusion.prompt_sets(a.prompts or [])
    options = fusion.method_options(a.method, rank=a.rank, sides=a.sides, mode=a.mode, energy=a.energy,
                                    ridge=a.ridge, steps=a.zip_steps)
    specs = _block_specs(a.blocks, len(a.adapters))
    needs_model = a.model or a.merged_model or prompts or a.method == "zip" or any(map(is_native, a.adapters)) \
        or any(specs)
    model = _load_model(a) if needs_model else None
    inputs = _weighted_files(a.adapters, specs, model) if model else [load(p) for p in a.adapters]
    if model is None:
        result = fusion.fuse(inputs, options, weights)
    else:
        result = fusion.fuse_on_model(model, inputs, options, weights, prompts=prompts, columns=a.columns,
                                      capture_steps=a.capture_steps)
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
                        "(needs --prompts) (default: sum; zip keeps two concepts and the prior best; "
                        "no method keeps four: use sample --compose, bench/RESULTS.md)")
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
    _add_blocks_arg(p)
    _add_dtype(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_fuse)


# ------------------------------------------------------------------------------------------------ ui

def cmd_ui(a) -> int:
    try:
        from webui.server import launch
    except ImportError as e:
        raise ValueError(f"the web UI is not available ({e}); install sdtune with its webui package") from None

    launch(host=a.host, port=a.port, workspace=a.workspace, share=a.share, model_source=a.model,
           allowed_host=a.allowed_host)
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
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a host name clients use to reach the app, besides 127.0.0.1/localhost/[::1] (repeatable; "
                        "'*' = any); requests naming any other Host or Origin are refused (DNS rebinding)")
    p.set_defaults(func=cmd_ui)


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtune", description="Parameter-efficient fine-tuning for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_sample, _add_export, _add_inspect, _add_convert, _add_resize, _add_extract, _add_fuse,
                _add_merge, _add_ui):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()  # before diffusers/transformers are imported (building the parser may import them)
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
