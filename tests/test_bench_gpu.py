"""bench/gpu.sh on the CPU (small widths, 64 px, one step per configuration): every row runs and is reported.

About 25 processes (one per configuration, each importing torch and diffusers): minutes on 2 cores, so slow.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("sd1-bf16", "sd1-fp32", "sdxl-r32", "sdxl-r16", "sdxl-nf4", "sdxl-int8", "sd1-compile")


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
