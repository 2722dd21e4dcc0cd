#!/usr/bin/env bash
# Distil the bundled default base into its 4-step student (adversarial diffusion distillation, Sauer et al. 2023):
#
#   scripts/train_default_turbo.sh OUT_DIR [TEACHER]
#
# 1. data      the teacher's own 30-step images (cfg 5) of the emoji names below, two seeds each: the "real" images
#              of the adversarial term (no dataset download); skipped when OUT/data.done exists
# 2. distil    `xldm train --preset default-turbo --teacher TEACHER` (resumes from OUT/run/checkpoints when run
#              again; a finished run is skipped)
# 3. export    the student's UNet alone, fp16, to OUT/export/turbo.safetensors (the VAE and text encoders are the
#              base's: `xldm generate --model default-turbo` puts them together); copy it to xldm/data/default/
# TEACHER defaults to the bundled base (xldm/data/default/base.safetensors).  XLDM_THREADS (default 2) sets the CPU
# threads; TURBO_STEPS overrides the preset's steps (a smoke run: TURBO_STEPS=2).  Runs unchanged on a CUDA machine.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [TEACHER]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEACHER=${2:-$ROOT/xldm/data/default/base.safetensors}
export OMP_NUM_THREADS=${XLDM_THREADS:-2} MKL_NUM_THREADS=${XLDM_THREADS:-2}
PY=${PYTHON:-python}
log() { echo "[$(date '+%F %T')] $*"; }

if [[ ! -f "$OUT/data.done" ]]; then
    log "teacher images into $OUT/data"
    rm -rf "$OUT/data" && mkdir -p "$OUT/data"
    "$PY" - "$TEACHER" "$OUT/data" <<'PYEOF'
import sys
from pathlib import Path

import xldm

names = ["red heart", "blue heart", "green heart", "yellow heart", "smiling face", "grinning face", "crying face",
         "angry face", "sleeping face", "thinking face", "face with tears of joy", "winking face", "pizza", "banana",
         "red apple", "green apple", "cherries", "watermelon", "hamburger", "ice cream", "birthday cake", "ghost",
         "skull", "alien", "robot", "unicorn", "dog face", "cat face", "fox", "frog", "penguin", "octopus", "rocket",
         "star", "sun", "crescent moon", "rainbow", "fire", "snowflake", "thumbs up", "waving hand", "clapping hands",
         "red circle", "blue square", "flag of japan", "flag of france", "house", "christmas tree"]
pipe = xldm.load(sys.argv[1], device="cpu")
out = Path(sys.argv[2])
for i, name in enumerate(names * 2):
    pipe(name, steps=30, cfg=5.0, seed=1000 + i).images[0].save(out / f"{i:03d}.png")
    (out / f"{i:03d}.txt").write_text(name + "\n")
PYEOF
    touch "$OUT/data.done"
fi

if [[ ! -f "$OUT/run/final/model.safetensors" ]]; then
    resume=()
    [[ -d "$OUT/run/checkpoints" ]] && resume=(--resume)
    log "distilling (default-turbo) into $OUT/run ${resume[*]}"
    "$PY" -m xldm.cli train --preset default-turbo --teacher "$TEACHER" --data "$OUT/data" --out "$OUT/run" \
        ${TURBO_STEPS:+--steps "$TURBO_STEPS"} --no-progress "${resume[@]}"
fi

log "exporting the student's UNet to $OUT/export/turbo.safetensors"
mkdir -p "$OUT/export"
"$PY" - "$OUT/run/final/model.safetensors" "$OUT/export/turbo.safetensors" <<'PYEOF'
import sys

import torch

from xldm.models.components import Components
from xldm.weights.load import load_model
from xldm.weights.save import save_single_file

student = load_model(sys.argv[1], components=["unet"], dtype=torch.float32)
save_single_file(Components(config=student.config, unet=student.unet), sys.argv[2], dtype=torch.float16)
PYEOF
log "done: cp $OUT/export/turbo.safetensors $ROOT/xldm/data/default/"
