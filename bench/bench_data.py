"""Real-dataset features on the toy world (issue 16): aspect-ratio buckets against a centre square crop, the
background leak with and without masked loss, two concepts in one run through subsets, and the latent disk cache's
read speed against the training step.

    flock /tmp/sdtune-heavy.lock python bench/bench_data.py buckets [--n 32] [--out outputs/bench_data]
    flock /tmp/sdtune-heavy.lock python bench/bench_data.py masks [--n 32] [--out outputs/bench_data]
    flock /tmp/sdtune-heavy.lock python bench/bench_data.py subsets [--n 32] [--out outputs/bench_data]
    python bench/bench_data.py cache [--out outputs/bench_data]
    python bench/bench_data.py steps [--out outputs/bench_data]    # step time, buckets vs centre crop, warm

Instance set: 12 ``sks`` stars in 96×48 and 48×96 frames (``toy.world.write_framed_instance_folder``, drawn at the
world's pixel scale), the star 0.25–0.3 from an end of the long side in 8 of them, so a centre square crop keeps
about half of it there. Two runs of the demo recipe (``sdtune/recipes/demo.toml``, 600 steps) on that set:
``data.buckets = true`` (the default) and ``false`` (the classic centre square crop, which must upscale the 48 px
short sides: ``data.bucket_upscale``). Each adapter is judged on "a sks star" at 64×64 and at the two buckets'
shapes (80×48, 48×80; a non-square sample counts when the judge finds the star in one of three square windows
along its long side, the same rule for the base model), ``--seed`` 500, ``n`` samples each. ``--data-seed``
draws other instance images.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from sdtune.config import load_config
from sdtune.models import load
from sdtune.resources import recipe_path
from sdtune.sample import SampleRequest, generate
from sdtune.toy import judge as J
from sdtune.toy import world as tw
from sdtune.train.loop import train

SHAPES = ((64, 64), (80, 48), (48, 80))


def squares(im: Image.Image) -> list[Image.Image]:
    """The square windows the judge reads in a sample: the image itself if square, else three along the long side
    (start, centre, end): the concept may be anywhere in a non-square frame, and the judge reads 64×64 squares."""
    w, h = im.size
    s = min(w, h)
    return [im.crop((o, 0, o + s, s)) if w > h else im.crop((0, o, s, o + s))
            for o in sorted({0, (max(w, h) - s) // 2, max(w, h) - s})]


def fidelity(model, judge, adapter, n: int, width: int, height: int, seed: int = 500) -> float:
    """Share of ``n`` "a sks star" samples in which the judge finds the sks star in some window (``squares``)."""
    req = SampleRequest(["a sks star"], seed=seed, steps=20, guidance=5.0, count=n, width=width, height=height,
                        adapters=[(str(adapter), 1.0)] if adapter else [])
    found = 0
    for s in generate(model, req, progress=False):
        found += any(v.object == "sks" for v in J.judge(judge, squares(s.image)))
    return found / n


def buckets(a) -> None:
    out = Path(a.out)
    inst = out / "framed_sks"
    tw.write_framed_instance_folder("sks", inst, n=12, seed=a.data_seed)
    rows = []
    model, judge = load(), J.load()
    base = [fidelity(model, judge, None, a.n, w, h, a.seed) for w, h in SHAPES]
    rows.append(("base model", "—", base))
    for name, bucketed in (("buckets (default)", True), ("centre square crop", False)):
        run = out / ("buckets" if bucketed else "centre_crop")
        flags = f"data.buckets={str(bucketed).lower()}", f"data.bucket_upscale={str(not bucketed).lower()}"
        cfg = load_config(recipe_path("demo"), [f"data.instance_dir={inst.resolve()}", f"output.dir={run}", *flags,
                                                "output.validation_prompts=[]", "output.checkpoint_every=0"])
        t0 = time.time()
        result = train(cfg, progress=False)
        wall = time.time() - t0
        fids = [fidelity(model, judge, result.kohya, a.n, w, h, a.seed) for w, h in SHAPES]
        rows.append((name, f"{wall:.0f} s", fids))
    print(f"| run | wall | " + " | ".join(f"fidelity {w}×{h}" for w, h in SHAPES) + " |")
    print("|---|---|" + "---|" * len(SHAPES))
    for name, wall, fids in rows:
        print(f"| {name} | {wall} | " + " | ".join(f"{f:.1%}" for f in fids) + " |")


def masks(a) -> None:
    """Background leak: 12 sks stars all on a checkered background, captioned "a sks star"; trained without and
    with their shape masks (``data.mask_dir``); the judge's background head on "a sks star" samples."""
    out = Path(a.out)
    inst, mask_dir = out / "checkered_sks", out / "checkered_sks_masks"
    tw.write_masked_instance_folder("sks", inst, mask_dir, background="checkered", n=12, seed=a.data_seed)
    model, judge = load(), J.load()

    def judged(adapter) -> tuple[float, float]:
        req = SampleRequest(["a sks star"], seed=a.seed, steps=20, guidance=5.0, count=a.n,
                            adapters=[(str(adapter), 1.0)] if adapter else [])
        v = J.judge(judge, [s.image for s in generate(model, req, progress=False)])
        return sum(x.object == "sks" for x in v) / a.n, sum(x.background == "checkered" for x in v) / a.n

    rows = [("base model", "—", *judged(None))]
    for name, masked in (("no masks", False), ("masks (data.mask_dir)", True)):
        run = out / ("masked" if masked else "unmasked")
        sets = [f"data.instance_dir={inst.resolve()}", f"output.dir={run}", "output.validation_prompts=[]",
                "output.checkpoint_every=0"] + ([f"data.mask_dir={mask_dir.resolve()}"] if masked else [])
        t0 = time.time()
        result = train(load_config(recipe_path("demo"), sets), progress=False)
        rows.append((name, f"{time.time() - t0:.0f} s", *judged(result.kohya)))
    print('| run | wall | "a sks star": fidelity | judged on a checkered background (leak) |')
    print("|---|---|---|---|")
    for name, wall, fid, leak in rows:
        print(f"| {name} | {wall} | {fid:.1%} | {leak:.1%} |")


def subsets(a) -> None:
    """Two concepts in one run: [[data.subsets]] of 12 sks stars and 12 ohwx circles, each with its own class
    prompt (48 generated class images each), the demo recipe otherwise at twice its steps (1,200: the same epochs
    per concept as the one-concept demo); fidelity of each concept's prompt, in its captions' words."""
    out = Path(a.out)
    for token in ("sks", "ohwx"):
        tw.write_instance_folder(token, out / token, n=12, seed=a.data_seed)
    subsets = ", ".join(f'{{dir = "{(out / t).resolve()}", class_prompt = "a {tw.OBJECTS[t]}"}}'
                        for t in ("sks", "ohwx"))
    cfg = load_config(recipe_path("demo"), [
        "data.instance_dir=", f"data.subsets=[{subsets}]", "train.steps=1200", f"output.dir={out / 'two_concepts'}",
        "output.validation_prompts=[]", "output.checkpoint_every=0", f"prior.class_dir={(out / 'classes').resolve()}"])
    t0 = time.time()
    result = train(cfg, progress=False)
    wall = time.time() - t0
    model, judge = load(), J.load()
    print("| prompt | base model | two-concept adapter |")
    print("|---|---|---|")
    for token in ("sks", "ohwx"):
        fid = []
        for adapters in ([], [(str(result.kohya), 1.0)]):
            req = SampleRequest([tw.concept_prompt(token)], seed=a.seed, steps=20, guidance=5.0, count=a.n,
                                adapters=adapters)
            v = J.judge(judge, [s.image for s in generate(model, req, progress=False)])
            fid.append(sum(x.object == token for x in v) / a.n)
        print(f'| "{tw.concept_prompt(token)}": fidelity | {fid[0]:.1%} | {fid[1]:.1%} |')
    print(f"(training: {wall:.0f} s)")


def steps(a) -> None:
    """Training-step time with buckets against the centre square crop on the framed set, after warm-up: 12 steps
    (every latent cached), then the mean of 20, each configuration set up in turn in this process."""
    from sdtune.train.loop import Trainer

    inst = Path(a.out) / "framed_sks"
    tw.write_framed_instance_folder("sks", inst, n=12, seed=a.data_seed)
    print("| run | ms per step (mean of 20, after 12) |")
    print("|---|---|")
    for name, bucketed in (("buckets (default)", True), ("centre square crop", False)):
        flags = f"data.buckets={str(bucketed).lower()}", f"data.bucket_upscale={str(not bucketed).lower()}"
        cfg = load_config(recipe_path("demo"), [f"data.instance_dir={inst.resolve()}", *flags,
                                                f"output.dir={Path(a.out) / 'steps'}", "output.validation_prompts=[]"])
        trainer = Trainer(cfg, progress=False)
        trainer.setup()
        for step in range(1, 13):
            trainer.optimizer_step(step, None)
        t0 = time.perf_counter()
        for step in range(13, 33):
            trainer.optimizer_step(step, None)
        print(f"| {name} | {(time.perf_counter() - t0) / 20 * 1e3:.0f} |")


def cache(a) -> None:
    """Latents read back from the disk cache against one training step, both at batch 16."""
    import torch

    from sdtune.data.latent_cache import LatentCache, vae_fingerprint
    from sdtune.train.loop import Trainer

    out = Path(a.out)
    inst = out / "cache_sks"
    tw.write_framed_instance_folder("sks", inst, n=64)
    cfg = load_config(recipe_path("demo"), [f"data.instance_dir={inst.resolve()}", f"output.dir={out / 'cache_run'}",
                                            f"data.latent_cache_dir={out / 'latents'}", "prior.enabled=false",
                                            "train.batch_size=16", "train.steps=4", "output.validation_prompts=[]"])
    trainer = Trainer(cfg, progress=False)
    trainer.setup()
    views = [v for k in range(len(trainer.dataset) // 16) for v in trainer.micro_batch(k)]
    for k in range(0, len(views), 16):  # fill the cache (grouped by bucket, as training reads it)
        for idx in trainer.dataset.groups(views[k:k + 16]):
            trainer.encoder.latents([views[k + i] for i in idx], trainer.dataset)
    fresh = LatentCache(out / "latents", vae_fingerprint(trainer.model.pipeline.vae))
    trainer.encoder.disk = fresh
    t0 = time.perf_counter()
    for k in range(0, len(views), 16):
        for idx in trainer.dataset.groups(views[k:k + 16]):
            trainer.encoder.latents([views[k + i] for i in idx], trainer.dataset)
    read = time.perf_counter() - t0
    assert fresh.hits == len(views) and fresh.misses == 0
    torch.manual_seed(0)
    trainer.optimizer_step(1, None)  # warm-up
    t0 = time.perf_counter()
    steps = 3
    for s in range(2, 2 + steps):
        trainer.optimizer_step(s, None)
    step = (time.perf_counter() - t0) / steps
    print(f"| disk cache read | {len(views) / read:,.0f} latents/s ({read / (len(views) / 16) * 1e3:.1f} ms per batch "
          f"of 16) |")
    print(f"| training step, batch 16 (read included) | {step * 1e3:.0f} ms ({16 / step:.1f} images/s) |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("question", choices=["buckets", "steps", "masks", "subsets", "cache"])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=500, help="first sampling seed of the judged samples")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the toy-world instance images")
    p.add_argument("--out", default="outputs/bench_data")
    a = p.parse_args()
    {"buckets": buckets, "steps": steps, "masks": masks, "subsets": subsets, "cache": cache}[a.question](a)


if __name__ == "__main__":
    main()
