#!/usr/bin/env bash
# Every GPU row of issue 19 in one run, each a call of bench/bench_adapters.py (one process per configuration):
#   sd1-bf16 / sd1-fp32   SD1.5 U-Net, 512 px, batch 4, rank 16: sdtune LoCon/DoRA vs PEFT LoRA/DoRA (+ floor)
#   sdxl-r32 / sdxl-r16   SDXL U-Net, 1024 px, batch 1, bf16 autocast over a bf16 base, gradient checkpointing,
#                         8-bit AdamW: sdtune LoCon/DoRA vs PEFT LoRA/DoRA and LyCORIS bypass (r32; r16 sdtune only)
#   sdxl-nf4 / sdxl-int8  the same with the adapted layers' weights quantised (sdtune.lowprec)
#   sd1-compile           SD1.5 bf16 with torch.compile (compile time falls in the warm-up steps)
#   memory                `sdtune train --dry-run`'s predicted peak against the trainer's measured one (bench_memory.py)
# Rows run in that order until the time budget (BUDGET_S, default 450 s) is spent; a row not started is listed as
# skipped. Results: $OUT/results.md (the tables) and $OUT/results.jsonl (one JSON line per configuration).
#
#   bash bench/gpu.sh                      # on the GPU machine; OUT defaults to bench/gpu-results
#   bash bench/gpu.sh --device cpu         # the same rows with small widths, 64 px, one step (compile: aot_eager)
# Needs torch, diffusers, peft, lycoris-lora (and bitsandbytes for 8-bit AdamW / nf4 on CUDA). If they do not
# import, they are installed from $WHEELS (a folder of wheels, for a machine without network) or the package index.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
[ "${1:-}" = "--device" ] && DEVICE=${2:?--device needs cpu or cuda}
OUT=${OUT:-bench/gpu-results}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

need="import torch, diffusers, peft, lycoris"
[ "$DEVICE" = cuda ] && need="$need, bitsandbytes"
if ! python -c "$need" 2>/dev/null; then
    pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} diffusers transformers peft lycoris-lora \
        $([ "$DEVICE" = cuda ] && echo bitsandbytes) || { echo "gpu.sh: could not install the packages" >&2; exit 1; }
fi

if [ "$DEVICE" = cpu ]; then
    COMMON=(--device cpu --small --steps 1 --warmup 0); SD1=(--resolution 64 --batch 1); SDXL=(--resolution 64)
    COMPILE_WARMUP=(--warmup 0 --compile-backend aot_eager)    # Inductor's C++ build takes minutes on a CPU
else
    COMMON=(--device cuda --steps 6 --warmup 2); SD1=(--resolution 512 --batch 4); SDXL=(--resolution 1024 --batch 1)
    COMPILE_WARMUP=(--warmup 3)
fi
XL=(--arch sdxl "${SDXL[@]}" --dtype bf16 --base-dtype bf16 --grad-checkpointing --optimizer adamw8bit)
PEERS=floor,sdtune-locon,sdtune-dora,peft-lora,peft-dora

start=$(date +%s)
{
    echo "# bench/gpu.sh on $DEVICE, $(date -u +%Y-%m-%dT%H:%MZ)"
    python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/results.md"

row() {  # row NAME ARGS...: run one bench_adapters.py call (SCRIPT=bench/bench_memory.py: that one) unless the
    local name=$1 script=${SCRIPT:-bench/bench_adapters.py}; shift           # budget is spent
    if (( $(date +%s) - start > BUDGET_S )); then
        printf '\n## %s\n\nskipped: time budget (%s s) spent\n' "$name" "$BUDGET_S" >> "$OUT/results.md"
        return
    fi
    local t0=$(date +%s)
    python "$script" "${COMMON[@]}" --jsonl "$OUT/results.jsonl" "$@" > "$OUT/$name.md" 2> "$OUT/$name.err"
    local rc=$?
    printf '\n## %s (%s s, exit %s)\n\n`%s %s`\n\n' "$name" $(( $(date +%s) - t0 )) "$rc" "$script" \
        "${COMMON[*]} $*" >> "$OUT/results.md"
    cat "$OUT/$name.md" >> "$OUT/results.md"
    [ -s "$OUT/$name.err" ] && grep -E "failed|Error" "$OUT/$name.err" | head -5 >> "$OUT/results.md"
}

row sd1-bf16 "${SD1[@]}" --dtype bf16 --configs "$PEERS"
row sd1-fp32 "${SD1[@]}" --configs "$PEERS"
row sdxl-r32 "${XL[@]}" --rank 32 --configs "$PEERS,lycoris-locon-bypass"
row sdxl-r16 "${XL[@]}" --rank 16 --configs sdtune-locon,sdtune-dora
row sdxl-nf4 "${XL[@]}" --rank 32 --base-quant nf4 --configs sdtune-locon,sdtune-dora
row sdxl-int8 "${XL[@]}" --rank 32 --base-quant int8 --configs sdtune-locon
row sd1-compile "${SD1[@]}" --dtype bf16 --compile "${COMPILE_WARMUP[@]}" --configs sdtune-locon,peft-lora
# the dry-run estimate against the trainer's measured peak (bench_memory.py writes its own random-weights models)
[ "$DEVICE" = cpu ] && MEMORY=(--device cpu --small) || MEMORY=(--device cuda)
COMMON=("${MEMORY[@]}")
SCRIPT=bench/bench_memory.py row memory --settings sd1-bf16,sdxl-r32 --jsonl "$OUT/memory.jsonl"

echo "gpu.sh: $(( $(date +%s) - start )) s; $(wc -l < "$OUT/results.jsonl") configurations -> $OUT/results.md"
