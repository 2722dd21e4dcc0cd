#!/usr/bin/env bash
# Retrain xldm's bundled default model from scratch (issue 5): SDXL's design in miniature on the emoji dataset.
#
#   scripts/train_default.sh [--v2] [--dry-run] OUT_DIR
#
# --v2: the second generation (xldm.config.DEFAULT_BASE_V2 / DEFAULT_REFINER_V2; presets default-*-v2 for stages 3-4b):
# after composing, the init files' text encoders are pruned to the tokens of the captions and of every CLDR emoji
# name and keyword (scripts/default_model.py prune-vocab; NAMES_JSON=emojibase-data's en/data.json, default: the
# one datasets/emoji.py fetched into its npm cache), and the larger UNets train on them.  scripts/train_default_v2.sh
# runs this with a log file; scripts/train_gpu_chunks.sh in chunks of under 10 minutes.
# --dry-run: print each stage's command (and whether it is done) instead of running anything.
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
# (a smoke run: all steps 2, CHECKPOINT_EVERY=1).  To stop, send SIGTERM (kill, timeout, a logout) to the process
# group: each running stage checkpoints the step it is on, and the next run resumes there.  The same OUT_DIR, seed
# and thread counts give the same weights (all randomness is seeded by the presets; the shipped weights used the
# defaults).
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
# The whole script is one block, read before it runs: editing the file while a run is under way (hours) cannot
# change what that run executes.
{

V2=0 DRY=0
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --v2) V2=1 ;;
        --dry-run) DRY=1 ;;
        *) echo "$0: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ $# -ne 1 ]]; then
    echo "usage: $0 [--v2] [--dry-run] OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
export OMP_NUM_THREADS=${XLDM_THREADS:-1} MKL_NUM_THREADS=${XLDM_THREADS:-1}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)  # the repository: datasets/ and scripts/
log() { echo "[$(date '+%F %T')] $*"; }
# run CMD...: run it, or with --dry-run print it
run() {
    if [[ $DRY == 1 ]]; then echo "  would run: $*"; else "$@"; fi
}
done_mark() { [[ $DRY == 1 ]] || touch "$1"; }
V=""  # preset suffix of stages 3-4b
SOURCES=twitter,google MULTI_ASPECT=4000 LOW_RES=2000  # the dataset: image sets, multi-aspect and low-res samples
if [[ $V2 == 1 ]]; then
    # the second generation adds Fluent Emoji (MIT) and the blob set (Apache-2.0): 1.7x the glyphs, and the
    # multi-aspect and low-res samples grow with them
    V="-v2" SOURCES=twitter,google,fluent,blob MULTI_ASPECT=6800 LOW_RES=3400
fi
# Stages that do not depend on each other (text encoders and autoencoder; base and refiner) run side by side when
# the CPU has a core for each (PARALLEL=auto, the default: `nproc` without OMP_NUM_THREADS, which it would report;
# PARALLEL=0: one after the other).  Each keeps its thread count, so the weights do not change.
PARALLEL=${PARALLEL:-auto}
if [[ $PARALLEL == auto ]]; then
    PARALLEL=0
    CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    (( CORES >= 2 * ${XLDM_THREADS:-1} )) \
        && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && PARALLEL=1
    log "PARALLEL=$PARALLEL ($CORES cores)"
fi

# 0. dataset -------------------------------------------------------------------------------------------------
if [[ -n "${EMOJI_DATA:-}" ]]; then
    EMOJI=$(cd "$EMOJI_DATA" && pwd)
else
    EMOJI="$OUT/data/emoji"
    if [[ ! -f "$OUT/data/emoji.done" ]]; then
        log "building the emoji dataset in $EMOJI"
        [[ $DRY == 1 ]] || rm -rf "$EMOJI"
        run "$PY" "$ROOT/datasets/emoji.py" "$EMOJI" --sources "$SOURCES" --multi-aspect "$MULTI_ASPECT" \
            --low-res "$LOW_RES" --seed 0
        done_mark "$OUT/data/emoji.done"
    fi
fi
if [[ ! -f "$OUT/data/train.done" ]]; then
    log "splitting off the held-out names into $OUT/data/train"
    run "$PY" "$ROOT/datasets/split.py" "$EMOJI" "$OUT/data/train"
    done_mark "$OUT/data/train.done"
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
    local last
    last=$(ls "$dir/checkpoints" 2>/dev/null | grep -E '^step_[0-9]+' | sort | tail -n 1 || true)
    log "$name: xldm train --preset $preset (resumes from ${last:-no checkpoint yet} in $dir/checkpoints)"
    run xldm train --preset "$preset" --data "$data" --out "$dir" --resume --no-progress "${extra[@]}" "$@"
    done_mark "$dir/DONE"
    [[ $DRY == 1 ]] || log "$name: finished"
}

# compose KIND OUT_FILE [flags...]: the init file of a stage (v2: then its text encoders' vocabulary pruned)
compose() {
    local kind=$1 file=$2
    shift 2
    [[ -f "$file" ]] && return
    if [[ $V2 == 0 ]]; then
        run "$PY" "$ROOT/scripts/default_model.py" compose "$kind" --out "$file" "$@"
        return
    fi
    local full
    full="$(dirname "$file")/full/$(basename "$file")"
    [[ -f "$full" ]] || run "$PY" "$ROOT/scripts/default_model.py" compose "$kind" --out "$full" "$@"
    local names=${NAMES_JSON:-${XDG_CACHE_HOME:-$HOME/.cache}/xldm/npm/emojibase-data-17.0.0/package/en/data.json}
    if [[ $DRY == 0 && ! -f "$names" ]]; then
        echo "$0: no emojibase-data en/data.json at $names (the CLDR names to keep); set NAMES_JSON" >&2
        exit 1
    fi
    run "$PY" "$ROOT/scripts/default_model.py" prune-vocab "$full" --out-dir "$(dirname "$file")" \
        --data "$OUT/data/train" --names "$names"
}

# side_by_side FN1 FN2: run two stage functions at once, each output line prefixed with its name (PARALLEL=1 and
# not --dry-run), else one after the other; fails when either fails, after both have stopped
side_by_side() {
    if [[ $PARALLEL == 0 || $DRY == 1 ]]; then
        "$1"
        "$2"
        return
    fi
    log "running $1 and $2 side by side"
    "$1" > >(sed -u "s/^/[$1] /") 2>&1 &
    local first=$! rc1=0 rc2=0
    "$2" > >(sed -u "s/^/[$2] /") 2>&1 &
    local second=$!
    wait "$first" || rc1=$?
    wait "$second" || rc2=$?
    if (( rc1 != 0 || rc2 != 0 )); then
        echo "$0: $1 exited with $rc1, $2 with $rc2" >&2
        exit 1
    fi
}

# 1. text encoders (the held-out names are split off inside, and evaluated: clip/final/metrics.json)
text_encoders() { run_stage clip default-clip "$EMOJI" CLIP_STEPS; }
# 2. autoencoder
autoencoder() { run_stage vae default-vae "$OUT/data/train" VAE_STEPS; }
side_by_side text_encoders autoencoder
# 3. base: init file = text encoders (1) + VAE (2) + measured latent scale
compose "default-base$V" "$OUT/init/base.safetensors" --text-encoders "$OUT/clip/final/model.safetensors" \
    --vae "$OUT/vae/final/model.safetensors" --data "$OUT/data/train"
base() { run_stage base "default-base$V" "$OUT/data/train" BASE_STEPS --init "$OUT/init/base.safetensors"; }
# 4. refiner: the bigG-like encoder and the same VAE, with the same latent scale
if [[ ! -f "$OUT/init/refiner.safetensors" ]]; then
    SCALE=1.0
    [[ $DRY == 1 ]] || SCALE=$("$PY" -c "import json, sys; from xldm.weights.io import open_checkpoint; \
print(json.loads(open_checkpoint(sys.argv[1]).metadata['xldm.config'])['vae']['scaling_factor'])" \
        "$OUT/init/base.safetensors")
    compose "default-refiner$V" "$OUT/init/refiner.safetensors" --text-encoders "$OUT/clip/final/model.safetensors" \
        --vae "$OUT/vae/final/model.safetensors" --scaling-factor "$SCALE"
fi
# The refiner's two stages; its second uses FT_THREADS only when it runs alone (beside the base, one core each).
REFINER_FT_THREADS=${FT_THREADS:-2}
[[ $PARALLEL == 1 ]] && REFINER_FT_THREADS=${XLDM_THREADS:-1}
refiner() {
    run_stage refiner "default-refiner$V" "$OUT/data/train" REFINER_STEPS --init "$OUT/init/refiner.safetensors"
    OMP_NUM_THREADS=$REFINER_FT_THREADS MKL_NUM_THREADS=$REFINER_FT_THREADS \
        run_stage refiner-ft "default-refiner$V-ft" "$OUT/data/train" REFINER_FT_STEPS \
        --init "$OUT/refiner/final/model.safetensors" --set "cache_dir=$OUT/cache"
}
side_by_side base refiner
# 3b. the base's second stage, on both cores
OMP_NUM_THREADS=${FT_THREADS:-2} MKL_NUM_THREADS=${FT_THREADS:-2} \
    run_stage base-ft "default-base$V-ft" "$OUT/data/train" BASE_FT_STEPS --init "$OUT/base/final/model.safetensors" \
    --set "cache_dir=$OUT/cache"

# 5. export --------------------------------------------------------------------------------------------------
run "$PY" "$ROOT/scripts/default_model.py" export "$OUT/base-ft/final/model.safetensors" "$OUT/export/base.safetensors"
run "$PY" "$ROOT/scripts/default_model.py" export "$OUT/refiner-ft/final/model.safetensors" \
    "$OUT/export/refiner.safetensors"
[[ $DRY == 1 ]] && { log "dry run: nothing was run"; exit 0; }
log "done. The default model's files:"
ls -l "$OUT/export/base.safetensors" "$OUT/export/refiner.safetensors"
echo "Try: xldm generate \"red heart\" --model $OUT/export/base.safetensors --refiner $OUT/export/refiner.safetensors --out heart.png"
echo "To ship them: copy both into xldm/data/default/ (xldm.config.DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH)."
exit
}
