#!/usr/bin/env bash
# Retrain xldm's bundled default cascade (issue 6) from scratch: 32 -> 64 -> 128 pixel-space stages on the emoji
# data, sharing the default latent model's frozen bigG-shaped text encoder.
#
#   scripts/train_default_cascade.sh OUT_DIR [DEFAULT_RUN_DIR]
#
# DEFAULT_RUN_DIR is a scripts/train_default.sh run whose data (DEFAULT_RUN_DIR/data/train, the held-out names
# split off) and text encoders (DEFAULT_RUN_DIR/clip/final) are used; without it the dataset is built here and
# the encoders are those of the installed default model (xldm/data/default/base.safetensors).
# Stages (`xldm train` presets in xldm/train/config.py; each resumes from its checkpoints when run again):
#   1. cascade-base-32   text -> 32^2 pixels
#   2. cascade-sr-64     32^2 -> 64^2, noise-augmented low-res input
#   3. cascade-sr-128    64^2 -> 128^2, trained on 64^2 crops
#   4. export            OUT/export/stage_{0,1,2}.safetensors, fp16, UNets only (the encoder ships with the
#                        default model; `xldm generate --cascade default` puts them together)
# XLDM_THREADS (default 1) sets the CPU threads.  Same OUT_DIR, encoders, seed and threads -> same weights.
#
# Measured on the 2-core CPU machine this was developed on, XLDM_THREADS=1, the other core training the default
# latent model at the same time:
#   stage            batch   s/step   steps   time
#   cascade-base-32    32     2.3     1500    ~60 min
#   cascade-sr-64      16     1.3     1200    ~26 min
#   cascade-sr-128     16     0.9     1000    ~15 min   (64^2 crops)
# The learning rate is constant after warm-up, so a run stopped early and resumed with more steps gives the
# same weights as one run with those steps.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 OUT_DIR [DEFAULT_RUN_DIR]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # the repository: datasets/ and scripts/
export OMP_NUM_THREADS=${XLDM_THREADS:-1} MKL_NUM_THREADS=${XLDM_THREADS:-1}
PY=${PYTHON:-python}
log() { echo "[$(date '+%F %T')] $*"; }

if [[ $# -eq 2 ]]; then
    RUN=$(cd "$2" && pwd)
    DATA="$RUN/data/train"
    # the encoders as the default model ships them (fp16), so that training sees what generation will use
    if [[ ! -f "$OUT/encoders.safetensors" ]]; then
        "$PY" "$ROOT/scripts/default_model.py" export "$RUN/clip/final/model.safetensors" "$OUT/encoders.safetensors"
    fi
    ENCODERS="$OUT/encoders.safetensors"
else
    DATA="$OUT/data/train"
    if [[ ! -f "$OUT/data/train.done" ]]; then
        log "building the emoji dataset in $OUT/data/emoji"
        rm -rf "$OUT/data/emoji"
        "$PY" "$ROOT/datasets/emoji.py" "$OUT/data/emoji" --multi-aspect 4000 --low-res 2000 --seed 0
        "$PY" "$ROOT/datasets/split.py" "$OUT/data/emoji" "$DATA"
        touch "$OUT/data/train.done"
    fi
    ENCODERS=default
fi

for preset in cascade-base-32 cascade-sr-64 cascade-sr-128; do
    dir="$OUT/$preset"
    if [[ -f "$dir/DONE" ]]; then
        log "$preset: done already"
        continue
    fi
    log "$preset: xldm train --preset $preset (resumes from $dir/checkpoints if any)"
    xldm train --preset "$preset" --data "$DATA" --out "$dir" --text-encoders-from "$ENCODERS" --resume --no-progress
    touch "$dir/DONE"
done

# fp16 stage_N.safetensors in cascade order, without text encoders (xldm.cascade.load_cascade takes the default
# model's when loading them)
"$PY" - "$OUT/export" "$OUT/cascade-base-32/final/stage.safetensors" "$OUT/cascade-sr-64/final/stage.safetensors" \
    "$OUT/cascade-sr-128/final/stage.safetensors" <<'EOF'
import sys

import torch

from xldm.cascade import load_cascade, save_cascade

stages = load_cascade(sys.argv[2:], dtype=torch.float32)
for path in save_cascade(stages, sys.argv[1], dtype=torch.float16, text_encoders="none"):
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
EOF
log "done:"
ls -l "$OUT"/export/stage_*.safetensors
echo "To ship them: copy them into xldm/data/cascade/ (xldm.cascade.DEFAULT_CASCADE_DIR)."
