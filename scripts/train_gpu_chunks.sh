#!/usr/bin/env bash
# The second-generation default model's training (scripts/train_default_v2.sh) on one GPU in chunks of under ten
# minutes each, for machines lent with a per-job time limit:
#
#   scripts/train_gpu_chunks.sh [--dry-run] OUT_DIR
#
# One call is one chunk: the stages run under `timeout CHUNK_SECONDS` (default 540 s, then SIGTERM, SIGKILL 20 s
# later: under 10 minutes in all) and the state of every stage is printed at the end.  Stages resume from their
# checkpoints, so calling it again continues; progress since a stage's last checkpoint is lost when a chunk ends,
# so keep CHECKPOINT_EVERY (steps) to well under a chunk (the presets checkpoint every 250 steps).  Prints
# "all stages done" once the export is written.  Defaults for a GPU machine: XLDM_THREADS=FT_THREADS=4 (the data
# loading threads).  A machine without network access needs a dataset build (EMOJI_DATA) and NAMES_JSON copied to it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FLAGS=()
if [[ ${1:-} == --dry-run ]]; then
    FLAGS+=(--dry-run)
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--dry-run] OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
CHUNK=${CHUNK_SECONDS:-540}
export XLDM_THREADS=${XLDM_THREADS:-4} FT_THREADS=${FT_THREADS:-4}

status() {
    local stage dir last
    for stage in clip vae base base-ft refiner refiner-ft; do
        dir="$OUT/$stage"
        if [[ -f "$dir/DONE" ]]; then
            echo "  $stage: done"
        elif last=$(ls "$dir/checkpoints" 2>/dev/null | grep -E '^step_[0-9]+' | sort | tail -n 1) && [[ -n $last ]]; then
            echo "  $stage: at ${last%%.*} (resumes from there)"
        elif [[ -d "$dir" ]]; then
            echo "  $stage: started, no checkpoint yet"
        else
            echo "  $stage: not started"
        fi
    done
}

start=$(date +%s)
echo "[$(date '+%F %T')] chunk of at most ${CHUNK}s on $OUT"
set +e
timeout --signal=TERM --kill-after=20 "$CHUNK" "$ROOT/scripts/train_default_v2.sh" "${FLAGS[@]}" "$OUT"
rc=$?
set -e
echo "[$(date '+%F %T')] chunk ended after $(( $(date +%s) - start ))s (exit status $rc); stages:"
status
if [[ $rc == 0 && ${#FLAGS[@]} == 0 ]]; then
    echo "all stages done: $OUT/export/base.safetensors, $OUT/export/refiner.safetensors"
elif [[ $rc == 124 || $rc == 137 ]]; then
    echo "time is up for this chunk; run $0 $OUT again to continue"
    exit 0
fi
exit "$rc"
