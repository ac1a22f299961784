"""Cost of composed sampling: wall time of 32 images (20 steps) of one prompt, plain with both adapters applied
against ``sdtune.compose`` with each adapter on its own phrase; median of 3 runs, interleaved.

    python bench/bench_compose.py --adapters outputs/bf2s2/runs/locon-sks/adapter.safetensors \\
        outputs/bf2s2/runs/locon-qtz/adapter.safetensors --prompt "a [sks] star [in qtz style]"
"""
from __future__ import annotations

import argparse
import statistics
import time

from sdtune import compose
from sdtune.models import load
from sdtune.sample import SampleRequest, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--prompt", default="a [sks] star [in qtz style]")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
