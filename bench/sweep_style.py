"""How well does a style adapter carry over to new content? Train variants of one style's recipe and judge each alone.

    PYTHONPATH=. python bench/sweep_style.py --out outputs/sweep-qtz \\
        --variant "base:" --variant "no-te: train.train_text_encoder=false" --variant "x36: instances=36"

Each ``--variant "NAME: ITEM ..."`` trains the style (``--style``, default qtz) with bench_fusion's recipe plus
training-config overrides (``section.key=value``; ``instances=N`` sets the number of instance images) in
``<out>/<NAME>``, then judges ``-n`` samples per prompt of a ladder that moves from the style's test prompt to the
joint prompt: "a circle in qtz style", "a star in qtz style", "a red star in qtz style", "a rrk star in qtz style"
(an unseen token), "a sks star in qtz style"; plus "a red circle" (the prior: the style should not show).
Prints one row per variant: the share of samples in the style.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.bench_fusion import judge_rates, parser as fusion_parser, train_concept
from sdtune import judge as J
from sdtune.models import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/sweep-style")
    p.add_argument("--style", default="qtz")
    p.add_argument("--object", default="sks")
    p.add_argument("--variant", action="append", required=True, metavar='"NAME: ITEM ..."')
    p.add_argument("-n", type=int, default=16, help="samples per prompt")
    a = p.parse_args()
    s, o = a.style, a.object
    prompts = [f"a circle in {s} style", f"a star in {s} style", f"a red star in {s} style",
               f"a rrk star in {s} style", f"a {o} star in {s} style", "a red circle"]
    model, judge = load(), J.load()
    rows = []
    for spec in a.variant:
        name, _, items = spec.partition(":")
        items = items.split()
        instances = [int(i.split("=")[1]) for i in items if i.startswith("instances=")]
        args = fusion_parser().parse_args(["--out", str(Path(a.out) / name.strip()), "--reuse",
                                           "--per-prompt", str(a.n), "--instances", str((instances or [12])[0])]
                                          + [f"--style-set={i}" for i in items if not i.startswith("instances=")])
        t0 = time.time()
        f = train_concept(s, "locon", {"algorithm": "locon", "rank": 8}, Path(args.out), args)
        rates = judge_rates(model, judge, [f], [1.0], prompts, args)
        rows.append((name.strip(), " ".join(items), [sum(v.style == s for v in rates[q]) / a.n for q in prompts]))
        print(f"{rows[-1]} ({time.time() - t0:.0f}s)", flush=True)
    print(f"\n{a.n} samples per prompt; share of samples in the {s} style (the last column is the prior: lower is "
          "better).\n\n| variant | overrides | " + " | ".join(prompts) + " |\n|---|---|" + "---|" * len(prompts))
    for name, items, r in rows:
        print(f"| {name} | {items or '-'} | " + " | ".join(f"{x:.0%}" for x in r) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
