#!/usr/bin/env bash
# Every GPU benchmark in one go (≤ 8 minutes on an H100/H200): prints one table and appends its rows, with
# the device, the date and each command, to benchmarks/RESULTS.md.
#   bash benchmarks/gpu_suite.sh                 # weights from ../shared/data (LPIPS, Inception)
#   SHARED_DATA=/path/to/data bash benchmarks/gpu_suite.sh
# Each benchmark has its own time limit; one that fails or runs over is recorded as such, not hidden.
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED_DATA=${SHARED_DATA:-../shared/data}
LPIPS=$SHARED_DATA/lpips/alexnet-owt-7be5be79.features-only.pth
INCEPTION=$SHARED_DATA/inception/pt_inception-2015-12-05-reconstructed-nofc.pth
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: no CUDA device visible to torch; this suite measures GPU figures only" >&2
    exit 2
fi
DEVICE=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
DATE=$(date -u +%Y-%m-%d)
ROWS=()

# bench NAME LIMIT_S PATTERN ARGS...: run one script, keep the lines matching PATTERN as its result.
bench() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    local log
    log=$(mktemp)
    echo "== $name: python $*"
    timeout "$limit" python "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    local result
    result=$(grep -E "$pattern" "$log" | sed -e 's/^ *//' | paste -sd ';' -)
    if [ $rc -eq 124 ]; then result="timed out after ${limit} s ${result}"; fi
    if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then result="failed (exit $rc): $(tail -n 1 "$log")"; fi
    ROWS+=("| $DATE | $DEVICE | $name | \`python $*\` | ${result//|//} |")
    rm -f "$log"
}

bench "DiT-B/2 train step, batch 256, bf16, compiled" 150 "throughput|TFLOP|peak memory" \
    benchmarks/bench_dit.py --model DiT-B/2 --batch 256 --compile --precision bf16 --steps 30 --warmup 10
bench "Flux AE fine-tune, batch 8, bf16, MAE+KL" 120 "branch:" \
    benchmarks/bench_finetune.py --size flux --resolution 256 --batch 8 --precision bf16 --steps 10 --warmup 3
if [ -f "$LPIPS" ]; then
    bench "Flux AE fine-tune, batch 32, bf16, LPIPS + SSR branch, grad ckpt" 120 "branch:" \
        benchmarks/bench_finetune.py --size flux --resolution 256 --batch 32 --precision bf16 --steps 5 \
        --warmup 2 --lpips-weights "$LPIPS" --grad-checkpointing
else
    ROWS+=("| $DATE | $DEVICE | Flux AE batch 32 with LPIPS | — | not run: no LPIPS weights at $LPIPS |")
fi
bench "DiT-B/2 sampling, batch 256, 50 Euler steps, CFG 1.5, bf16, compiled" 100 "throughput|peak memory" \
    benchmarks/bench_sample.py --model DiT-B/2 --batch 256 --steps 50 --cfg-scale 1.5 --compile --precision bf16
if [ -f "$INCEPTION" ]; then
    bench "Inception-v3 features, 256², batch 250" 60 "throughput|peak memory" \
        benchmarks/bench_inception.py --weights "$INCEPTION" --resolution 256 --batch 250 --batches 8
else
    ROWS+=("| $DATE | $DEVICE | Inception features | — | not run: no Inception weights at $INCEPTION |")
fi

echo
echo "| date | device | benchmark | command | result |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${ROWS[@]}"
{
    echo
    echo "### gpu_suite.sh, $DATE, $DEVICE"
    echo
    echo "| date | device | benchmark | command | result |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
} >> benchmarks/RESULTS.md
