#!/usr/bin/env bash
# Train the bundled default model's second generation in a way that survives logouts and restarts:
#
#   scripts/train_default_v2.sh [--background] [--dry-run] OUT_DIR
#
# Runs `scripts/train_default.sh --v2 OUT_DIR` (every stage, pruned text-encoder vocabulary, the default-*-v2 UNets),
# then the base's 4-step student and its canny ControlNet from that base (scripts/train_default_turbo.sh OUT_DIR/turbo,
# scripts/train_default_controlnet.sh OUT_DIR/controlnet: the first generation's were made for another UNet), with
# all output appended to OUT_DIR/train.log, one run at a time per OUT_DIR (a lock, OUT_DIR/.lock).  Every
# stage resumes from its last checkpoint and a finished stage is skipped, so running the same command again, on
# the same or another day, continues where the last run stopped; the same OUT_DIR, seed and thread counts give the
# same weights.  On a CUDA machine `xldm train` picks the GPU itself (TrainConfig.device "auto"); nothing else
# changes.  --background: detach (nohup) and print the process id and the log; follow it with `tail -f`.
# The environment of scripts/train_default.sh applies (EMOJI_DATA, NAMES_JSON, XLDM_THREADS, FT_THREADS, *_STEPS,
# CHECKPOINT_EVERY).  A machine without network access needs EMOJI_DATA (a datasets/emoji.py build) and NAMES_JSON.
set -euo pipefail
# The whole script is one block, read before it runs: editing the file while a run is under way cannot change what
# that run executes.
{

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BACKGROUND=0 FLAGS=()
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --background) BACKGROUND=1 ;;
        --dry-run) FLAGS+=(--dry-run) ;;
        *) echo "$0: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--background] [--dry-run] OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
LOG="$OUT/train.log"

if [[ $BACKGROUND == 1 ]]; then
    nohup "$0" "${FLAGS[@]}" "$OUT" >/dev/null 2>&1 &
    echo "training in the background: pid $!, log $LOG (run the same command again to resume after a stop)"
    exit 0
fi

exec 9>"$OUT/.lock"
if ! flock -n 9; then
    echo "$0: another run is using $OUT (lock $OUT/.lock); follow it in $LOG" >&2
    exit 1
fi
echo "[$(date '+%F %T')] train_default_v2: start on $(hostname)" >>"$LOG"
set +e
"$ROOT/scripts/train_default.sh" --v2 "${FLAGS[@]}" "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [[ $rc == 0 && ${#FLAGS[@]} == 0 ]]; then  # each resumes, or skips what it finished, when run again
    "$ROOT/scripts/train_default_turbo.sh" "$OUT/turbo" "$OUT/export/base.safetensors" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
fi
if [[ $rc == 0 && ${#FLAGS[@]} == 0 ]]; then
    EMOJI_TRAIN="$OUT/data/train" "$ROOT/scripts/train_default_controlnet.sh" "$OUT/controlnet" \
        "$OUT/export/base.safetensors" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
fi
if [[ ${#FLAGS[@]} != 0 ]]; then
    echo "then: scripts/train_default_turbo.sh $OUT/turbo $OUT/export/base.safetensors"
    echo "then: EMOJI_TRAIN=$OUT/data/train scripts/train_default_controlnet.sh $OUT/controlnet $OUT/export/base.safetensors"
fi
set -e
echo "[$(date '+%F %T')] train_default_v2: exit status $rc" >>"$LOG"
exit "$rc"
}
