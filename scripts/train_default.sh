#!/usr/bin/env bash
# Retrain xldm's bundled default model from scratch (issue 5): SDXL's design in miniature on the emoji dataset.
#
#   scripts/train_default.sh OUT_DIR
#
# Stages (each an `xldm train` preset, default-*; each resumes from its checkpoints when the script is run again,
# and a finished stage is skipped):
#   0. dataset      datasets/emoji.py OUT/data/emoji (Twemoji + Noto, CLDR captions), then datasets/split.py:
#                   OUT/data/train without the held-out emoji names (xldm.train.data.is_heldout, ~3 %)
#   1. default-clip both text encoders, contrastive pre-training against a throw-away image tower (64 px)
#   2. default-vae  the KL autoencoder (8x down, 4 channels), L1 + KL, EMA of the weights
#   3. default-base the base UNet on ~128^2 aspect buckets; text encoders (1) and VAE (2) frozen, taken from an
#                   init file that also carries the VAE's measured latent scale (scripts/default_model.py compose)
#  3b. default-base-ft  the base's second stage from (3)'s weights: cached VAE posteriors and text embeddings
#                   (OUT/cache), zoomed crops, min-SNR weighting
#   4. default-refiner  the refiner UNet on the 200 low-noise steps, bigG-like encoder and VAE frozen
#  4b. default-refiner-ft  the refiner's second stage from (4)'s weights, as 3b
#   5. export       fp16 single files OUT/export/base.safetensors and OUT/export/refiner.safetensors
#                   (scripts/default_model.py export)
#
# Environment: EMOJI_DATA=DIR uses an existing datasets/emoji.py build instead of building one;
# XLDM_THREADS (default 1) sets the CPU threads, FT_THREADS (default 2) those of stages 3b and 4b; CLIP_STEPS,
# VAE_STEPS, BASE_STEPS, BASE_FT_STEPS, REFINER_STEPS, REFINER_FT_STEPS and CHECKPOINT_EVERY override the presets
# (a smoke run: all steps 2, CHECKPOINT_EVERY=1).  The same OUT_DIR, seed and thread counts give the same weights
# (all randomness is seeded by the presets; the shipped weights used the defaults).
#
# Measured on the 2-core CPU machine this was developed on; stages 1-4 with XLDM_THREADS=1 and the other core busy
# (the cascade's training, tests), 3b and 4b on both cores (cached latents after the first epoch):
#   stage               batch   it/s     steps    time
#   dataset build                                  ~5 min (npm download + 13,572 images)
#   default-clip         128    1.67      3000     ~30 min
#   default-vae            8    0.43-0.7  2500     ~75 min
#   default-base          16    1.4       7000     ~85 min
#   default-base-ft       16    2-6      18000     ~72 min
#   default-refiner       16    1.6       1000     ~11 min
#   default-refiner-ft    16    1.4-6     3000     ~19 min
#   export                                          <1 min
#   total                                         ~5 h
# On a GPU (`--device cuda` is picked automatically) every stage takes minutes.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
export OMP_NUM_THREADS=${XLDM_THREADS:-1} MKL_NUM_THREADS=${XLDM_THREADS:-1}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # the repository: datasets/ and scripts/
log() { echo "[$(date '+%F %T')] $*"; }

# 0. dataset -------------------------------------------------------------------------------------------------
if [[ -n "${EMOJI_DATA:-}" ]]; then
    EMOJI=$(cd "$EMOJI_DATA" && pwd)
else
    EMOJI="$OUT/data/emoji"
    if [[ ! -f "$OUT/data/emoji.done" ]]; then
        log "building the emoji dataset in $EMOJI"
        rm -rf "$EMOJI"
        "$PY" "$ROOT/datasets/emoji.py" "$EMOJI" --multi-aspect 4000 --low-res 2000 --seed 0
        touch "$OUT/data/emoji.done"
    fi
fi
if [[ ! -f "$OUT/data/train.done" ]]; then
    log "splitting off the held-out names into $OUT/data/train"
    "$PY" "$ROOT/datasets/split.py" "$EMOJI" "$OUT/data/train"
    touch "$OUT/data/train.done"
fi

# One training stage: run_stage NAME PRESET DATA [extra xldm train flags...]
run_stage() {
    local name=$1 preset=$2 data=$3 steps_var=$4
    shift 4
    local dir="$OUT/$name"
    if [[ -f "$dir/DONE" ]]; then
        log "$name: done already ($dir/final/model.safetensors)"
        return
    fi
    local extra=()
    [[ -n "${!steps_var:-}" ]] && extra+=(--steps "${!steps_var}")
    [[ -n "${CHECKPOINT_EVERY:-}" ]] && extra+=(--checkpoint-every "$CHECKPOINT_EVERY")
    log "$name: xldm train --preset $preset (resumes from $dir/checkpoints if any)"
    xldm train --preset "$preset" --data "$data" --out "$dir" --resume --no-progress "${extra[@]}" "$@"
    touch "$dir/DONE"
    log "$name: finished"
}

# 1. text encoders (the held-out names are split off inside, and evaluated: clip/final/metrics.json)
run_stage clip default-clip "$EMOJI" CLIP_STEPS
# 2. autoencoder
run_stage vae default-vae "$OUT/data/train" VAE_STEPS
# 3. base: init file = text encoders (1) + VAE (2) + measured latent scale
if [[ ! -f "$OUT/init/base.safetensors" ]]; then
    "$PY" "$ROOT/scripts/default_model.py" compose default-base --text-encoders "$OUT/clip/final/model.safetensors" \
        --vae "$OUT/vae/final/model.safetensors" --data "$OUT/data/train" --out "$OUT/init/base.safetensors"
fi
run_stage base default-base "$OUT/data/train" BASE_STEPS --init "$OUT/init/base.safetensors"
OMP_NUM_THREADS=${FT_THREADS:-2} MKL_NUM_THREADS=${FT_THREADS:-2} \
    run_stage base-ft default-base-ft "$OUT/data/train" BASE_FT_STEPS --init "$OUT/base/final/model.safetensors" \
    --set "cache_dir=$OUT/cache"
# 4. refiner: the bigG-like encoder and the same VAE, with the same latent scale
if [[ ! -f "$OUT/init/refiner.safetensors" ]]; then
    SCALE=$("$PY" -c "import json, sys; from xldm.weights.io import open_checkpoint; \
print(json.loads(open_checkpoint(sys.argv[1]).metadata['xldm.config'])['vae']['scaling_factor'])" \
        "$OUT/init/base.safetensors")
    "$PY" "$ROOT/scripts/default_model.py" compose default-refiner --text-encoders "$OUT/clip/final/model.safetensors" \
        --vae "$OUT/vae/final/model.safetensors" --scaling-factor "$SCALE" --out "$OUT/init/refiner.safetensors"
fi
run_stage refiner default-refiner "$OUT/data/train" REFINER_STEPS --init "$OUT/init/refiner.safetensors"
OMP_NUM_THREADS=${FT_THREADS:-2} MKL_NUM_THREADS=${FT_THREADS:-2} \
    run_stage refiner-ft default-refiner-ft "$OUT/data/train" REFINER_FT_STEPS \
    --init "$OUT/refiner/final/model.safetensors" --set "cache_dir=$OUT/cache"

# 5. export --------------------------------------------------------------------------------------------------
"$PY" "$ROOT/scripts/default_model.py" export "$OUT/base-ft/final/model.safetensors" "$OUT/export/base.safetensors"
"$PY" "$ROOT/scripts/default_model.py" export "$OUT/refiner-ft/final/model.safetensors" "$OUT/export/refiner.safetensors"
log "done. The default model's files:"
ls -l "$OUT/export/base.safetensors" "$OUT/export/refiner.safetensors"
echo "Try: xldm generate \"red heart\" --model $OUT/export/base.safetensors --refiner $OUT/export/refiner.safetensors --out heart.png"
echo "To ship them: copy both into xldm/data/default/ (xldm.config.DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH)."
