#!/usr/bin/env bash
# On a machine with one CUDA GPU, one command: the CUDA tests, then the benchmarks, then one table.
#
#     bash benchmarks/gpu.sh                 # PYTHON=... to pick the interpreter (default: python)
#     GPU_BUDGET_S=480 GPU_LOG_DIR=logs bash benchmarks/gpu.sh
#
# Rows: the CUDA tests (tests/test_cuda.py with -m cuda, and the device-parametrised cuda cases of the VAE, VAE
# tiling and CLIP tests); the UNet step of full-size SDXL base at 512^2 and 1024^2 in bf16 (torch's own SDPA
# choice, then flash and memory-efficient attention forced), VAE decode at 1024^2 (bf16; fp16 through
# decode_checked; fp16 with a forced overflow, i.e. the float32 fallback), end to end 1024^2 base only (each
# side's defaults: xldm bf16, diffusers fp32) and the UNet step under torch.compile with its compile time.
# Every step runs under a timeout and the whole under GPU_BUDGET_S (default 480 s = 8 minutes): a step that
# would start past the budget is listed as skipped, one the budget cuts short as "budget spent" (neither fails
# the run; a step past its own timeout does).  Each step's full output is kept in GPU_LOG_DIR.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${GPU_BUDGET_S:-480}
LOG=${GPU_LOG_DIR:-$(mktemp -d -t xldm-gpu-XXXXXX)}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 1
fi
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')
START=$(date +%s)
ROWS=()
FAILED=0

# step NAME LIMIT_S SUMMARY_REGEX COMMAND...: run COMMAND (timeout LIMIT_S, and never past the budget), keep its
# output in $LOG/NAME.log, and add a row with the output's lines matching SUMMARY_REGEX.
step() {
    local name=$1 limit=$2 pattern=$3
    shift 3
    local now left begin rc summary
    now=$(date +%s)
    left=$((BUDGET - (now - START)))
    if ((left < 20)); then
        ROWS+=("| $name | skipped: the ${BUDGET} s budget is spent | | |")
        return
    fi
    local cut_by_budget=0
    ((limit > left)) && { limit=$left; cut_by_budget=1; }
    echo "== $name (limit ${limit} s)" >&2
    begin=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOG/$name.log" 2>&1
    rc=$?
    summary=$(grep -E "$pattern" "$LOG/$name.log" \
        | sed -E 's/^\|[[:space:]]*//; s/[[:space:]]*\|$//; s/[[:space:]]*\|[[:space:]]*/, /g; s/[[:space:]]+/ /g' \
        | paste -sd ';' -)
    local status=ok
    if ((rc == 124 || rc == 137)) && ((cut_by_budget)); then  # the budget ran out: reported, not a failure
        ROWS+=("| $name | stopped: the ${BUDGET} s budget ran out | $(($(date +%s) - begin)) s | budget spent |")
        return
    elif ((rc == 124 || rc == 137)); then
        status="timed out"
    elif ((rc != 0)); then
        status="failed ($rc)"
    fi
    [[ $status == ok ]] || { FAILED=1; summary="${summary:+$summary; }$(tail -n 1 "$LOG/$name.log" | cut -c1-160)"; }
    ROWS+=("| $name | ${summary:-(no summary line)} | $(($(date +%s) - begin)) s | $status |")
}

UNET="benchmarks/unet_step.py --config sdxl-base --dtype bf16 --device cuda --repeats 3"
VAE="benchmarks/vae_decode.py --config sdxl --size 1024 --device cuda --repeats 3"
RATIO='^ratio|^peak allocated|^compile time'

# The headline rows first (each side's 1024^2 step and end to end), so that a slow machine cuts the extras.
step cuda-tests 120 '(passed|failed|skipped|error)' "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/test_cuda.py tests/test_vocab.py
step cuda-device-cases 60 '(passed|failed|skipped|error)' "$PY" -m pytest -q -p no:cacheprovider -m 'not slow' \
    tests/test_vae.py tests/test_vae_tiling.py tests/test_clip.py -k 'cuda or (half_precision and not cpu)'
step unet-1024-bf16 50 "$RATIO" "$PY" $UNET --size 1024
step end-to-end-1024 150 '^\| (xldm|diffusers|ratio)' "$PY" benchmarks/end_to_end.py --size 1024 --steps 2 \
    --device cuda --workdir "$LOG/model"
step unet-512-bf16 40 "$RATIO" "$PY" $UNET --size 512
step vae-1024-bf16 30 "$RATIO" "$PY" $VAE --dtype bf16
step vae-1024-fp16-checked 30 "$RATIO" "$PY" $VAE --dtype fp16 --checked
step vae-1024-fp16-fallback 30 "$RATIO" "$PY" $VAE --dtype fp16 --checked --overflow
step unet-1024-bf16-flash 40 "$RATIO" "$PY" $UNET --size 1024 --sdpa flash
step unet-1024-bf16-efficient 40 "$RATIO" "$PY" $UNET --size 1024 --sdpa efficient
step unet-1024-bf16-compile 150 "$RATIO" "$PY" $UNET --size 1024 --repeats 3 --compile

echo
echo "xldm on $DEVICE, torch $TORCH; $(($(date +%s) - START)) s in all; logs in $LOG"
echo "ratios are xldm / diffusers (< 1: xldm is faster), measured side by side on the same random weights"
echo "| step | result | time | status |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
rm -rf "$LOG/model"  # the random model (7 GB); the logs stay
exit $FAILED
