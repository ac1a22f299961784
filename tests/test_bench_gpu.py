"""bench/gpu.sh on the CPU (small widths, 64 px, one step per configuration): every row runs and is reported
(about 25 processes, one per configuration, each importing torch and diffusers: minutes on 2 cores, so slow);
and bench_adapters.py's one-layer mode (seconds).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("sd1-bf16", "sd1-fp32", "sdxl-r32", "sdxl-r16", "sdxl-nf4", "sdxl-int8", "sd1-compile", "memory")


@pytest.mark.slow
def test_gpu_script_runs_every_row_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET_S": "100000", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu"], env=env, capture_output=True,
                         text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = (tmp_path / "results.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for name in ROWS:
        ok = name != "sdxl-nf4" or has_bnb                   # nf4 needs bitsandbytes
        assert f"## {name} (" in report, name
        assert ("exit 0)" in report.split(f"## {name} (")[1].split("\n")[0]) == ok, name
    seen = {(r["arch"], r["dtype"], r["base_quant"], r["compile"], r["config"], r["rank"]) for r in rows}
    assert ("sd1", "bf16", "none", False, "sdtune-locon", 16) in seen
    assert ("sdxl", "bf16", "int8", False, "sdtune-locon", 32) in seen
    assert ("sdxl", "bf16", "none", False, "lycoris-locon-bypass", 32) in seen
    assert ("sd1", "bf16", "none", True, "peft-lora", 16) in seen
    assert all(r["s_step"] > 0 and (r["trainable"] > 0) == (r["config"] != "floor") for r in rows)
    assert len(rows) == 23 - (0 if has_bnb else 2)
    memory = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert [r["setting"] for r in memory] == ["sd1-bf16", "sdxl-r32"] and all(r["predicted_gib"] > 0 for r in memory)


def test_one_layer_mode_lists_the_full_size_ops_and_casts():
    """``bench_adapters.py --layer``: under bf16 autocast an sdtune adapter casts exactly what its frozen layer
    casts (the bench's own claim in RESULTS), and the summary names every adapter asked for."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_adapters.py"), "--layer", "linear", "--dtype", "bf16",
                          "--layer-adapters", "floor,sdtune-locon"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    copies = {line.split(":")[0]: line.split(", ")[1] for line in res.stdout.splitlines() if "full-size ops" in line}
    assert set(copies) == {"floor", "sdtune-locon"}
    assert copies["floor"] == copies["sdtune-locon"], res.stdout


def test_one_configuration_runs_in_its_own_process():
    """The step bench's unit (one configuration, small widths, a bf16-stored base): the JSON line it prints."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_adapters.py"), "--config", "sdtune-locon",
                          "--small", "--resolution", "64", "--steps", "1", "--warmup", "0", "--dtype", "bf16",
                          "--base-dtype", "bf16"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["config"] == "sdtune-locon" and row["base_dtype"] == "bf16" and row["trainable"] > 0
    assert row["s_step"] > 0
