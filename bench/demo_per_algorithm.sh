#!/usr/bin/env bash
# bash bench/demo_per_algorithm.sh [--sdxl] [NAMES...] [-- BENCH_DEMO_ARGS...]
# Each algorithm's shipped demo recipe on the embedded model, judged by bench/bench_demo.py (128 samples, seed 7000 by
# default): concept fidelity, prior preservation, concept leak; plus wall time and trainable parameters.
#   locon        sdtune/recipes/demo.toml
#   dora         demo.toml with adapters.algorithm=dora (DoRA over the same LoCon factors)
#   flora        sdtune/recipes/demo-flora.toml
#   flora-small  sdtune/recipes/demo-flora-small.toml (≤ 30 % of the LoCon demo's trainable parameters)
#   spectral     sdtune/recipes/demo-spectral.toml
# --sdxl: the same recipes on the embedded SDXL base (assets/tiny-sdxl; LoCon and DoRA from demo-sdxl.toml, the
# others with model.path and the class images switched), written to outputs/demo-sdxl-NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -A RECIPE=([locon]=demo [dora]=demo [flora]=demo-flora [flora-small]=demo-flora-small [spectral]=demo-spectral)
declare -A SETS=([dora]="adapters.algorithm=dora")
names=() judge=(--n 128 --seed 7000) base=() tag=demo
if [[ ${1:-} == --sdxl ]]; then
  shift; tag=demo-sdxl RECIPE[locon]=demo-sdxl RECIPE[dora]=demo-sdxl
  base=(--set "model.path=$PWD/assets/tiny-sdxl" --set prior.class_dir=outputs/class_images/sdxl_a_star)
fi
while (($#)); do
  if [[ $1 == -- ]]; then shift; judge=("$@"); break; fi
  names+=("$1"); shift
done
((${#names[@]})) || names=(locon dora flora flora-small spectral)
for name in "${names[@]}"; do
  [[ -n ${RECIPE[$name]:-} ]] || { echo "unknown name $name; expected one of ${!RECIPE[*]}" >&2; exit 2; }
  out=outputs/$tag-$name
  args=("${base[@]}" --set "output.dir=$out" --set output.validation_prompts=[] --set output.checkpoint_every=0)
  for s in ${SETS[$name]:-}; do args+=(--set "$s"); done
  start=$(date +%s)
  python -m sdtune.cli train "${RECIPE[$name]}" --quiet "${args[@]}"
  wall=$(( $(date +%s) - start ))
  params=$(tail -1 "$out/adapters.txt" | awk '{print $NF}')
  echo "## $name (${RECIPE[$name]}${base:+ on assets/tiny-sdxl}): wall ${wall} s (training incl. class images), ${params} trainable parameters"
  python bench/bench_demo.py "$out/adapter.safetensors" --token sks "${judge[@]}" ${base:+--model assets/tiny-sdxl}
done
