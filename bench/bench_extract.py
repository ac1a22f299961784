"""Issue 21: LoRA extraction from a full fine-tune of the embedded model, judged by the toy-world judge.

    flock /tmp/sdtune-heavy.lock python bench/bench_extract.py --out outputs/bench_extract

1. Full-weight fine-tune of the embedded U-Net (every parameter, AdamW, ``--steps`` steps, batch ``--batch``) on the
   12 demo images of the ``sks`` star (``sdtune/assets/demo/sks``, their captions), epsilon loss; the text encoder
   stays frozen. The fine-tune is saved as a diffusers folder.
2. ``sdtune.tools.extract`` at each rank of ``--ranks`` (fixed mode, U-Net only, convs included).
3. ``--per-prompt`` samples of "a sks star" and "a star" for the base model, the fine-tune itself and the base with
   each extracted file; the judge reads whether the sks object is present (fidelity) and, on "a star", whether a
   star without the concept is drawn (prior).
Writes ``<out>/RESULTS.md`` (a markdown table) and prints it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from sdtune.models import load
from sdtune.resources import ASSETS
from sdtune.sample import SampleRequest, generate
from sdtune.tools.extract import extract, save_extracted
from sdtune.toy import judge as J

DATA = ASSETS / "demo" / "sks"
PROMPTS = ["a sks star", "a star"]


def full_finetune(model, steps: int, batch: int, lr: float, seed: int) -> float:
    """Train every U-Net parameter on the demo images; returns the mean loss of the last 50 steps."""
    pipe = model.pipeline
    images = sorted(DATA.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                              .permute(2, 0, 1) / 127.5 - 1 for p in images])
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    unet = pipe.unet.train().requires_grad_(True)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=hidden[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    return sum(losses[-50:]) / len(losses[-50:])


def rates(model, judge, files: list[Path], a) -> dict[str, float]:
    request = SampleRequest(PROMPTS, seed=a.seed, steps=a.sample_steps, count=a.per_prompt,
                            adapters=[(str(f), 1.0) for f in files])
    verdicts = J.judge(judge, [s.image for s in generate(model, request, progress=False)])
    sks, star = verdicts[:a.per_prompt], verdicts[a.per_prompt:]
    return {"fidelity": sum(v.object == "sks" for v in sks) / len(sks),
            "prior": sum(v.shape == "star" and v.object is None for v in star) / len(star)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bench_extract")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ranks", default="2,4,8,16,32")
    p.add_argument("--per-prompt", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    judge = J.load()
    base = load()
    tuned = load()
    t0 = time.time()
    loss = full_finetune(tuned, a.steps, a.batch, a.lr, a.seed)
    print(f"fine-tune: {a.steps} steps in {time.time() - t0:.0f} s, final loss {loss:.4f}")
    tuned.pipeline.save_pretrained(out / "finetune", safe_serialization=True)
    rows = [("base model", "—", "—", rates(base, judge, [], a)),
            ("full fine-tune", "—", "—", rates(tuned, judge, [], a))]
    for rank in (int(r) for r in a.ranks.split(",")):
        result = extract(base.components(), tuned.components(), base.arch, "rank", rank, text_encoders=False,
                         progress=False)
        path = out / f"extract-r{rank}.safetensors"
        save_extracted(result, path, dtype=torch.float32, sources=("embedded", out / "finetune"))
        rows.append((f"extracted r{rank}", f"{result.total_energy():.3f}", f"{path.stat().st_size / 1e6:.2f}",
                     rates(base, judge, [path], a)))
        print(rows[-1])
    table = ["| model | captured energy | file MB | sks fidelity | prior (a star) |", "|---|---|---|---|---|"]
    table += [f"| {name} | {energy} | {size} | {r['fidelity']:.0%} | {r['prior']:.0%} |"
              for name, energy, size, r in rows]
    text = (f"{a.per_prompt} samples per prompt, {a.sample_steps} steps, seed {a.seed}; fine-tune {a.steps} steps, "
            f"batch {a.batch}, lr {a.lr:g}, final loss {loss:.4f}\n\n" + "\n".join(table) + "\n")
    (out / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
