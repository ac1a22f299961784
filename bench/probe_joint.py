"""Where does joint-prompt success get lost? (bench/RESULTS.md, fusion, two concepts)

    PYTHONPATH=. python bench/probe_joint.py --out outputs/bf2c --object sks --style qtz

Reads the adapters ``<out>/runs/locon-{object,style}`` and the fused files ``<out>/fused/locon-*.safetensors`` and
judges ``-n`` samples of prompts that move from the style's own captions towards the joint prompt
("a star in qtz style" → "a red star …" → "a photo star …" (a word no caption uses) → "a sks star …"), under each
adapter alone, under the fused files, and under the sum with the text-encoder (``lora_te*``) layers of one or both inputs
left out. Prints, per case and prompt, the share of samples that show the style and the object.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.bench_fusion import judge_rates
from bench.bench_fusion import parser as fusion_parser
from sdtune import judge as J
from sdtune import toyworld as tw
from sdtune.models import load


def without_text_encoder(src: Path, dst: Path) -> Path:
    """A copy of a kohya file with its text-encoder layers left out."""
    from safetensors.torch import save_file
    save_file({k: v for k, v in load_file(str(src)).items() if not k.startswith("lora_te")}, str(dst))
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/bf2c")
    p.add_argument("--object", default="sks")
    p.add_argument("--style", default="qtz")
    p.add_argument("--model", default=None, help="base model the adapters were trained on (default: embedded)")
    p.add_argument("-n", type=int, default=16, help="samples per prompt")
    a = p.parse_args()
    out, model, judge = Path(a.out), load(a.model), J.load()
    o, s, shape = a.object, a.style, tw.OBJECTS[a.object]
    obj_file, sty_file = (out / "runs" / f"locon-{t}" / "adapter.safetensors" for t in (o, s))
    probe = out / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    obj_no_te = without_text_encoder(obj_file, probe / f"{o}-no-te.safetensors")
    sty_no_te = without_text_encoder(sty_file, probe / f"{s}-no-te.safetensors")
    prompts = [f"a circle in {s} style", f"a {shape} in {s} style", f"a red {shape} in {s} style",
               f"a photo {shape} in {s} style", f"a {o} {shape} in {s} style", f"a {o} {shape}"]
    cases = {f"{o} alone": [obj_file], f"{s} alone": [sty_file], "sum": [obj_file, sty_file],
             f"sum, {o} without TE": [obj_no_te, sty_file], f"sum, {s} without TE": [obj_file, sty_no_te],
             "sum, no TE": [obj_no_te, sty_no_te]}
    cases |= {f"fused {f.stem.removeprefix('locon-')}": [f] for f in sorted((out / "fused").glob("locon-*.safetensors"))}
    settings = fusion_parser().parse_args(["--per-prompt", str(a.n)])
    print("case | " + " | ".join(prompts) + "   (style %, object %)")
    for label, files in cases.items():
        rates = judge_rates(model, judge, files, [1.0] * len(files), prompts, settings)
        cells = [f"{sum(x.style == s for x in rates[q]) / a.n:.0%}/{sum(x.object == o for x in rates[q]) / a.n:.0%}"
                 for q in prompts]
        print(f"{label} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
