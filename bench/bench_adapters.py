"""One training step (forward, backward, AdamW) on the SD1.5-architecture U-Net with random weights, per adapter.

fp32 CPU, batch 1, latents 4×32×32 (256 px), text 1×77×768; adapters on the attn + resnet + sample presets
(Transformer2DModel, ResnetBlock2D, Down/Upsample2D layers) at rank 16 = alpha for sdtune and the peers.
Every configuration runs in its own subprocess (fresh allocator state, honest peak RSS); the median of
``--steps`` steps after ``--warmup`` warm-up steps is reported.

    python bench/bench_adapters.py                       # all configs, markdown table on stdout
    python bench/bench_adapters.py --config sdtune-locon --steps 1 --warmup 0     # one config (smoke test)
    python bench/bench_adapters.py --grad-checkpointing --configs sdtune-locon,lycoris-locon-bypass,floor
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/bench_adapters.py   # other allocator
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


def _sdtune(unet, name: str, svd_dir: str) -> tuple[list, dict]:
    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach

    spec = {"sdtune-locon": AdapterSpec("locon", rank=RANK, alpha=RANK),
            "sdtune-locon-tucker": AdapterSpec("locon", rank=RANK, alpha=RANK, tucker=True),
            "sdtune-flora": AdapterSpec("flora", rank=RANK),
            "sdtune-dora": AdapterSpec("dora", rank=RANK, alpha=RANK),
            "sdtune-spectral": AdapterSpec("spectral", rank=RANK)}[name]
    rules = [(p, spec) for p in PRESETS]
    extra = {}
    if name == "sdtune-spectral":                       # SVD of every targeted layer: cold, then from the cache
        t = time.perf_counter()
        inj = attach({"unet": unet}, rules, "sd1", svd_cache_dir=svd_dir)
        extra["setup_cold_s"] = time.perf_counter() - t
        inj.detach()
    t = time.perf_counter()
    inj = attach({"unet": unet}, rules, "sd1", svd_cache_dir=svd_dir)
    extra["setup_s"] = time.perf_counter() - t
    return inj.parameters(), extra


def _target_names(unet) -> list[str]:
    from sdtune.inject import preset_targets

    return [path for p in PRESETS for _, path in preset_targets(p, {"unet": unet})]


def _lycoris(unet, name: str) -> tuple[list, dict]:
    from lycoris.wrapper import LycorisNetwork

    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [
        "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"], "target_name": []})
    t = time.perf_counter()
    net = LycorisNetwork(unet, multiplier=1.0, lora_dim=RANK, conv_lora_dim=RANK, alpha=RANK, conv_alpha=RANK,
                         use_tucker=name == "lycoris-tucker", network_module="lora",
                         weight_decompose=name == "lycoris-dora", bypass_mode=name == "lycoris-locon-bypass")
    net.apply_to()
    return list(net.parameters()), {"setup_s": time.perf_counter() - t}


def _peft(unet, name: str) -> tuple[list, dict]:
    from peft import LoraConfig, inject_adapter_in_model

    t = time.perf_counter()
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=_target_names(unet), use_dora=name == "peft-dora")
    inject_adapter_in_model(cfg, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params, {"setup_s": time.perf_counter() - t}


def run_one(name: str, steps: int, warmup: int, grad_ckpt: bool) -> dict:
    import torch

    from sdtune.archs import build_unet

    torch.manual_seed(0)
    unet = build_unet("sd1")
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
    with tempfile.TemporaryDirectory() as svd_dir:
        if name.startswith("sdtune-"):
            params, extra = _sdtune(unet, name, svd_dir)
        elif name.startswith("lycoris-"):
            params, extra = _lycoris(unet, name)
        elif name.startswith("peft-"):
            params, extra = _peft(unet, name)
        else:
            params, extra = [], {"setup_s": 0.0}
    latents = torch.randn(1, 4, 32, 32)
    text = torch.randn(1, 77, 768)
    target = torch.randn(1, 4, 32, 32)
    timestep = torch.tensor([500])
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for i in range(warmup + steps):
        x = latents.clone().requires_grad_(not params)       # the floor: backward to the input only
        t = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, timestep, text).sample, target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"config": name, "s_step": statistics.median(times), "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": sum(p.numel() for p in params), **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, help="run one configuration in this process, print JSON")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated list for the table")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if args.config:
        print(json.dumps(run_one(args.config, args.steps, args.warmup, args.grad_checkpointing)))
        return
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--config", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(f"{name} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    floor = next((r["s_step"] for r in rows if r["config"] == "floor"), None)
    print(f"allocator: {os.environ.get('LD_PRELOAD') or 'glibc'}; grad checkpointing: {args.grad_checkpointing}; "
          f"median of {args.steps} steps after {args.warmup} warm-up\n")
    print("| configuration | s/step | over floor | trainable params | peak RSS MB | set-up s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        over = f"{r['s_step'] - floor:+.2f}" if floor is not None else "—"
        setup = f"{r['setup_s']:.1f}" + (f" (cold SVD {r['setup_cold_s']:.1f})" if "setup_cold_s" in r else "")
        print(f"| {r['config']} | {r['s_step']:.2f} | {over} | {r['trainable']:,} | {r['peak_rss_mb']:,.0f} | {setup} |")


if __name__ == "__main__":
    main()
