#!/usr/bin/env bash
# bash bench/multiprocess_train.sh [STEPS]
# Data-parallel training on 2 CPU processes through accelerate (gloo), then the same steps in one process, with
# wall times. accelerate 1.x starts CPU workers with torchrun under --multi_gpu (sdtune's Accelerator runs on the
# CPU when no GPU exists); `accelerate launch --cpu --num_processes 2` without mpirun starts a single process.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}"
OUT="${OUT:-outputs/bench-multiprocess}"
rm -rf "$OUT"
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(--quiet --set "train.steps=$STEPS" --set train.batch_size=1 --set prior.num_class_images=4
        --set prior.class_dir="$OUT/class" --set output.validation_prompts=[] --set output.checkpoint_every=0)

start=$(date +%s.%N)
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m sdtune.cli train train_configs/demo.toml "${COMMON[@]}" --set output.dir="$OUT/2proc"
two=$(echo "$(date +%s.%N) - $start" | bc)

start=$(date +%s.%N)
python -m sdtune.cli train train_configs/demo.toml "${COMMON[@]}" --set output.dir="$OUT/1proc"
one=$(echo "$(date +%s.%N) - $start" | bc)

python - "$OUT" "$two" "$one" <<'PY'
import sys, torch
from sdtune.train import read_log
out, two, one = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
for name, wall in (("2proc", two), ("1proc", one)):
    rows = read_log(f"{out}/{name}/log.csv")
    state = torch.load(sorted(__import__("pathlib").Path(f"{out}/{name}/checkpoints").glob("step-*"))[-1] / "trainer.pt",
                       weights_only=True)
    print(f"{name}: {len(rows)} steps, {state['num_processes']} process(es), {state['samples_seen']} instance samples, "
          f"final loss {float(rows[-1]['loss']):.4f}, wall {wall:.1f}s (incl. start-up)")
PY
