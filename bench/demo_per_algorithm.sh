#!/usr/bin/env bash
# bash bench/demo_per_algorithm.sh [ALGORITHMS...]
# The demo recipe (train_configs/demo.toml) once per adapter algorithm, each judged by bench/bench_demo.py on 32
# samples: concept fidelity, prior preservation, concept leak; plus wall time and trainable parameters.
# FLoRA twice: at about LoCon's parameter count (r1 = r2 = 13) and at about 30 % of it (r1 = r2 = 4).
# NAME-te-locon: the U-Net rules as NAME, the text encoder given its own LoCon r8 rule (appended to a copy of the
# recipe; `--set adapters.K=` then names the U-Net rules 0 and 1 only).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A SETS=(
  [locon]=""
  [flora-equal]="adapters.algorithm=flora adapters.rank=13"
  [flora-30pct]="adapters.algorithm=flora adapters.rank=4"
  [dora]="adapters.algorithm=dora"
  [spectral]="adapters.algorithm=spectral"
  [flora-te-locon]="adapters.0.algorithm=flora adapters.0.rank=13 adapters.1.algorithm=flora adapters.1.rank=13"
  [spectral-te-locon]="adapters.0.algorithm=spectral adapters.1.algorithm=spectral"
)
NAMES=("${@:-locon flora-equal flora-30pct dora spectral}")
for name in ${NAMES[@]}; do
  args=(--set "output.dir=outputs/demo-$name")
  for s in ${SETS[$name]}; do args+=(--set "$s"); done
  config=train_configs/demo.toml
  if [[ $name == *-te-locon ]]; then
    config=$(mktemp --suffix .toml)
    cp train_configs/demo.toml "$config"
    printf '\n[[adapters]]\npreset = "te"\nalgorithm = "locon"\nrank = 8\n' >> "$config"
  fi
  start=$(date +%s)
  python -m sdtune.cli train "$config" --quiet "${args[@]}"
  wall=$(( $(date +%s) - start ))
  params=$(tail -1 "outputs/demo-$name/adapters.txt" | awk '{print $NF}')
  echo "## $name: wall ${wall} s (training incl. class images and previews), ${params} trainable parameters"
  python bench/bench_demo.py "outputs/demo-$name/adapter.safetensors" --token sks --n 32
done
