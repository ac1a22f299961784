import json

import numpy as np
from PIL import Image

from sdtune.cli import main
from sdtune.sample import SampleRequest, generate, grid
from sdtune.toy import judge as J
from sdtune.toy import world as tw


def test_sample_cli_writes_grid_and_images_with_metadata(tmp_path):
    out = tmp_path / "s"
    rc = main(["sample", "a red star", "a blue circle", "-n", "2", "--steps", "4", "--seed", "7", "-o", str(out)])
    assert rc == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4
    g = Image.open(out / "grid.png")
    assert g.size == (2 * 64, 2 * 64)
    meta = json.loads(Image.open(pngs[0]).text["sdtune"])
    assert meta["prompt"] == "a red star" and meta["seed"] == 7 and meta["steps"] == 4 and meta["composed"] is False
    assert "Seed: 7" in Image.open(pngs[0]).text["parameters"]
    assert "compose" not in Image.open(pngs[0]).text["parameters"]


def test_sample_is_reproducible_per_seed(tiny_model):
    a = generate(tiny_model, SampleRequest(["a green square"], seed=3, steps=4, count=2), progress=False)
    b = generate(tiny_model, SampleRequest(["a green square"], seed=4, steps=4, count=1), progress=False)
    # image 1 of the first call used seed 4, like image 0 of the second
    assert np.allclose(np.asarray(a[1].image, dtype=float), np.asarray(b[0].image, dtype=float), atol=2)
    assert not np.array_equal(np.asarray(a[0].image), np.asarray(a[1].image))


def test_sample_cli_errors_cleanly(tmp_path, capsys):
    rc = main(["sample", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path)])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = main(["sample", "x", "--size", "30", "-o", str(tmp_path)])
    assert rc == 2 and "multiple of 8" in capsys.readouterr().err


def test_grid_layout():
    ims = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    g = grid(ims, columns=2)
    assert g.size == (16, 24) and g.getpixel((8, 0)) == (1, 0, 0)


def test_embedded_model_quality_short(tiny_model, judge_model):
    """Short version of the quality figure in bench/RESULTS.md (prompted shape and colour both rendered).

    The shipped model measures 87.5 % here (14/16; chance is 1/64) and 82.8 % on all 128 samples of
    bench/RESULTS.md; the issue's bar is 80 %. A broken model, sampler or judge scores ~0; 10/16 leaves room for
    the run-to-run noise of a 16-sample test (a thread-count change moves a sample or two) while failing a model
    that renders far under the bar."""
    rng = np.random.default_rng(0)
    pairs = [(tw.SHAPES[i], list(tw.COLOURS)[j]) for i, j in zip(rng.permutation(8), rng.permutation(8))]
    prompts = [f"a {c} {s}" for s, c in pairs]
    samples = generate(tiny_model, SampleRequest(prompts, seed=0, steps=20, guidance=5.0, count=2), progress=False)
    verdicts = J.judge(judge_model, [s.image for s in samples])
    hits = sum(v.shape == p[0] and v.colour == p[1] for v, p in zip(verdicts, [p for p in pairs for _ in range(2)]))
    assert hits >= 10, f"{hits}/{len(samples)}"


def test_export_and_inspect_cli_on_the_embedded_model(fresh_tiny_model, tmp_path, capsys):
    """`sdtune export` turns a native adapter into an A1111 file; `sdtune inspect --json` reads it back."""
    import torch

    from sdtune.adapters import AdapterSpec
    from sdtune.inject import attach

    inj = attach(fresh_tiny_model.components(), [("attn", AdapterSpec("locon", rank=2))], fresh_tiny_model.arch)
    with torch.no_grad():
        for a in inj.parameters():
            a.add_(0.01)
    inj.save(tmp_path / "a.sdtune")
    out = tmp_path / "a.safetensors"
    assert main(["export", str(tmp_path / "a.sdtune"), "-o", str(out), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json", "--against-model"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == len(inj.adapters) and info["unmapped"] == [] and info["hashes"]["ok"]
    assert info["arch"] == "sd1" and info["ranks"] == {"2": len(inj.adapters)}
    # error paths: a file that is not a native adapter, a missing file
    assert main(["export", str(out), "-o", str(tmp_path / "b.safetensors")]) == 2
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "error" in capsys.readouterr().err
