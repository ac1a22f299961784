"""One training step (forward, backward, AdamW) on the SD1.5-architecture U-Net with random weights, per adapter.

Default: fp32 CPU, batch 1, latents 4×32×32 (256 px), text 1×77×768 (``--device``, ``--dtype``, ``--batch``,
``--resolution`` change these; bf16 is torch.autocast over fp32 master weights); adapters on the attn + resnet +
sample presets (Transformer2DModel, ResnetBlock2D, Down/Upsample2D layers) at rank 16 = alpha for sdtune and the
peers. Every configuration runs in its own subprocess (fresh allocator state, honest peak RSS; on CUDA also the peak
of torch.cuda.max_memory_allocated); the median of ``--steps`` steps after ``--warmup`` warm-up steps is reported.

    python bench/bench_adapters.py                       # all configs, markdown table on stdout
    python bench/bench_adapters.py --config sdtune-locon --steps 1 --warmup 0     # one config (smoke test)
    python bench/bench_adapters.py --grad-checkpointing --configs sdtune-locon,lycoris-locon-bypass,floor
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/bench_adapters.py   # other allocator
    python bench/bench_adapters.py --device cuda --dtype bf16 --batch 4 --resolution 512 --steps 10 --warmup 3
    python bench/bench_adapters.py --device cuda --arch sdxl --resolution 1024 --dtype bf16 --base-dtype bf16 \
        --grad-checkpointing --optimizer adamw8bit --rank 32 --configs floor,sdtune-locon,peft-lora

``--base-dtype bf16|fp16`` stores the frozen U-Net in that dtype (adapter factors stay fp32), ``--base-quant int8|nf4``
quantises the adapted layers' weights (sdtune only: ``sdtune.lowprec``), ``--compile`` wraps the U-Net in
torch.compile (its first steps, the compile, fall in the warm-up), ``--small`` uses the architecture's small widths
(CPU tests of bench/gpu.sh), ``--jsonl FILE`` appends each configuration's result as one JSON line.

One layer instead of the whole step (``layer_ops.py``): which full-size ops and casts an adapter runs under autocast,
or its forward + backward time in fp32 and bf16 against the frozen layer:

    python bench/bench_adapters.py --layer conv --dtype bf16 --list      # every full-size op, with dtypes and shapes
    python bench/bench_adapters.py --layer linear --layer-adapters sdtune-dora,peft-dora --dtype fp32
    python bench/bench_adapters.py --layer conv --layer-time 20           # median ms, fp32 vs bf16, over the floor
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("sdtune-locon", "sdtune-locon-tucker", "sdtune-flora", "sdtune-dora", "sdtune-spectral",
           "lycoris-locon-bypass", "lycoris-locon", "lycoris-tucker", "lycoris-dora", "peft-lora", "peft-dora",
           "floor")
RANK = 16
PRESETS = ("attn", "resnet", "sample")


def _sdtune(unet, name: str, svd_dir: str, arch: str, rank: int) -> tuple[list, dict, object]:
    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach

    spec = {"sdtune-locon": AdapterSpec("locon", rank=rank, alpha=rank),
            "sdtune-locon-tucker": AdapterSpec("locon", rank=rank, alpha=rank, tucker=True),
            "sdtune-flora": AdapterSpec("flora", rank=rank),
            "sdtune-dora": AdapterSpec("dora", rank=rank, alpha=rank),
            "sdtune-spectral": AdapterSpec("spectral", rank=rank)}[name]
    rules = [(p, spec) for p in PRESETS]
    extra = {}
    if name == "sdtune-spectral":                       # SVD of every targeted layer: cold, then from the cache
        t = time.perf_counter()
        inj = attach({"unet": unet}, rules, arch, svd_cache_dir=svd_dir)
        extra["setup_cold_s"] = time.perf_counter() - t
        inj.detach()
    t = time.perf_counter()
    inj = attach({"unet": unet}, rules, arch, svd_cache_dir=svd_dir)
    extra["setup_s"] = time.perf_counter() - t
    return inj.parameters(), extra, inj


def _target_names(unet) -> list[str]:
    from sdtune.inject import preset_targets

    return [path for p in PRESETS for _, path in preset_targets(p, {"unet": unet})]


def _lycoris(unet, name: str, device: str, rank: int) -> tuple[list, dict]:
    from lycoris.wrapper import LycorisNetwork

    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [
        "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"], "target_name": []})
    t = time.perf_counter()
    net = LycorisNetwork(unet, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=rank, conv_alpha=rank,
                         use_tucker=name == "lycoris-tucker", network_module="lora",
                         weight_decompose=name == "lycoris-dora", bypass_mode=name == "lycoris-locon-bypass")
    net.apply_to()
    net.to(device)                                      # its modules are not children of the U-Net
    return list(net.parameters()), {"setup_s": time.perf_counter() - t}


def _peft(unet, name: str, rank: int) -> tuple[list, dict]:
    from peft import LoraConfig, inject_adapter_in_model

    t = time.perf_counter()
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=_target_names(unet), use_dora=name == "peft-dora")
    inject_adapter_in_model(cfg, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, {"setup_s": time.perf_counter() - t}


def _inputs(unet, batch: int, side: int, device: str) -> tuple[tuple, dict]:
    """(latents, timestep, text) and the SDXL extra conditioning (pooled text, 6 time ids) where the U-Net has it."""
    import torch

    c = unet.config
    args = (torch.randn(batch, 4, side, side, device=device), torch.tensor([500], device=device),
            torch.randn(batch, 77, c.cross_attention_dim, device=device))
    if c.addition_embed_type != "text_time":
        return args, {}
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return args, {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, device=device),
                                        "time_ids": torch.randn(batch, 6, device=device)}}


def run_one(name: str, steps: int, warmup: int, grad_ckpt: bool, device: str = "cpu", dtype: str = "fp32",
            batch: int = 1, resolution: int = 256, arch: str = "sd1", rank: int = RANK, optimizer: str = "adamw",
            base_dtype: str = "fp32", base_quant: str = "none", compile: bool = False, small: bool = False,
            compile_backend: str = "inductor") -> dict:
    import torch

    from sdtune.archs import build_unet
    from sdtune.formats.kohya import DTYPES
    from sdtune.lowprec import lower_base
    from sdtune.train import optim

    torch.manual_seed(0)
    unet = build_unet(arch, device=device, small=small)  # adapters are built on their base weight's device
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    with tempfile.TemporaryDirectory() as svd_dir:
        if name.startswith("sdtune-"):
            params, extra, inj = _sdtune(unet, name, svd_dir, arch, rank)
            lower_base({"unet": unet}, inj, dtype=base_dtype, quant=base_quant)
        elif base_quant != "none":
            raise SystemExit(f"--base-quant is measured for sdtune only, not {name}")
        elif name.startswith("lycoris-"):
            params, extra = _lycoris(unet, name, device, rank)
        elif name.startswith("peft-"):
            params, extra = _peft(unet, name, rank)
        else:
            params, extra = [], {"setup_s": 0.0}
    if not name.startswith("sdtune-") and base_dtype != "fp32":    # the same frozen storage for the peers
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(DTYPES[base_dtype])
    (latents, timestep, text), cond = _inputs(unet, batch, resolution // 8, device)
    target = torch.randn_like(latents)
    opt = optim.build(optimizer, [{"params": params, "lr": 1e-4}], betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                      device=torch.device(device)) if params else None
    model = torch.compile(unet, backend=compile_backend) if compile else unet
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    times = []
    for i in range(warmup + steps):
        x = latents.clone().requires_grad_(not params)       # the floor: backward to the input only
        sync()
        t = time.perf_counter()
        with torch.autocast(device, dtype=low or torch.float32, enabled=low is not None):
            loss = torch.nn.functional.mse_loss(model(x, timestep, text, **cond).sample.float(), target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if cuda:
        extra.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                     peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20)
    return {"config": name, "s_step": statistics.median(times), "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params), "arch": arch, "rank": rank, "dtype": dtype,
            "batch": batch, "resolution": resolution, "optimizer": optimizer, "base_dtype": base_dtype,
            "base_quant": base_quant, "compile": compile, "grad_ckpt": grad_ckpt, **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, help="run one configuration in this process, print JSON")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated list for the table")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="bf16/fp16: autocast, fp32 master weights")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=256, help="pixels (latents resolution/8); a multiple of 64")
    ap.add_argument("--arch", choices=("sd1", "sd2", "sdxl"), default="sd1")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw",
                    help="adamw8bit: bitsandbytes on CUDA (AdamW elsewhere, as sdtune's trainer)")
    ap.add_argument("--base-dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--base-quant", choices=("none", "int8", "nf4"), default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    ap.add_argument("--small", action="store_true", help="small widths of the architecture (tests)")
    ap.add_argument("--jsonl", help="append each configuration's result to this file as a JSON line")
    one = ap.add_argument_group("one layer instead of the whole step (layer_ops.py)")
    one.add_argument("--layer", choices=("conv", "linear"), help="an SD1.5-sized conv or linear layer")
    one.add_argument("--layer-adapters", default="floor,sdtune-locon,sdtune-dora,sdtune-flora,peft-lora,peft-dora")
    one.add_argument("--list", action="store_true", help="print every full-size op, not only the summary")
    one.add_argument("--layer-time", type=int, default=0, metavar="N", help="median ms of N forward+backward instead")
    one.add_argument("--channels-last", action="store_true", help="the layer and its input in channels_last")
    args = ap.parse_args(argv)
    if args.layer:
        if args.dtype == "fp16":
            ap.error("--layer: --dtype fp32 or bf16 (CPU autocast)")
        from layer_ops import report

        report(args.layer_adapters.split(","), args.layer, args.dtype, args.channels_last, args.list, args.layer_time)
        return
    if args.resolution % 64 and not args.small:
        ap.error("--resolution must be a multiple of 64")
    if args.base_dtype != "fp32" and args.dtype == "fp32":
        ap.error(f"--base-dtype {args.base_dtype} needs autocast: --dtype bf16 or fp16")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device cuda: CUDA is not available to this torch ({torch.__version__})")
    setting = dict(device=args.device, dtype=args.dtype, batch=args.batch, resolution=args.resolution, arch=args.arch,
                   rank=args.rank, optimizer=args.optimizer, base_dtype=args.base_dtype, base_quant=args.base_quant)
    flags = {"grad_ckpt": args.grad_checkpointing, "compile": args.compile, "small": args.small}
    if args.config:
        print(json.dumps(run_one(args.config, args.steps, args.warmup, args.grad_checkpointing, **setting,
                                 compile=args.compile, small=args.small, compile_backend=args.compile_backend)))
        return
    rows, failed = [], []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--config", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += [a for k, v in setting.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        cmd += [f"--{k.replace('_', '-')}" for k, on in flags.items() if on and k != "grad_ckpt"]
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        cmd += ["--compile-backend", args.compile_backend]
        path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            failed.append(name)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    floor = next((r["s_step"] for r in rows if r["config"] == "floor"), None)
    gpu = next((r for r in rows if "gpu" in r), None)
    machine = f"{gpu['gpu']}, torch {gpu['torch']}" if gpu else args.device
    defaults = dict(device="cpu", dtype="fp32", batch=1, resolution=256, arch="sd1", rank=RANK, optimizer="adamw",
                    base_dtype="fp32", base_quant="none")
    changed = {k: v for k, v in setting.items() if defaults[k] != v and k != "device"}
    where = "" if not changed and args.device == "cpu" else (
        f"; {machine}, " + ", ".join(f"{k} {v}" for k, v in changed.items()) + ", compiled" * args.compile)
    print(f"allocator: {os.environ.get('LD_PRELOAD') or 'glibc'}; grad checkpointing: {args.grad_checkpointing}; "
          f"median of {args.steps} steps after {args.warmup} warm-up{where}\n")
    print("| configuration | s/step | over floor | trainable params | peak RSS MB |" + " peak GPU MB |" * bool(gpu)
          + " set-up s |")
    print("|---|---|---|---|---|" + "---|" * bool(gpu) + "---|")
    nd = 3 if gpu else 2                                # GPU steps are fractions of a second
    for r in rows:
        over = f"{r['s_step'] - floor:+.{nd}f}" if floor is not None else "—"
        setup = f"{r['setup_s']:.1f}" + (f" (cold SVD {r['setup_cold_s']:.1f})" if "setup_cold_s" in r else "")
        mem = f"{r['peak_rss_mb']:,.0f} |" + (f" {r['peak_gpu_mb']:,.0f} |" if gpu else "")
        print(f"| {r['config']} | {r['s_step']:.{nd}f} | {over} | {r['trainable']:,} | {mem} {setup} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
