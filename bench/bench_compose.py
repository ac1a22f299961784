"""Composed sampling: its cost, and two subjects side by side with regions (issue 22).

    # cost: wall time of 32 images (20 steps) of one prompt, plain with both adapters applied against
    # ``sdtune.compose`` with each adapter on its own phrase; median of 3 runs, interleaved
    python bench/bench_compose.py cost --adapters outputs/bf2s2/runs/locon-sks/adapter.safetensors \\
        outputs/bf2s2/runs/locon-qtz/adapter.safetensors --prompt "a [sks] star [in qtz style]"

    # regions: two object adapters, "[a sks star] [an ohwx circle]" on a 128×64 canvas, composed with regions
    # left/right against composed without regions (same prompt, seeds, size); the judge reads each 64×64 half
    python bench/bench_compose.py regions --adapters SKS.safetensors OHWX.safetensors --tokens sks,ohwx --n 64
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from sdtune import compose
from sdtune.models import load
from sdtune.sample import SampleRequest, generate


def cost(a) -> None:
    model = load()
    adapters = [(f, 1.0) for f in a.adapters]
    plain_prompt = compose.parse(a.prompt, len(adapters)).text
    times: dict[str, list[float]] = {"plain": [], "composed": []}
    for _ in range(a.repeats):
        for label, sample, prompt in (("plain", generate, plain_prompt), ("composed", compose.generate, a.prompt)):
            t = time.perf_counter()
            sample(model, SampleRequest([prompt], steps=a.steps, count=a.count, adapters=adapters), progress=False)
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.count} images, {a.steps} steps, {len(adapters)} adapters: plain {med['plain']:.1f} s, composed "
          f"{med['composed']:.1f} s ({med['composed'] / med['plain']:.2f}×), median of {a.repeats}")


def regions(a) -> None:
    from sdtune.toy import judge as J
    from sdtune.toy import world as tw

    left, right = a.tokens.split(",")
    model, judge = load(), J.load()
    prompt = f"[{tw.concept_prompt(left)}] [{tw.concept_prompt(right)}]"
    adapters = [(f, 1.0) for f in a.adapters]
    side = model.resolution
    rows = []
    for label, regs in (("composed, regions left/right", ["left", "right"]), ("composed, no regions", [])):
        t = time.perf_counter()
        request = SampleRequest([prompt], seed=a.seed, steps=a.steps, guidance=a.guidance, count=a.n,
                                width=2 * side, height=side, adapters=adapters, regions=regs)
        images = [s.image for s in compose.generate(model, request, progress=False)]
        seconds = time.perf_counter() - t
        halves = J.judge(judge, [im.crop((0, 0, side, side)) for im in images] +
                         [im.crop((side, 0, 2 * side, side)) for im in images])
        lv, rv = halves[:a.n], halves[a.n:]
        ok_l = [v.object == left for v in lv]
        ok_r = [v.object == right for v in rv]
        both = sum(x and y for x, y in zip(ok_l, ok_r)) / a.n
        rows.append((label, sum(ok_l) / a.n, sum(ok_r) / a.n, both, seconds))
        seen = Counter(f"{x.object or x.shape}|{y.object or y.shape}" for x, y in zip(lv, rv))
        print(f"{label}: " + ", ".join(f"{k} {n}" for k, n in seen.most_common(5)), flush=True)
        if a.out:
            from pathlib import Path

            from sdtune.sample import grid
            Path(a.out).mkdir(parents=True, exist_ok=True)
            grid(images[:16], columns=4).save(Path(a.out) / f"{'regions' if regs else 'plain'}.png")
    print(f"\n{prompt!r}, {a.n} samples at {2 * side}×{side}, {a.steps} steps, guidance {a.guidance}, seeds "
          f"{a.seed}…{a.seed + a.n - 1}\n")
    print(f"| sampling | left half: {left} | right half: {right} | both | time |\n|---|---|---|---|---|")
    for label, l_, r_, b_, s in rows:
        print(f"| {label} | {l_:.1%} | {r_:.1%} | **{b_:.1%}** | {s:.0f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost", help="composed sampling's time against plain sampling")
    c.add_argument("--adapters", nargs="+", required=True)
    c.add_argument("--prompt", default="a [sks] star [in qtz style]")
    c.add_argument("--count", type=int, default=32)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--repeats", type=int, default=3)
    c.set_defaults(func=cost)
    r = sub.add_parser("regions", help="two object adapters side by side, judged per half")
    r.add_argument("--adapters", nargs=2, required=True, metavar=("LEFT", "RIGHT"))
    r.add_argument("--tokens", default="sks,ohwx", help="the two adapters' object tokens, left then right")
    r.add_argument("--n", type=int, default=64)
    r.add_argument("--seed", type=int, default=7000)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--guidance", type=float, default=5.0)
    r.add_argument("--out", default=None, help="write a 16-image grid per mode here")
    r.set_defaults(func=regions)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
