#!/usr/bin/env bash
# bash bench/demo_per_algorithm.sh [NAMES...] [-- BENCH_DEMO_ARGS...]
# Each algorithm's shipped demo recipe on the embedded model, judged by bench/bench_demo.py (32 samples, seed 7000 by
# default): concept fidelity, prior preservation, concept leak; plus wall time and trainable parameters.
#   locon        sdtune/recipes/demo.toml
#   dora         demo.toml with adapters.algorithm=dora (DoRA over the same LoCon factors)
#   flora        sdtune/recipes/demo-flora.toml
#   flora-small  sdtune/recipes/demo-flora-small.toml (≤ 30 % of the LoCon demo's trainable parameters)
#   spectral     sdtune/recipes/demo-spectral.toml
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A RECIPE=([locon]=demo [dora]=demo [flora]=demo-flora [flora-small]=demo-flora-small [spectral]=demo-spectral)
declare -A SETS=([dora]="adapters.algorithm=dora")
names=() judge=(--n 32 --seed 7000)
while (($#)); do
  if [[ $1 == -- ]]; then shift; judge=("$@"); break; fi
  names+=("$1"); shift
done
((${#names[@]})) || names=(locon dora flora flora-small spectral)
for name in "${names[@]}"; do
  [[ -n ${RECIPE[$name]:-} ]] || { echo "unknown name $name; expected one of ${!RECIPE[*]}" >&2; exit 2; }
  args=(--set "output.dir=outputs/demo-$name" --set output.validation_prompts=[] --set output.checkpoint_every=0)
  for s in ${SETS[$name]:-}; do args+=(--set "$s"); done
  start=$(date +%s)
  python -m sdtune.cli train "${RECIPE[$name]}" --quiet "${args[@]}"
  wall=$(( $(date +%s) - start ))
  params=$(tail -1 "outputs/demo-$name/adapters.txt" | awk '{print $NF}')
  echo "## $name (${RECIPE[$name]}): wall ${wall} s (training incl. class images), ${params} trainable parameters"
  python bench/bench_demo.py "outputs/demo-$name/adapter.safetensors" --token sks "${judge[@]}"
done
