#!/usr/bin/env bash
# bash bench/demo_per_algorithm.sh [ALGORITHMS...]
# The demo recipe (train_configs/demo.toml) once per adapter algorithm, each judged by bench/bench_demo.py on 32
# samples: concept fidelity, prior preservation, concept leak; plus wall time and trainable parameters.
# FLoRA twice: at about LoCon's parameter count (r1 = r2 = 13) and at about 30 % of it (r1 = r2 = 4).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A SETS=(
  [locon]=""
  [flora-equal]="adapters.algorithm=flora adapters.rank=13"
  [flora-30pct]="adapters.algorithm=flora adapters.rank=4"
  [dora]="adapters.algorithm=dora"
  [spectral]="adapters.algorithm=spectral"
)
NAMES=("${@:-locon flora-equal flora-30pct dora spectral}")
for name in ${NAMES[@]}; do
  args=(--set "output.dir=outputs/demo-$name")
  for s in ${SETS[$name]}; do args+=(--set "$s"); done
  start=$(date +%s)
  python -m sdtune.cli train train_configs/demo.toml --quiet "${args[@]}"
  wall=$(( $(date +%s) - start ))
  params=$(tail -1 "outputs/demo-$name/adapters.txt" | awk '{print $NF}')
  echo "## $name: wall ${wall} s (training incl. class images and previews), ${params} trainable parameters"
  python bench/bench_demo.py "outputs/demo-$name/adapter.safetensors" --token sks --n 32
done
