"""Composed sampling (sdtune/compose.py): prompt parsing, the composed prediction against a reference built from
``apply_file``, identities with plain sampling, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_adapters import write_adapter
from PIL import Image

from sdtune import compose
from sdtune.adapters import AdapterSpec
from sdtune.sample import SampleRequest, generate


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Two random adapters of the embedded model: attention + text encoder, and attention + resnet. (Seeded: the
    factors' init draws from the global generator. Much stronger random updates make the model ill-conditioned, where
    float rounding alone moves ε̂ by 0.4 %.)"""
    d = tmp_path_factory.mktemp("compose")
    comps = tiny_model.components()
    torch.manual_seed(0)
    write_adapter(comps, d / "a.safetensors", [("attn", AdapterSpec("locon", rank=2)),
                                               ("te", AdapterSpec("locon", rank=2))], 60, size=0.3)
    write_adapter(comps, d / "b.safetensors", [("attn", AdapterSpec("locon", rank=2)),
                                               ("resnet", AdapterSpec("locon", rank=2))], 61, size=0.3)
    return d / "a.safetensors", d / "b.safetensors"


def pixels(samples) -> np.ndarray:
    return np.stack([np.asarray(s.image, dtype=np.int16) for s in samples])


def same_images(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding (forward hooks vs merged weights) and the uint8 step."""
    d = np.abs(a - b)
    return d.mean() < 0.05 and d.max() <= 2


def test_parse_marks_each_concepts_phrase():
    cp = compose.parse("a [sks] star  [in qtz style]", 2)
    assert cp == compose.ComposedPrompt("a sks star in qtz style", "a star",
                                        ((0, "a sks star"), (1, "a star in qtz style")))
    assert compose.parse("[3:in bnp style] a [1:sks] star", 4).views == ((2, "in bnp style a star"),
                                                                         (0, "a sks star"))
    assert compose.is_composed("a [sks] star") and not compose.is_composed("a sks star")
    for bad, why in (("a sks star", "mark each concept"), ("a [1:sks] star [1:in qtz style]", "different adapter"),
                     ("a [sks] star [3:in qtz style]", "among 1..2"), ("a [0:sks] star", "among 1..2")):
        with pytest.raises(compose.ComposeError, match=why):
            compose.parse(bad, 2)


def test_one_marked_concept_is_plain_sampling_with_its_adapter(tiny_model, adapters):
    """"a [sks] star" with one adapter: c = ε̂_1("a sks star") and u = ε̂_1(""), so the composed sampler (forward
    hooks, its own loop) must draw the images the pipeline draws with the adapter merged into the weights."""
    a, _ = adapters
    request = SampleRequest(["a [sks] star"], seed=3, steps=4, count=2, adapters=[(str(a), 0.8)])
    composed = pixels(compose.generate(tiny_model, request, progress=False))
    plain = pixels(generate(tiny_model, SampleRequest(["a sks star"], seed=3, steps=4, count=2,
                                                      adapters=[(str(a), 0.8)]), progress=False))
    base = pixels(generate(tiny_model, SampleRequest(["a sks star"], seed=3, steps=4, count=2), progress=False))
    assert np.abs(plain - base).mean() > 5                      # the adapter matters ...
    assert same_images(composed, plain)                         # ... and both paths agree up to rounding


def test_one_marked_concept_is_plain_sampling_on_sdxl(tiny_sdxl, tmp_path):
    """The same identity on an SDXL-layout model (random weights): two text encoders, the pooled embedding and the
    micro-conditioning go through ``data.denoise`` and must match the SDXL pipeline's. (A milder update than on the
    embedded model: this untrained U-Net amplifies hook-vs-merge rounding, 2.6e-5 of ε̂ at size 0.3.)"""
    torch.manual_seed(0)
    write_adapter(tiny_sdxl.components(), tmp_path / "xl.safetensors", [("attn", AdapterSpec("locon", rank=2)),
                  ("te", AdapterSpec("locon", rank=2))], 62, size=0.1, arch="sdxl")
    adapter = [(str(tmp_path / "xl.safetensors"), 1.0)]
    for negative in ("", "a circle"):
        kw = dict(negative_prompt=negative, seed=5, steps=3, count=2, size=64, adapters=adapter)
        composed = pixels(compose.generate(tiny_sdxl, SampleRequest(["a [sks] star"], **kw), progress=False))
        plain = pixels(generate(tiny_sdxl, SampleRequest(["a sks star"], **kw), progress=False))
        base = pixels(generate(tiny_sdxl, SampleRequest(["a sks star"], **{**kw, "adapters": []}), progress=False))
        assert np.abs(plain - base).mean() > 2, negative
        assert same_images(composed, plain), negative


def test_composed_prediction_matches_its_formula(tiny_model, adapters):
    """One sampler step from the same noise: the composed image equals the one drawn from u + g(c − u) with
    c = Σ_k ε̂_k(view_k) − (K−1) ε̂_0(neutral) and u = Σ_k ε̂_k("") − (K−1) ε̂_0(""), each ε̂_k computed with
    adapter k merged by ``apply_file``; the model is left as it was."""
    from sdtune.apply import apply_file
    from sdtune.data.dataset import Encoder, denoise

    a, b = adapters
    pipe, comps = tiny_model.pipeline, tiny_model.components()
    before = {n: p.clone() for c in comps.values() for n, p in c.named_parameters()}
    request = SampleRequest(["a [sks] star [in qtz style]"], seed=5, steps=1, guidance=4.0, count=2,
                            adapters=[(str(a), 1.0), (str(b), 0.7)])
    composed = pixels(compose.generate(tiny_model, request, progress=False))
    assert all(torch.equal(p, before[n]) for c in comps.values() for n, p in c.named_parameters())
    assert not any(m._forward_hooks for c in comps.values() for m in c.modules())

    encoder = Encoder(tiny_model, cache_latents=False, cache_text=False, device="cpu")
    sched = pipe.scheduler
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    z = z * sched.init_noise_sigma
    x = sched.scale_model_input(z, t)

    @torch.no_grad()
    def eps(adapter, text):
        handles = [apply_file(comps, tiny_model.arch, *adapter)] if adapter else []
        try:
            return denoise(tiny_model, x, t.expand(2), *encoder.text([text] * 2))
        finally:
            for h in handles:
                h.remove()

    u = eps((a, 1.0), "") + eps((b, 0.7), "") - eps(None, "")
    cond = eps((a, 1.0), "a sks star") + eps((b, 0.7), "a star in qtz style") - eps(None, "a star")
    with torch.no_grad():
        z1 = sched.step(u + 4.0 * (cond - u), t, z).prev_sample
        image = pipe.vae.decode(z1 / pipe.vae.config.scaling_factor).sample
    reference = np.stack([np.asarray(im, dtype=np.int16)
                          for im in pipe.image_processor.postprocess(image, output_type="pil")])
    assert same_images(composed, reference)
    # and the composition is not the plain sum of both adapters
    summed = pixels(generate(tiny_model, SampleRequest(["a sks star in qtz style"], seed=5, steps=1, guidance=4.0,
                                                       count=2, adapters=request.adapters), progress=False))
    assert np.abs(composed - summed).mean() > 2


def test_unmarked_prompts_are_the_base_models(tiny_model, adapters):
    """Adapters act only on their phrases: a prompt without brackets gets none of them."""
    a, b = adapters
    request = SampleRequest(["a red circle", "a [sks] star [in qtz style]"], seed=1, steps=2, count=1,
                            adapters=[(str(a), 1.0), (str(b), 1.0)])
    out = compose.generate(tiny_model, request, progress=False)
    assert [s.prompt for s in out] == request.prompts
    base = generate(tiny_model, SampleRequest(["a red circle"], seed=1, steps=2, count=1), progress=False)
    assert np.array_equal(pixels(out[:1]), pixels(base))
    with pytest.raises(compose.ComposeError, match="needs the adapters"):
        compose.generate(tiny_model, SampleRequest(["a [sks] star"]), progress=False)


def test_cli_sample_compose(adapters, tmp_path, capsys):
    from sdtune.cli import main

    a, b = adapters
    args = ["sample", "a [sks] star [in qtz style]", "--adapter", str(a), "--adapter", f"{b}:0.5", "--compose",
            "-n", "2", "--steps", "2", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out and (tmp_path / "out" / "grid.png").is_file()
    png = Image.open(next((tmp_path / "out").glob("0*.png")))   # the image says how it was made
    assert json.loads(png.text["sdtune"])["composed"] is True and "sdtune compose: true" in png.text["parameters"]
    assert main(["sample", "a [sks] star [3:in qtz style]", "--adapter", str(a), "--compose", "-o",
                 str(tmp_path / "bad")]) == 2
    assert "among 1..1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["sample", "a [sks] star", "--compose", "-o", str(tmp_path / "bad")]) == 2
    assert "needs the adapters" in capsys.readouterr().err


def test_regions_read_names_and_boxes():
    assert compose.region_box("left") == (0.0, 0.0, 0.5, 1.0) and compose.region_box(None) == (0, 0, 1, 1)
    assert compose.region_box("0.25:0:1:0.5") == (0.25, 0.0, 1.0, 0.5)
    assert compose.region_cells("right", 16, 32, 4) == (0, 16, 16, 32)
    assert compose.region_cells("0.3:0:0.9:1", 16, 32, 4) == (0, 16, 8, 28)        # edges snap to the multiple
    for bad in ("middle", "0:0:0.5", "0.5:0:0.5:1", "0:0:1:2", "a:b:c:d"):
        with pytest.raises(compose.ComposeError, match="X0:Y0:X1:Y1"):
            compose.region_box(bad)
    with pytest.raises(compose.ComposeError, match="less than 4 latent cells"):
        compose.region_cells("0:0:0.1:1", 16, 16, 4)
    with pytest.raises(compose.ComposeError, match="one region per adapter"):
        compose.check(["[a sks star] [a star in qtz style]"], 2, ["left"])


def test_regions_denoise_each_box_as_its_own_image(tiny_model, adapters, monkeypatch):
    """Boxes left/right on a 128×64 canvas (a 32×16 latent): after one step the left half of the latent is what
    adapter a alone gives in box left (its crop denoised alone; the base fills the rest), the right half what b
    alone gives in box right; where two boxes overlap their steps are averaged (the sampler step is linear in ε̂).
    (Latents are compared: the VAE's mid-block attention spreads every latent cell over the whole image.)"""
    a, b = adapters
    vae, latents = tiny_model.pipeline.vae, []
    decode = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, *args, **kw: latents.append(z.clone()) or decode(z, *args, **kw))

    def run(prompt, files, regions):
        request = SampleRequest([prompt], seed=5, steps=1, guidance=4.0, count=2, width=128, height=64,
                                adapters=[(str(f), w) for f, w in files], regions=regions)
        compose.generate(tiny_model, request, progress=False)
        return latents[-1]

    both = run("[a sks star] [a star in qtz style]", [(a, 1.0), (b, 0.7)], ["left", "right"])
    left = run("[a sks star]", [(a, 1.0)], ["left"])
    right = run("[a star in qtz style]", [(b, 0.7)], ["right"])
    assert both.shape[-2:] == (16, 32)
    assert torch.allclose(both[..., :16], left[..., :16], atol=1e-5)
    assert torch.allclose(both[..., 16:], right[..., 16:], atol=1e-5)
    assert (left[..., 16:] - right[..., 16:]).abs().mean() > 1e-2
    whole = run("[a sks star]", [(a, 1.0)], ["full"])
    overlap = run("[a sks star] [a star in qtz style]", [(a, 1.0), (b, 0.7)], ["full", "right"])
    assert torch.allclose(overlap[..., :16], whole[..., :16], atol=1e-5)
    assert torch.allclose(overlap[..., 16:], (whole[..., 16:] + right[..., 16:]) / 2, atol=1e-5)


def test_cli_sample_regions(adapters, tmp_path, capsys):
    from sdtune.cli import main

    a, b = adapters
    common = ["[a sks star] [an ohwx circle]", "--adapter", str(a), "--adapter", str(b), "-n", "1", "--steps", "1",
              "--width", "128", "--height", "64"]
    assert main(["sample", *common, "--compose", "--region", "left", "--region", "0.5:0:1:1",
                 "-o", str(tmp_path / "out")]) == 0
    png = Image.open(next((tmp_path / "out").glob("0*.png")))
    assert png.size == (128, 64) and json.loads(png.text["sdtune"])["regions"] == ["left", "0.5:0:1:1"]
    assert main(["sample", *common, "--region", "left", "--region", "right", "-o", str(tmp_path / "bad")]) == 2
    assert "turn it on (--compose" in capsys.readouterr().err
    assert main(["sample", *common, "--compose", "--region", "left", "-o", str(tmp_path / "bad")]) == 2
    assert "one region per adapter" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["sample", *common, "--compose", "--blocks", "MIDD", "-o", str(tmp_path / "bad")]) == 2
    assert "do not combine with composed sampling" in capsys.readouterr().err and not (tmp_path / "bad").exists()
