"""Train variants of one concept's recipe and judge each adapter alone: does it learn, and does it carry over?

    PYTHONPATH=. python bench/sweep_concept.py --concept qtz --out outputs/sweep-qtz \\
        --variant "base:" --variant "no-te: train.train_text_encoder=false" --variant "x36: instances=36"

Each ``--variant "NAME: ITEM ..."`` trains the concept with bench_fusion's recipe plus training-config overrides
(``section.key=value``; ``instances=N`` sets the number of instance images) in ``<out>/<NAME>``, then judges ``-n``
samples per prompt of a ladder. A style's ladder moves from its test prompt to the joint prompt: "a circle in qtz
style", "a star in qtz style", "a red star in qtz style", "a photo star in qtz style" (a word no caption uses),
"a sks star in qtz style"; an object's: "a ohwx circle", "a ohwx circle on a striped background", "a ohwx circle in qtz style". The
last column is the prior ("a red circle"; for an object its class, "a circle"): the concept should not show there.
Prints one row per variant: the share of samples showing the concept.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.bench_fusion import judge_rates, present, train_concept
from bench.bench_fusion import parser as fusion_parser
from sdtune import judge as J
from sdtune import toyworld as tw
from sdtune.models import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/sweep-concept")
    p.add_argument("--concept", default="qtz", choices=tw.CONCEPTS)
    p.add_argument("--variant", action="append", required=True, metavar='"NAME: ITEM ..."')
    p.add_argument("-n", type=int, default=16, help="samples per prompt")
    a = p.parse_args()
    c = a.concept
    if c in tw.STYLES:
        prompts = [f"a circle in {c} style", f"a star in {c} style", f"a red star in {c} style",
                   f"a photo star in {c} style", f"a sks star in {c} style", "a red circle"]
    else:
        noun = f"{c} {tw.OBJECTS[c]}"
        prompts = [f"a {noun}", f"a {noun} on a striped background", f"a {noun} in qtz style",
                   f"a {tw.OBJECTS[c]}"]
    setting = "--style-set" if c in tw.STYLES else "--object-set"
    model, judge = load(), J.load()
    rows = []
    for spec in a.variant:
        name, _, items = spec.partition(":")
        items = items.split()
        instances = [int(i.split("=")[1]) for i in items if i.startswith("instances=")]
        args = fusion_parser().parse_args(["--out", str(Path(a.out) / name.strip()), "--reuse",
                                           "--per-prompt", str(a.n), "--instances", str((instances or [12])[0])]
                                          + [f"{setting}={i}" for i in items if not i.startswith("instances=")])
        t0 = time.time()
        f = train_concept(c, "locon", {"algorithm": "locon", "rank": 8}, Path(args.out), args)
        rates = judge_rates(model, judge, [f], [1.0], prompts, args)
        rows.append((name.strip(), " ".join(items), [sum(present(v, c) for v in rates[q]) / a.n for q in prompts]))
        print(f"{rows[-1]} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\n{a.n} samples per prompt; share of samples showing {c} (the last column is the prior: lower is "
          "better).\n\n| variant | overrides | " + " | ".join(prompts) + " |\n|---|---|" + "---|" * len(prompts))
    for name, items, r in rows:
        print(f"| {name} | {items or '-'} | " + " | ".join(f"{x:.0%}" for x in r) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
