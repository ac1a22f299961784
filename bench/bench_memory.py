"""Does ``sdtune train --dry-run`` predict the peak GPU memory of a real run? (issue 19: within 15 %)

For each setting, a random-weights model of the published architecture (``archs.build_random``, SD's VAE layout) is
written as a diffusers folder; the estimate (``train.loop.memory_plan``) is taken, then the real trainer runs
``--steps`` steps on toy-world images and ``torch.cuda.max_memory_allocated`` is read. One process per setting.

    python bench/bench_memory.py                             # on a GPU: SD1.5 512 px batch 4, SDXL 1024 px batch 1
    python bench/bench_memory.py --device cpu --small        # CPU smoke test: small widths at 64 px (estimate only)
    python bench/bench_memory.py --settings sdxl-r32 --jsonl results.jsonl

Settings (every one LoCon on attention + ResNet layers, prior preservation off, latents cached):
    sd1-bf16   SD1.5, 512 px, batch 4, rank 16, bf16 autocast over a bf16 base, AdamW
    sd1-fp32   the same in fp32
    sdxl-r32   SDXL, 1024 px, batch 1, rank 32, bf16 base, gradient checkpointing, 8-bit AdamW
    sdxl-dora  sdxl-r32 with DoRA
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "sd1-bf16": dict(arch="sd1", resolution=512, batch=4, rank=16, algorithm="locon", mixed="bf16", ckpt=False,
                     optimizer="adamw"),
    "sd1-fp32": dict(arch="sd1", resolution=512, batch=4, rank=16, algorithm="locon", mixed="no", ckpt=False,
                     optimizer="adamw"),
    "sdxl-r32": dict(arch="sdxl", resolution=1024, batch=1, rank=32, algorithm="locon", mixed="bf16", ckpt=True,
                     optimizer="adamw8bit"),
    "sdxl-dora": dict(arch="sdxl", resolution=1024, batch=1, rank=32, algorithm="dora", mixed="bf16", ckpt=True,
                      optimizer="adamw8bit"),
}
# SD's AutoencoderKL (SD1.5 and SDXL share the layout; the scaling factor differs and does not change memory)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4)
SMALL_VAE = dict(VAE_CONFIG, block_out_channels=(16, 32, 32, 32), norm_num_groups=8)


def write_model(arch: str, folder: Path, small: bool) -> None:
    """A diffusers pipeline folder of ``arch`` with random weights (fp16 on disk: loading makes it fp32 again)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from sdtune.archs import build_random
    from sdtune.models import EMBEDDED
    from sdtune.toy.pretrain import build_pipeline

    model = build_random(arch, small=small)
    te = model.text_encoders["text_encoder"]
    te = [te, model.text_encoders["text_encoder_2"]] if arch == "sdxl" else te
    pipe = build_pipeline(AutoencoderKL(**(SMALL_VAE if small else VAE_CONFIG)), te,
                          CLIPTokenizer.from_pretrained(EMBEDDED / "tokenizer"), model.unet)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def config_overrides(s: dict, model: Path, images: Path, out: Path, steps: int, resolution: int) -> list[str]:
    return [f"model.path={json.dumps(str(model))}", f"data.instance_dir={json.dumps(str(images))}",
            'data.instance_prompt="a sks star"', f"data.resolution={resolution}", "data.cache_latents=true",
            f"adapters=[{{preset=\"attn\", algorithm=\"{s['algorithm']}\", rank={s['rank']}}}, "
            f"{{preset=\"resnet\", algorithm=\"{s['algorithm']}\", rank={s['rank']}}}]",
            f"train.steps={steps}", f"train.batch_size={s['batch']}", f"train.mixed_precision={json.dumps(s['mixed'])}",
            f"train.base_dtype={json.dumps('bf16' if s['mixed'] == 'bf16' else 'fp32')}",
            f"train.gradient_checkpointing={str(s['ckpt']).lower()}", f"optim.optimizer={json.dumps(s['optimizer'])}",
            f"output.dir={json.dumps(str(out))}", "output.validation_prompts=[]", "output.checkpoint_every=0",
            "output.sample_every=0"]


def worker(name: str, device: str, small: bool, steps: int, jsonl: str | None) -> None:
    import torch

    from sdtune.config import loads_config
    from sdtune.toy import world as tw
    from sdtune.train.loop import memory_plan, train

    s = SETTINGS[name]
    resolution = 64 if small else s["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(s["arch"], tmp / "model", small)
        tw.write_instance_folder("sks", tmp / "images", n=max(4, s["batch"]))
        cfg = loads_config("[data]\ninstance_dir = \"x\"\n[[adapters]]\n[train]\nsteps = 1\n",
                           config_overrides(s, tmp / "model", tmp / "images", tmp / "run", steps, resolution))
        plan = memory_plan(cfg)
        row = dict(setting=name, device=device, small=small, resolution=resolution, predicted_gib=plan.peak / 2**30,
                   step_gib=plan.step / 2**30, weights_gib=plan.weights / 2**30)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            train(cfg, progress=False)
            row["measured_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["ratio"] = row["predicted_gib"] / row["measured_gib"]
    print(json.dumps(row), flush=True)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="small widths at 64 px (a CPU check of the script)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--jsonl", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.device, a.small, a.steps, a.jsonl)
        return
    rows = []
    for name in a.settings.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--device", a.device, "--steps", str(a.steps),
               *(["--small"] if a.small else []), *(["--jsonl", a.jsonl] if a.jsonl else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        rows.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                    dict(setting=name, error=(done.stderr.strip().splitlines() or ["?"])[-1]))
    print("| setting | predicted peak | measured (max_memory_allocated) | predicted / measured | one step's tensors |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | failed: {r['error']} | | | |")
            continue
        measured = f"{r['measured_gib']:.2f} GiB" if "measured_gib" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        print(f"| {r['setting']}{' (small, 64 px)' if r['small'] else ''} | {r['predicted_gib']:.3f} GiB | {measured} "
              f"| {ratio} | {r['step_gib']:.3f} GiB |")


if __name__ == "__main__":
    main()
