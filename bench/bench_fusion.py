"""Issues 6 and 22: fusing separately trained concepts on the embedded model, judged by the toy-world judge.

    # four concepts at rank × concepts = 12.5 % of every adapted layer's input width (bench/RESULTS.md)
    python bench/bench_fusion.py --concepts sks,ohwx,qtz,bnp --ranks width:1 --alpha-ratio 2 --per-prompt 64 \
        --families locon,ortho-locon --methods sum,orthogonal,regmean,zip --out outputs/bf4w
    # two of them (6.25 %), reusing the adapters and the judged samples
    python bench/bench_fusion.py --concepts sks,qtz --ranks width:1 --alpha-ratio 2 --per-prompt 64 --reuse \
        --families locon,ortho-locon --methods sum,orthogonal,regmean,zip,composed --out outputs/bf4w
    # eight, two of them colour objects (25 %), without object+style prompts
    python bench/bench_fusion.py --concepts sks,ohwx,zwx,vfx,kfz,xjy,qtz,bnp --ranks width:1 --alpha-ratio 2 \
        --per-prompt 64 --no-ceilings --no-joint --families locon --methods sum,orthogonal,zip,composed --out outputs/bf8
    python bench/bench_fusion.py --smoke --out /tmp/bf        # ~2 min: checks the plumbing only

For each *family* of adapters every concept is trained alone (``sdtune.train.loop.train``) on 12 (``--instances``)
toy-world instance images with the demo's first recipe (attn + resnet + text encoder, lr 3e-3 / 1e-3, 600 steps,
batch 4; a style's class prompts are its own captions without the style, cycled, or ``--style-prior shapes``): ``locon``
(free LoCon r8: fused with sum / orthogonal / orthogonal-sequential / regmean / zip; zip is fitted on each concept's
training captions; plus ``composed``, no fused file: ``sdtune.compose`` samples each concept's phrase, bracketed by
``marked_prompt``, under its own adapter, and prompts without a concept under the base model), ``spectral-slots``
(rotational Spectral r8 at 3× the lr, concept k in slot k: fused with sum), ``ortho-locon`` (LoCon r8 with a
frozen down-projection from one shared orthogonal basis, concept k takes block k: fused with sum) and ``ortho-random``
(the same basis, each concept's rows drawn at random with its own seed: Orthogonal Adaptation without agreed blocks).
``--ranks width:K`` gives every U-Net block K ranks per 32 input channels (the text encoder likewise), so that
rank × concepts / input width, printed for every run, stays at one ratio (issue 22: SD's narrowest adapted layers are
320 wide, the embedded model's 32). Then, with
``--per-prompt`` samples per prompt (≥ 32 for the report), the judge reads:
  solo fidelity     concept present on its own prompt ("a sks star", "a circle in qtz style"): fused / solo adapter
  joint success     both present on an object+style prompt ("a sks star in qtz style"), fused adapter
  prior             class prompts without tokens ("a star", "a red circle"): shape right and no concept leaking,
                    fused / base model
  interference      ‖W_fused·x − W_i·x‖/‖ΔW_i·x‖ on x captured from concept i's prompt in the base model
                    (held out: a second capture, seed 1; regmean is fitted on the first, seed 0)
Writes ``<out>/RESULTS.md`` (a markdown table) and prints it.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import torch

from sdtune import compose, fusion
from sdtune.apply import load as load_file
from sdtune.fusion import ZipOptions
from sdtune.models import load
from sdtune.sample import SampleRequest
from sdtune.toy import judge as J
from sdtune.toy import world as tw


def marked_prompt(prompt: str, tokens: list[str]) -> str:
    """Each concept's phrase bracketed for ``sdtune.compose``: "a sks star in qtz style" -> "a [1:sks] star
    [2:in qtz style]"."""
    for k, t in enumerate(tokens, 1):
        phrase = t if t in tw.OBJECT_CLASSES else f"in {t} style"
        prompt = prompt.replace(phrase, f"[{k}:{phrase}]")
    return prompt


def joint_pairs(tokens: list[str]) -> list[tuple[str, str]]:
    """Object × style pairs: the toy world draws one shape per image, so two objects cannot share a scene."""
    return [(o, s) for o in tokens if o in tw.OBJECT_CLASSES for s in tokens if s in tw.STYLES]


def instance_captions(out: Path, token: str) -> list[str]:
    """The distinct captions of a concept's instance images (its training prompts)."""
    return sorted({c.read_text().strip() for c in (out / "instances" / token).glob("*.txt")})


def name_subjects(folder: Path, token: str, share: float, seed: int = 0) -> int:
    """Issue 22's style-after-object recipe: rewrite a ``share`` of a style's instance captions so that an invented
    name stands before the subject's noun, as an object's token does in "a sks star in qtz style": "a red circle in
    qtz style" -> "a dwm circle in qtz style". The names are new to the base (the tokenizer spells them in untrained
    pieces, as the object tokens are untrained words) and say nothing about the picture, so the style learns to hold
    after a name it has never seen. -> the number of captions rewritten."""
    import random

    rng = random.Random(f"names:{token}:{seed}")
    files = sorted(folder.glob("*.txt"))
    chosen = rng.sample(files, round(share * len(files)))
    taken = set(tw.RARE_TOKENS) | set(tw.COLOUR_OBJECTS)
    for f in chosen:
        name = ""
        while not name or name in taken:
            name = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(3))
        shape = next(s for s in tw.SHAPES if f" {s} in {token} style" in f.read_text())
        f.write_text(f"a {name} {shape} in {token} style\n")   # names start with a consonant
    return len(chosen)


def width_ranks(model, per_32: int) -> dict[str, dict[str, int]]:
    """preset -> {U-Net block: rank ∝ the block's input width}: ``per_32`` per 32 channels, so rank × concepts over
    every adapted layer's input width stays one ratio (issue 22) rather than crowding the narrow blocks. A ResNet
    block's narrowest input is the one entering it (the shortcut of ``down_blocks.i`` reads ``down_blocks.{i-1}``'s
    width); an attention block reads its own."""
    widths = list(model.pipeline.unet.config.block_out_channels)
    up = widths[::-1]
    rank = lambda w: max(1, per_32 * w // 32)
    attn = {f"down_blocks.{i}": rank(w) for i, w in enumerate(widths)} | {"mid_block": rank(widths[-1])} \
        | {f"up_blocks.{i}": rank(w) for i, w in enumerate(up)}
    resnet = dict(attn) | {f"down_blocks.{i}": rank(widths[max(i - 1, 0)]) for i in range(len(widths))}
    return {"attn": attn, "resnet": resnet}


def adapter_rules(rule: dict, a, model) -> list[dict]:
    """A concept's ``[[adapters]]`` rules: attn + resnet at ``rule``'s rank (``--ranks N``), or per block by width
    (``--ranks width:K``: ``width_ranks``), plus the text encoder, by its hidden width likewise."""
    if a.alpha_ratio:   # scale = alpha / rank
        rule = dict(rule, alpha_ratio=a.alpha_ratio)
    if not a.ranks.startswith("width:"):
        return [with_alpha(dict(rule, preset=p, rank=int(a.ranks)))
                for p in ("attn", "resnet", "te") if a.text_encoder or p != "te"]
    per_32 = int(a.ranks.split(":")[1])
    rules = []
    for preset, by_block in width_ranks(model, per_32).items():
        for r in sorted(set(by_block.values())):
            rules.append(dict(rule, preset=preset, rank=r, blocks=[b for b, v in by_block.items() if v == r]))
    te_width = model.pipeline.text_encoder.config.hidden_size
    rules.append(dict(rule, preset="te", rank=max(1, per_32 * te_width // 32)))
    return [with_alpha(r) for r in rules if a.text_encoder or r["preset"] != "te"]


def with_alpha(rule: dict) -> dict:
    """``alpha_ratio`` k -> alpha = k·rank (scale k on every layer, whatever its rank)."""
    k = rule.pop("alpha_ratio", None)
    return rule if k is None else dict(rule, alpha=k * rule["rank"])


def ratio(files: list[Path]) -> tuple[float, str, float]:
    """(max, its layer, median) over the adapted layers of rank × concepts / input width, the input width being
    the down factor's row length (in·kh·kw): the share of a layer's input space the concepts' row spaces take."""
    from safetensors import safe_open

    per_layer: dict[str, float] = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.endswith(".lora_down.weight"):
                    shape = h.get_slice(k).get_shape()
                    name = k[: -len(".lora_down.weight")]
                    per_layer[name] = per_layer.get(name, 0.0) + shape[0] / math.prod(shape[1:])
    worst = max(per_layer, key=per_layer.get)
    values = sorted(per_layer.values())
    return per_layer[worst], worst, values[len(values) // 2]


def train_concept(token: str, family: str, rule: dict, out: Path, a, model) -> Path:
    from sdtune.config import apply_override, from_dict
    from sdtune.train.loop import train

    rule = dict(rule)
    lr_scale = rule.pop("lr_scale", 1.0)
    run = out / "runs" / f"{family}-{token}"
    if a.reuse and (run / "adapter.safetensors").is_file():
        return run / "adapter.safetensors"
    inst = out / "instances" / token
    if not inst.exists():
        tw.write_instance_folder(token, inst, n=a.instances)
        if token in tw.STYLES and a.style_names:
            name_subjects(inst, token, a.style_names)
    if token in tw.OBJECT_CLASSES:
        cls = tw.concept_class_word(token)
        class_prompt, class_dir = f"a {cls}", out / "class_images" / cls
    elif a.style_prior == "captions":
        # a style's prior is its own captions without the style: "a red circle in qtz style" -> "a red circle"
        class_prompt = " | ".join(c.replace(f" in {token} style", "") for c in instance_captions(out, token))
        class_dir = out / "class_images" / f"unstyled-{token}"
    else:   # "shapes": the first recipe, measured to leak the style into every "a red circle"
        class_prompt, class_dir = " | ".join(f"a {s}" for s in tw.SHAPES), out / "class_images" / "shapes"
    d = {
        "model": {"path": a.model} if a.model else {},
        "data": {"instance_dir": str(inst)},
        "prior": {"enabled": True, "class_prompt": class_prompt, "class_dir": str(class_dir),
                  "num_class_images": a.class_images, "sample_steps": a.sample_steps},
        "adapters": adapter_rules(rule, a, model),
        "optim": {"lr_unet": a.lr * lr_scale, "lr_text": a.lr * lr_scale / 3},
        "schedule": {"scheduler": "cosine", "warmup_steps": min(20, a.train_steps // 10)},
        "train": {"steps": a.train_steps, "batch_size": a.batch, "seed": a.train_seed, "min_snr_gamma": 5.0,
                  "train_text_encoder": a.text_encoder},
        "output": {"dir": str(run), "export_dtype": "fp32"},
    }
    for item in a.style_set if token in tw.STYLES else a.object_set:
        apply_override(d, item)
    return train(from_dict(d), progress=False).kohya


def families(tokens: list[str]) -> dict[str, tuple[list[dict], list[tuple[str, dict]]]]:
    """family -> (per-concept adapter rule, [(method label, {"method": name, **its options})])."""
    plain = [("sum", {"method": "sum"})]
    return {
        "locon": ([{"algorithm": "locon", "rank": 8} for _ in tokens],
                  plain + [("orthogonal", {"method": "orthogonal"}),
                           ("orthogonal-seq-both", {"method": "orthogonal", "mode": "sequential", "sides": "both"}),
                           ("regmean", {"method": "regmean"}), ("zip", {"method": "zip"}),
                           ("composed", {"method": "composed"})]),
        # rotational: ΔW_k = U_k M_k V_kᵀ on disjoint singular blocks, so the parts are exactly orthogonal; it has
        # only r(r−1) parameters per layer, hence rank 8 (rank 4: 6 %/0 % solo fidelity) and 3× the lr
        "spectral-slots": ([{"algorithm": "spectral", "rank": 8, "spectral_mode": "rotational", "slot": k,
                             "lr_scale": 3.0} for k in range(len(tokens))], plain),
        "ortho-locon": ([{"algorithm": "locon", "rank": 8, "ortho_basis_seed": 0, "ortho_index": k}
                         for k in range(len(tokens))], plain),
        # the paper's uncoordinated form: each concept draws its rows from the shared basis with its own seed
        "ortho-random": ([{"algorithm": "locon", "rank": 8, "ortho_basis_seed": 0, "ortho_pick": "random",
                           "ortho_index": 1000 + k} for k in range(len(tokens))], plain),
    }


def judge_rates(model, judge, files: list[Path], weights: list[float], prompts: list[str], a, *,
                composed: bool = False) -> dict[str, list]:
    """prompt -> verdicts of ``--per-prompt`` samples with ``files`` applied (none: the base model); ``composed``:
    bracketed prompts are sampled with each file on its own phrase (``sdtune.compose``). Each prompt's verdicts are
    kept in ``<out>/verdicts/`` under a key of everything that decides its samples (the files' bytes included), so
    a run on a subset of concepts (``--reuse``) does not sample again what an earlier run judged."""
    import hashlib
    import json

    def key(prompt: str) -> str:
        h = hashlib.sha256(json.dumps([prompt, weights, composed, a.seed, a.per_prompt, a.sample_steps, a.guidance,
                                       a.model]).encode())
        for f in files:
            h.update(Path(f).read_bytes())
        return h.hexdigest()[:24]

    store = Path(a.out) / "verdicts"
    got, todo = {}, []
    for q in prompts:
        path = store / f"{key(q)}.json"
        if path.is_file():
            got[q] = [J.Verdict(**v) for v in json.loads(path.read_text())]
        else:
            todo.append(q)
    if todo:
        request = SampleRequest(todo, seed=a.seed, steps=a.sample_steps, guidance=a.guidance, count=a.per_prompt,
                                adapters=[(str(f), w) for f, w in zip(files, weights)])
        samples = compose.run(model, request, composed=composed, progress=False)
        verdicts = J.judge(judge, [s.image for s in samples])
        store.mkdir(parents=True, exist_ok=True)
        for i, q in enumerate(todo):
            got[q] = verdicts[i * a.per_prompt:(i + 1) * a.per_prompt]
            (store / f"{key(q)}.json").write_text(json.dumps([vars(v) for v in got[q]]))
    return {q: got[q] for q in prompts}


def rate(vs: list, ok) -> float:
    return sum(map(ok, vs)) / len(vs)


def prior_ok(vs: list, prompt: str) -> float:
    """Share of a class prompt's samples showing its shape with no concept (object, colour object or style) leaking
    in. A colour object's colour counts as a leak on its class prompt: the base draws it too (its colours are uniform:
    about one "a hexagon" in eight is purple), which the ratio to the base takes out."""
    return rate(vs, lambda v: v.shape in prompt and v.object is None and v.style is None
                and not any(J.shows(v, t) for t in tw.COLOUR_OBJECTS))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", default="sks,qtz")
    p.add_argument("--out", default="outputs/bench_fusion")
    p.add_argument("--model", default=None)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--train-seed", type=int, default=0, help="training seed of every concept (a second, independent run)")
    p.add_argument("--no-text-encoder", dest="text_encoder", action="store_false",
                   help="adapters on the U-Net only (the text encoder frozen): no concept changes how the others' "
                        "prompts are encoded")
    p.add_argument("--alpha-ratio", type=float, default=None,
                   help="alpha = this × rank on every layer (scale alpha/rank); unset: alpha = rank (scale 1)")
    p.add_argument("--ranks", default="8", help="N: rank N on every adapted layer; width:K: K per 32 input channels, "
                                                 "per U-Net block (the ratio rank × concepts / width held even)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="U-Net lr; the text encoder's is a third (the demo recipe)")
    p.add_argument("--class-images", type=int, default=48)
    p.add_argument("--instances", type=int, default=12, help="instance images per concept")
    p.add_argument("--style-prior", choices=("captions", "shapes"), default="captions",
                   help="a style's class prompts: its captions without the style, or every bare shape")
    p.add_argument("--style-names", type=float, default=0.0, metavar="SHARE",
                   help="name the subject in this share of a style's instance captions with an invented word ('a dwm "
                        "circle in qtz style'): the style-after-object recipe (issue 22); give its own --out")
    p.add_argument("--style-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a training-config override for the style concepts only (repeatable)")
    p.add_argument("--object-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a training-config override for the object concepts only (repeatable)")
    p.add_argument("--per-prompt", type=int, default=32)
    p.add_argument("--seed", type=int, default=7000, help="sample k of a prompt uses seed SEED + k")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--columns", type=int, default=256, help="activation columns per layer and concept")
    p.add_argument("--families", default=None, help="comma-separated subset of locon,spectral-slots,ortho-locon,ortho-random")
    p.add_argument("--methods", default=None, help="comma-separated subset of the fusion labels (e.g. sum,zip)")
    p.add_argument("--reuse", action="store_true", help="reuse adapters already trained in --out")
    p.add_argument("--no-joint", dest="joint", action="store_false",
                   help="skip the object+style prompts (eight concepts: 12 of 27 prompts)")
    p.add_argument("--no-ceilings", action="store_true",
                   help="judge each adapter alone on its own prompt only (not on the joint and class prompts)")
    p.add_argument("--zip-steps", type=int, default=100, help="zip: merger-fitting steps")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the plumbing, measures nothing")
    return p


def main() -> None:
    a = parser().parse_args()
    if a.smoke:
        a.train_steps, a.batch, a.class_images, a.per_prompt, a.sample_steps, a.columns, a.zip_steps = 2, 1, 2, 2, 2, 16, 2
    tokens = a.concepts.split(",")
    out = Path(a.out)
    torch.manual_seed(0)
    model, judge = load(a.model), J.load()
    fams = families(tokens)
    if a.families:
        fams = {k: v for k, v in fams.items() if k in a.families.split(",")}
    solo_prompts = [tw.concept_prompt(t) for t in tokens]
    joint = joint_pairs(tokens) if a.joint else []
    joint_prompts = [tw.concept_prompt(o, style=s) for o, s in joint]
    class_prompts = sorted({f"a {tw.OBJECT_CLASSES[t]}" for t in tokens if t in tw.OBJECT_CLASSES} | {"a red circle"})
    base = judge_rates(model, judge, [], [], class_prompts, a)
    base_prior = {q: prior_ok(vs, q) for q, vs in base.items()}
    rows, solo_priors, solo_joint, ratios = [], [], [], []
    for fam, (rules, methods) in fams.items():
        t0 = time.time()
        files = [train_concept(t, fam, r, out, a, model) for t, r in zip(tokens, rules)]
        print(f"{fam}: trained {len(files)} concepts in {time.time() - t0:.0f}s", flush=True)
        ratios.append((fam, *ratio(files)))
        ceilings = [] if a.no_ceilings else joint_prompts + class_prompts
        alone = [judge_rates(model, judge, [f], [1.0], [q] + ceilings, a) for f, q in zip(files, solo_prompts)]
        solo = [rate(v[q], lambda v, t=t: J.shows(v, t)) for v, q, t in zip(alone, solo_prompts, tokens)]
        if ceilings:
            solo_priors.append((fam, [[prior_ok(v[q], q) / max(base_prior[q], 1e-9) for q in class_prompts]
                                      for v in alone]))
            # what each adapter alone renders of its own concept on the joint prompts: the ceiling of joint success
            solo_joint.append((fam, [[rate(v[q], lambda x, t=t: J.shows(x, t)) for q in joint_prompts]
                                     for v, t in zip(alone, tokens)]))
        inputs = [load_file(f, model.components(), model.arch) for f in files]
        names = sorted({n for i in inputs for n in i.layers})
        # regmean is fitted on one capture (seed 0) and every method is measured on another (seed 1)
        fit = [fusion.capture_activations(model, [q], names, columns=a.columns, seed=0) for q in solo_prompts]
        held = [fusion.capture_activations(model, [q], names, columns=a.columns, seed=1) for q in solo_prompts]
        for label, kwargs in methods:
            if a.methods and label not in a.methods.split(","):
                continue
            merger = None
            if kwargs["method"] == "zip":   # fitted on each concept's training captions
                captions = [instance_captions(out, t) for t in tokens]
                t0 = time.time()
                options = ZipOptions(steps=a.zip_steps, sample_steps=a.sample_steps)
                merger = fusion.zip_merger(model, inputs, captions, options=options, progress=False)[0]
                print(f"{fam}: {label} merger learned in {time.time() - t0:.0f}s", flush=True)
            if kwargs["method"] == "composed":   # no fused file: each adapter on its own phrase while sampling
                marked = {q: marked_prompt(q, tokens) for q in solo_prompts + joint_prompts}
                got = judge_rates(model, judge, files, [1.0] * len(files),
                                  solo_prompts + list(marked.values()) + class_prompts, a, composed=True)
                verdicts, inter = {q: got[marked.get(q, q)] for q in solo_prompts + joint_prompts + class_prompts}, []
            else:
                res = fusion.fuse(inputs, fusion.method_options(**kwargs), activations=fit, merger=merger)
                fusion.remeasure(res, inputs, held)
                fused = out / "fused" / f"{fam}-{label}.safetensors"
                fusion.save_fused(res, fused, dtype=torch.float32)
                verdicts = judge_rates(model, judge, [fused], [1.0], solo_prompts + joint_prompts + class_prompts, a)
                inter = res.total_interference()
            kept = [rate(verdicts[q], lambda v, t=t: J.shows(v, t)) / s if s > 0 else float("nan")
                    for q, t, s in zip(solo_prompts, tokens, solo)]
            joint_ok = [rate(verdicts[q], lambda v, o=o, s=s: J.shows(v, o) and v.style == s)
                        for q, (o, s) in zip(joint_prompts, joint)]
            prior = [prior_ok(verdicts[q], q) / max(base_prior[q], 1e-9) for q in class_prompts]
            for q in joint_prompts + class_prompts:   # what the failures look like
                seen = Counter(f"{v.shape}/{v.object or '-'}/{v.style or '-'}" for v in verdicts[q])
                print(f"  {fam}-{label} {q!r}: " + ", ".join(f"{k} {n}" for k, n in seen.most_common(4)), flush=True)
            rows.append((fam, label, solo, kept, joint_ok, prior, inter))
            print(rows[-1], flush=True)
    lines = [f"Concepts {', '.join(tokens)}; ranks {a.ranks}, scale {a.alpha_ratio or 1:g}"
             f"{'' if a.text_encoder else ', U-Net only'}"
             f"{f'; the styles name their subject in {a.style_names:.0%} of captions' if a.style_names else ''}; "
             f"{a.train_steps} training steps each, training seed "
             f"{a.train_seed}; {a.per_prompt} samples per prompt from seed {a.seed}; {a.sample_steps} sampler steps, "
             f"guidance {a.guidance}.", "",
             "Rank × concepts / input width over the adapted layers: " + "; ".join(
                 f"{fam} max {mx:.1%} ({layer}), median {med:.1%}" for fam, mx, layer, med in ratios) + ".", "",
             "| family | fusion | solo fidelity (adapter alone) | solo fidelity kept after fusion | joint success | "
             "prior kept (vs base) | interference (activations) |", "|---|---|---|---|---|---|---|"]
    fmt = lambda xs, pct=True: ", ".join(f"{x:.0%}" if pct else f"{x:.3f}" for x in xs) if xs else "-"
    for fam, label, solo, kept, joint_ok, prior, inter in rows:
        lines.append(f"| {fam} | {label} | {fmt(solo)} | {fmt(kept)} (min {min(kept):.0%}) | {fmt(joint_ok)} | "
                     f"{fmt(prior)} | {fmt([x for x in inter if x is not None], False)} |")
    if solo_priors:
        lines += ["", "Prior kept (vs base) under each adapter alone, per class prompt: " + "; ".join(
            f"{fam} {t}: {fmt(ps)}" for fam, per in solo_priors for t, ps in zip(tokens, per)) + "."]
        lines += ["", "Own concept present on the joint prompts under each adapter alone: " + "; ".join(
            f"{fam} {t}: {fmt(js)}" for fam, per in solo_joint for t, js in zip(tokens, per)) + "."]
    lines.append("")
    lines.append("Per concept in the order given; joint prompts: " + ", ".join(joint_prompts or ["none"]) +
                 "; class prompts: " + ", ".join(class_prompts) + ".")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
