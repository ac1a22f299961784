"""bench/bench_fusion.py's ratio plumbing (issue 22): ranks by block width and the rank × concepts / width report.
The bench's figures themselves are in bench/RESULTS.md; here only what decides which regime they were measured in."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers_adapters import write_adapter

from sdtune.adapters import AdapterSpec
from sdtune.config import from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fusion", ROOT / "bench" / "bench_fusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_width_ranks_hold_one_ratio_per_block(bench, tiny_model):
    """Block widths 32/64/128: one rank per 32 input channels; ResNet blocks go by the width entering them."""
    ranks = bench.width_ranks(tiny_model, 1)
    assert ranks["attn"] == {"down_blocks.0": 1, "down_blocks.1": 2, "down_blocks.2": 4, "mid_block": 4,
                             "up_blocks.0": 4, "up_blocks.1": 2, "up_blocks.2": 1}
    assert ranks["resnet"]["down_blocks.1"] == 1 and ranks["resnet"]["down_blocks.2"] == 2
    assert bench.width_ranks(tiny_model, 2)["attn"]["mid_block"] == 8


def test_adapter_rules_are_a_valid_config_and_carry_the_scale(bench, tiny_model, tmp_path):
    class Args:
        ranks, alpha_ratio, text_encoder = "width:1", 2.0, True

    rules = bench.adapter_rules({"algorithm": "locon", "ortho_basis_seed": 0, "ortho_index": 3}, Args, tiny_model)
    assert all(r["alpha"] == 2 * r["rank"] for r in rules) and rules[-1]["preset"] == "te"
    config = from_dict({"data": {"instance_dir": str(tmp_path)}, "adapters": rules,
                        "train": {"train_text_encoder": True, "steps": 1}})
    assert [r.rank for r in config.adapters] == [r["rank"] for r in rules]
    Args.ranks, Args.alpha_ratio = "8", None
    assert [(r["preset"], r["rank"]) for r in bench.adapter_rules({"algorithm": "locon"}, Args, tiny_model)] == \
        [("attn", 8), ("resnet", 8), ("te", 8)]
    Args.text_encoder = False           # --no-text-encoder: U-Net rules only
    assert [r["preset"] for r in bench.adapter_rules({"algorithm": "locon"}, Args, tiny_model)] == ["attn", "resnet"]


def test_ratio_is_rank_times_concepts_over_input_width(bench, tiny_model, tmp_path):
    comps = tiny_model.components()
    torch.manual_seed(0)
    files = []
    for k, rank in enumerate((2, 4)):
        write_adapter(comps, tmp_path / f"{k}.safetensors", [("te", AdapterSpec("locon", rank=rank))], k)
        files.append(tmp_path / f"{k}.safetensors")
    worst, layer, median = bench.ratio(files)
    # text-encoder widths: 128 (q/k/v/out, fc1) and 512 (fc2): (2 + 4) / 128 at most, (2 + 4) / 512 at least
    assert worst == pytest.approx(6 / 128) and "mlp_fc2" not in layer and median == pytest.approx(6 / 128)


def test_colour_objects_are_judged_by_shape_and_colour(bench):
    """The eight-concept run's colour objects: present by shape and colour, paired with styles, and their colour on
    their class prompt counts against the prior (the base draws it too; the ratio to the base takes that out)."""
    from sdtune.toy.judge import Verdict

    purple = Verdict("hexagon", "purple", "plain", None, None)
    red = Verdict("hexagon", "red", "plain", None, None)
    assert bench.joint_pairs(["kfz", "sks", "qtz"]) == [("kfz", "qtz"), ("sks", "qtz")]
    assert bench.prior_ok([purple, red], "a hexagon") == 0.5 and bench.prior_ok([red], "a star") == 0.0
    assert bench.marked_prompt("a kfz hexagon in qtz style", ["kfz", "qtz"]) == "a [1:kfz] hexagon [2:in qtz style]"


def test_style_names_put_an_unknown_name_before_the_noun(bench, tmp_path):
    """The style-after-object recipe (issue 22): half of a style's captions name their subject with a word that is no
    concept's token, in the object prompts' word order; the other half and the images are untouched."""
    from sdtune.toy import world as tw

    tw.write_instance_folder("qtz", tmp_path, n=12)
    before = {f.name: f.read_text() for f in tmp_path.glob("*.txt")}
    assert bench.name_subjects(tmp_path, "qtz", 0.5) == 6
    after = {f.name: f.read_text().strip() for f in tmp_path.glob("*.txt")}
    named = [k for k in after if after[k] != before[k].strip()]
    assert len(named) == 6
    for k in named:
        a, name, shape, *rest = after[k].split()
        assert a == "a" and rest == ["in", "qtz", "style"] and f" {shape} in qtz style" in before[k]
        assert name not in tw.RARE_TOKENS and name not in tw.COLOUR_OBJECTS and name not in tw.vocabulary()
