"""The toy-world judge: a small CNN that reads a 64 px image and names what it shows.

Heads: shape (8), colour (8), background (4), held-apart object (none + 4) and style (none + 2); the colour
objects (``world.COLOUR_OBJECTS``) are read from the shape and colour heads (``shows``). It turns
samples into numbers: concept fidelity (object/style head), prior preservation (shape/colour heads on class
prompts), fusion crosstalk. Trained by ``python -m sdtune.toy.judge`` (seeded; weights in ``assets/judge``).
Labels that an image does not define are ignored in training: an object has its own fixed colours, and the
sketch style has no background.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from . import world as tw
from ..atomic import atomic_path
from ..resources import ASSETS

IGNORE = -100
HEADS: dict[str, tuple[str | None, ...]] = {
    "shape": tw.SHAPES,
    "colour": tuple(tw.COLOURS),
    "background": tw.BACKGROUNDS,
    "object": (None, *tw.OBJECTS),
    "style": (None, *tw.STYLES),
}
DEFAULT_PATH = ASSETS / "judge" / "judge.safetensors"


class Judge(nn.Module):
    """(N, 3, 64, 64) images in [0, 1] -> one logit tensor per head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        chans = [3, w, w, 2 * w, 2 * w, 4 * w, 4 * w]
        for i in range(len(chans) - 1):
            stride = 2 if i % 2 == 0 else 1
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1), nn.BatchNorm2d(chans[i + 1]), nn.SiLU()]
        self.features = nn.Sequential(*layers)  # 64 -> 8 spatial
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 4, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(self.features(x * 2 - 1)).flatten(1)
        return {k: head(h) for k, head in self.heads.items()}


def labels(scene: tw.Scene) -> dict[str, int]:
    """Integer targets per head for a scene (IGNORE where the scene does not define the attribute)."""
    return {
        "shape": tw.SHAPES.index(scene.shape),
        "colour": IGNORE if scene.obj in tw.OBJECTS else list(tw.COLOURS).index(scene.colour),
        "background": IGNORE if scene.style == "bnp" else tw.BACKGROUNDS.index(scene.background),
        "object": HEADS["object"].index(scene.obj if scene.obj in tw.OBJECTS else None),
        "style": HEADS["style"].index(scene.style),
    }


def _training_scene(rng: random.Random) -> tw.Scene:
    u = rng.random()
    if u < 0.5:
        return tw.random_scene(rng)
    obj = rng.choice(tuple(tw.OBJECTS)) if u < 0.7 or u >= 0.9 else None
    style = rng.choice(tuple(tw.STYLES)) if u >= 0.7 else None
    return tw.random_scene(rng, obj=obj, style=style)


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    # Samples from a diffusion model are softer and noisier than renders: train on both.
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images -> (N, 3, H, W) float in [0, 1], resized to 64 px if needed."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((tw.IMAGE_SIZE, tw.IMAGE_SIZE), Image.BILINEAR))
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def make_batch(rng: random.Random, n: int, augment: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [_training_scene(rng) for _ in range(n)]
    imgs = [tw.render(s) for s in scenes]
    if augment:
        imgs = [_augment(im, rng) for im in imgs]
    x = to_tensor(imgs)
    if augment:
        x = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(rng.randrange(2**31)))).clamp(0, 1)
    ys = [labels(s) for s in scenes]
    return x, {k: torch.tensor([y[k] for y in ys]) for k in HEADS}


@dataclass
class Verdict:
    """The judge's reading of one image."""

    shape: str
    colour: str
    background: str
    object: str | None
    style: str | None


def shows(v: Verdict, token: str) -> bool:
    """Whether a verdict shows a concept: a patterned object or a style by its head, a colour object
    (``world.COLOUR_OBJECTS``) by its shape and colour (in any style) with no patterned object."""
    if token in tw.COLOUR_OBJECTS:
        return (v.shape, v.colour) == tw.COLOUR_OBJECTS[token] and v.object is None
    if token in tw.OBJECTS:
        return v.object == token
    if token in tw.STYLES:
        return v.style == token
    raise ValueError(f"unknown concept {token!r}; expected one of {tw.CONCEPTS}")


@torch.no_grad()
def judge(model: Judge, images: list[Image.Image], batch_size: int = 256) -> list[Verdict]:
    model.eval()
    out: list[Verdict] = []
    for i in range(0, len(images), batch_size):
        logits = model(to_tensor(images[i:i + batch_size]))
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        for j in range(len(idx["shape"])):
            out.append(Verdict(**{k: HEADS[k][idx[k][j]] for k in HEADS}))
    return out


def load(path: str | Path = DEFAULT_PATH) -> Judge:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found at {path}; train them with `python -m sdtune.toy.judge`")
    model = Judge()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def accuracy(model: Judge, n: int = 1024, seed: int = 12345) -> dict[str, float]:
    """Per-head accuracy on ``n`` fresh, un-augmented toy-world images (ignored labels excluded)."""
    model.eval()
    x, y = make_batch(random.Random(seed), n, augment=False)
    logits = model(x)
    acc = {}
    for k in HEADS:
        valid = y[k] != IGNORE
        acc[k] = float((logits[k].argmax(1)[valid] == y[k][valid]).float().mean())
    return acc


def train(steps: int = 3000, batch: int = 64, seed: int = 0, out: str | Path = DEFAULT_PATH,
          log_every: int = 250) -> dict[str, float]:
    """Train the judge from scratch (seeded) and save it with safetensors; returns held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        x, y = make_batch(rng, batch)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y[k], ignore_index=IGNORE) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"judge step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    acc = accuracy(model)
    print("held-out accuracy:", {k: round(v, 4) for k, v in acc.items()}, flush=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description="Train the toy-world judge.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_PATH))
    a = p.parse_args()
    train(a.steps, a.batch, a.seed, a.out)


if __name__ == "__main__":
    main()
