"""Concept fidelity and prior preservation of a trained DreamBooth adapter, judged on the toy world.

    python bench/bench_demo.py outputs/demo/adapter.safetensors --token sks [--n 128] [--seed 7000]
    python bench/bench_demo.py outputs/demo-sdxl/adapter.safetensors --model assets/tiny-sdxl   # the SDXL demo
    python bench/bench_demo.py outputs/demo/adapter-step-*.safetensors     # one row per file (output.save_every)

Samples ``n`` images of "a <token> <class>" and of the class prompt "a <class>", with the base model and with
the adapter applied, and reports: concept fidelity (the judge sees the concept), and prior preservation (the
class prompt still renders its class, as a fraction of the base model's rate). Base and adapter are sampled on the same
seeds. Take n ≥ 128: the base's own "a star" rate is about 92 % (384 samples) and one draw of 32 gives anything from
28 to 32 of 32, so at n = 32 the prior bar (95 % of the base) is inside the sampling noise (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse

from sdtune.models import load
from sdtune.sample import SampleRequest, generate
from sdtune.toy import judge as J
from sdtune.toy import world as tw


def rates(model, judge, prompt: str, n: int, adapters, token: str, cls: str, seed: int = 500) -> tuple[float, float]:
    samples = generate(model, SampleRequest([prompt], seed=seed, steps=20, guidance=5.0, count=n, adapters=adapters),
                       progress=False)
    v = J.judge(judge, [s.image for s in samples])
    is_concept = [J.shows(x, token) for x in v]
    is_class = [x.shape == cls for x in v] if token in tw.OBJECT_CLASSES else [x.style is None for x in v]
    return sum(is_concept) / n, sum(is_class) / n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="one or more adapter files, e.g. a run's adapter-step-*.safetensors (output.save_every)")
    p.add_argument("--token", default="sks")
    p.add_argument("--n", type=int, default=128, help="samples per prompt (fewer than 128: the prior is noise)")
    p.add_argument("--seed", type=int, default=500, help="first sampling seed (each sample takes the next one)")
    p.add_argument("--model", default=None, help="the base the adapter was trained on (default: the embedded SD1 base)")
    a = p.parse_args()
    model, judge = load(a.model), J.load()
    cls = tw.concept_class_word(a.token)
    concept_prompt = tw.concept_prompt(a.token)
    class_prompt = f"a {cls}" if a.token in tw.OBJECT_CLASSES else f"a {tw.SHAPES[0]}"
    base_fid, _ = rates(model, judge, concept_prompt, a.n, [], a.token, cls, a.seed)
    _, base_prior = rates(model, judge, class_prompt, a.n, [], a.token, cls, a.seed)
    print(f"| adapter | \"{concept_prompt}\": concept fidelity (base {base_fid:.1%}) | \"{class_prompt}\" judged "
          f"a {cls} (base {base_prior:.1%}) | \"{class_prompt}\": concept leaks in |")
    print("|---|---|---|---|")
    for adapter in a.adapters:
        fid, _ = rates(model, judge, concept_prompt, a.n, [(adapter, 1.0)], a.token, cls, a.seed)
        leak, prior = rates(model, judge, class_prompt, a.n, [(adapter, 1.0)], a.token, cls, a.seed)
        print(f"| {adapter} | {fid:.1%} | {prior:.1%} ({prior / max(base_prior, 1e-9):.0%} of base) | {leak:.1%} |",
              flush=True)


if __name__ == "__main__":
    main()
