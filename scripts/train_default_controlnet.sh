#!/usr/bin/env bash
# Train the bundled default base's canny ControlNet (Zhang et al. 2023), shipped as xldm/data/default/default-canny/:
#
#   scripts/train_default_controlnet.sh OUT_DIR [BASE]
#
# 1. data      the emoji training split of scripts/train_default.sh (stage 0: datasets/emoji.py, datasets/split.py);
#              EMOJI_TRAIN=DIR uses an existing split instead of building one
# 2. train     `xldm train --preset default-controlnet --init BASE --control canny`: the base frozen, the ControlNet
#              from its encoder, canny maps of each training crop as control images (resumes from OUT/run/checkpoints
#              when run again; a finished run is skipped)
# 3. export    the ControlNet in fp16 to OUT/export/default-canny/ (a diffusers folder); copy it to xldm/data/default/
# BASE defaults to the bundled base.  XLDM_THREADS (default 2) sets the CPU threads; MIXED_PRECISION (default bf16:
# 1.8x faster on CPUs with AVX512-BF16, and on GPUs) the autocast; CONTROLNET_STEPS overrides the preset's steps (a
# smoke run: CONTROLNET_STEPS=2).  Measured on the 2-core CPU: ~0.35-0.5 s per step of 8 images (bf16),
# 9000 steps ~75 min.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [BASE]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${2:-$ROOT/xldm/data/default/base.safetensors}
export OMP_NUM_THREADS=${XLDM_THREADS:-2} MKL_NUM_THREADS=${XLDM_THREADS:-2}
PY=${PYTHON:-python}
log() { echo "[$(date '+%F %T')] $*"; }

if [[ -n "${EMOJI_TRAIN:-}" ]]; then
    DATA=$(cd "$EMOJI_TRAIN" && pwd)
else
    DATA="$OUT/data/train"
    if [[ ! -f "$OUT/data/train.done" ]]; then
        log "building the emoji dataset and its training split in $OUT/data"
        rm -rf "$OUT/data/emoji" "$DATA"
        "$PY" "$ROOT/datasets/emoji.py" "$OUT/data/emoji" --multi-aspect 4000 --low-res 2000 --seed 0
        "$PY" "$ROOT/datasets/split.py" "$OUT/data/emoji" "$DATA"
        touch "$OUT/data/train.done"
    fi
fi

if [[ ! -f "$OUT/run/final/controlnet/config.json" ]]; then
    extra=()
    [[ -n "${CONTROLNET_STEPS:-}" ]] && extra+=(--steps "$CONTROLNET_STEPS")
    log "xldm train --preset default-controlnet (resumes from $OUT/run/checkpoints if any)"
    xldm train --preset default-controlnet --init "$BASE" --control canny --data "$DATA" --out "$OUT/run" --resume \
        --mixed-precision "${MIXED_PRECISION:-bf16}" --no-progress "${extra[@]}"
fi

log "export: fp16 ControlNet into $OUT/export/default-canny"
mkdir -p "$OUT/export/default-canny"
cp "$OUT/run/final/controlnet/config.json" "$OUT/export/default-canny/"
"$PY" - "$OUT/run/final/controlnet/diffusion_pytorch_model.safetensors" \
    "$OUT/export/default-canny/diffusion_pytorch_model.safetensors" <<'PYEOF'
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

with safe_open(sys.argv[1], "pt") as f:
    tensors = {k: f.get_tensor(k).to(torch.float16) for k in f.keys()}
    metadata = f.metadata()
save_file(tensors, sys.argv[2], metadata=metadata)
PYEOF
log "done: cp -r $OUT/export/default-canny xldm/data/default/"
