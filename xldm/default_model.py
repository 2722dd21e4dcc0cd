"""The bundled default model: SDXL's design in miniature, trained by xldm on the emoji dataset (issue 5).

Everything that makes the default model what it is lives here: the architecture presets (`DEFAULT_BASE`,
`DEFAULT_REFINER`), where the shipped weights sit (`DEFAULT_MODEL_PATH`, `DEFAULT_REFINER_PATH`), the training
presets of its stages (`default-clip`, `default-vae`, `default-base`, `default-base-ft`, `default-refiner`,
`default-refiner-ft`, registered into `xldm.train.config.TRAIN_PRESETS`), the held-out caption split, and the glue between stages that
`scripts/train_default.sh` calls (`python -m xldm.default_model split | compose | export`).

The design follows SDXL (Podell et al. 2023) at a size whose two fp16 single files fit 25 MB together:

* two CLIP text encoders of the two SDXL shapes (Sec. 2.1): a narrower OpenAI-CLIP-L-like one (quick_gelu, no
  projection) and a wider, deeper OpenCLIP-bigG-like one (exact gelu, pooled `text_projection`, pad id 0);
  both keep CLIP's full 49408-token BPE vocabulary, so the shipped tokenizer works unchanged (the token tables
  are most of the text encoders' weight);
* a KL autoencoder with 8x downsampling (three downsamplers) and 4 latent channels (Sec. 2.4);
* a base UNet with SDXL's structure: three levels, no attention at the highest resolution, heterogeneous
  transformer depth (0, 1, 2) and a deeper middle (SDXL: (0, 2, 10)); the vector conditioning is the pooled
  bigG embedding plus Fourier-embedded micro-conditioning (Sec. 2.2; 32 channels per scalar instead of 256);
* a refiner with SDXL's refiner structure: four levels, attention on the two middle ones only, conditioned on
  the bigG encoder alone and on the aesthetic score (Sec. 2.5);
* native size 128 x 128 (latent 16 x 16); the training buckets have about 128^2 pixels.

The latent scale factor of `DEFAULT_VAE` is a placeholder: `compose` measures 1 / std of the trained VAE's
latents (the LDM recipe, Rombach et al. 2022, Sec. 4.3.2 / App. G) and writes the measured value into the
config stored in every later file's header, which is what the loader reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from xldm.config import (
    BASE_MICRO_CONDITIONING,
    PRESETS,
    REFINER_MICRO_CONDITIONING,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

from xldm.config import (  # noqa: E402,F401  (moved to xldm.config)
    DEFAULT_BASE, DEFAULT_BIGG, DEFAULT_CLIP_L, DEFAULT_MODEL_PATH, DEFAULT_REFINER, DEFAULT_REFINER_PATH, DEFAULT_VAE,
)

MODEL_PRESETS: dict[str, ModelConfig] = {"default-base": DEFAULT_BASE, "default-refiner": DEFAULT_REFINER}

# The shipped fp16 single files (package data; absent until a trained model is copied there).
DEFAULT_MODEL_DIR = DEFAULT_MODEL_PATH.parent
SIZE_BUDGET_BYTES = 25_000_000  # issue 5: base file + refiner file <= 25 MB

# --- held-out captions -------------------------------------------------------------------------------------

HELDOUT_PER_MILLE = 30  # ~3 % of the emoji names never enter any training stage


def caption_group(caption: str) -> str:
    """The emoji name a caption is about (its text before the first comma): all styles, skin tones and
    placements of one name are held out together, so a held-out caption's words were never paired with its
    picture."""
    return caption.split(",", 1)[0].strip().lower()


def is_heldout(caption: str) -> bool:
    digest = hashlib.sha256(("xldm-heldout:" + caption_group(caption)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


# --- training presets of the stages ------------------------------------------------------------------------


def default_train_presets() -> dict[str, Any]:
    """`TrainConfig` presets of the stages.  Rates, steps and batch sizes are our choices for a small model
    trained from scratch on a 2-core CPU in a few hours (measured timings: scripts/train_default.sh)."""
    from xldm.train.config import TrainConfig

    small = dict(weight_decay=0.0, lr_schedule="cosine", min_lr_ratio=0.1, keep_checkpoints=2,
                 checkpoint_every=250)
    # The second stages' augmentation (see default-base-ft).
    augment = dict(downscale=0.15, downscale_sides=(8, 24), zoom_crops=0.3, zoom_max=1.6)
    return {
        # Contrastive pre-training of both text encoders against a throw-away image tower (Radford et al. 2021):
        # 64 px images (the tower only needs colours, shapes, layout); CLIP's weight decay 0.2 (Radford et al.,
        # App. F: 0.2); batch 128 as a compromise between negatives per step and CPU time.
        "default-clip": TrainConfig(model="default-base", task="clip", resolution=64, batch_size=128, steps=3000,
                                    lr=1e-3, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05,
                                    weight_decay=0.2, adam_beta2=0.98, adam_eps=1e-6, ema_decay=0.0,
                                    checkpoint_every=250, keep_checkpoints=2),
        # The autoencoder (SDXL Sec. 2.4: with an EMA of its weights).  ldm's loss weights (kl 1e-6) and Adam betas
        # (0.5, 0.9); the patch discriminator stays off (disc_start beyond the run): on this budget it costs a
        # third of the step time and the L1 reconstruction of flat emoji colours is what the base model needs.
        "default-vae": TrainConfig(model="default-base", task="vae", resolution=128, bucket_step=32, batch_size=8,
                                   steps=2500, lr=5e-4, warmup_steps=100, adam_beta1=0.5, adam_beta2=0.9,
                                   kl_weight=1e-6, disc_start=10**9, ema_decay=0.999, grad_clip=0.0, **small),
        # The base UNet on ~128^2 aspect buckets (sides in multiples of 32 = 8 x 2^(3 - 1): three UNet levels),
        # frozen text encoders and VAE from the stages before (--init), offset noise 0.05 (SDXL Sec. 2.5),
        # 10 % caption dropout for classifier-free guidance (SD model card).
        "default-base": TrainConfig(model="default-base", resolution=128, bucket_step=32, batch_size=16,
                                    steps=7000, lr=5e-4, warmup_steps=200, offset_noise=0.05, text_dropout=0.1,
                                    ema_decay=0.999, init_components=("vae", "text_encoders"), **small),
        # The base's second stage, from the first one's weights (SDXL also trains its base in stages, Sec. 2.5:
        # 256^2, then 512^2, then multi-aspect at ~1024^2).  Cached VAE posteriors and text embeddings
        # (`--set cache_dir=...`: the VAE encoder was 2/3 of a stage-one step on the CPU), so three times the
        # samples per hour.  Augmentation (TrainConfig.downscale, zoom_crops) so that the micro-conditioning
        # carries information the 16x16 latent can see: 15 % of the images shrunk to 8-24 px first (the dataset's
        # own low-res sources, 32-48 px, are finer than the latent grid), 30 % of the crops zoomed in by up to
        # 1.6x.  Min-SNR weighting, gamma 5 (Hang et al. 2023), spends the steps on the high-noise end, where the
        # shapes are decided (the refiner covers the low-noise end).
        "default-base-ft": TrainConfig(model="default-base", resolution=128, bucket_step=32, batch_size=16,
                                       steps=18000, lr=2e-4, warmup_steps=100, offset_noise=0.05, text_dropout=0.1,
                                       min_snr_gamma=5.0, ema_decay=0.999, **augment, **small),
        # The refiner on the first 200 (low-noise) steps of the schedule (SDXL Sec. 2.5); sides in multiples of
        # 64 = 8 x 2^(4 - 1) for its four levels.
        "default-refiner": TrainConfig(model="default-refiner", resolution=128, bucket_step=64, batch_size=16,
                                       steps=1000, lr=5e-4, warmup_steps=200, timestep_max=199, text_dropout=0.1,
                                       ema_decay=0.999, init_components=("vae", "text_encoders"), **small),
        # The refiner's second stage, from the first one's weights, as default-base-ft: cached latents and text,
        # the same augmentation (the refiner is conditioned on size and crop too, SDXL Sec. 2.5).
        "default-refiner-ft": TrainConfig(model="default-refiner", resolution=128, bucket_step=64, batch_size=16,
                                          steps=3000, lr=2e-4, warmup_steps=100, timestep_max=199,
                                          text_dropout=0.1, ema_decay=0.999, **augment, **small),
    }


# --- glue between stages (scripts/train_default.sh) --------------------------------------------------------


def split_dataset(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """`dst`: the training part of the image folder `src` (held-out names removed), images hard-linked (copied
    across file systems), plus `heldout.jsonl` with the held-out records.  Returns counts."""
    src, dst = Path(src), Path(dst)
    records = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if not is_heldout(r["text"])]
    heldout = [r for r in records if is_heldout(r["text"])]
    dst.mkdir(parents=True, exist_ok=True)
    for record in train:
        target = dst / record["file_name"]
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / record["file_name"], target)
        except OSError:
            shutil.copyfile(src / record["file_name"], target)
    tmp = dst / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train))
    os.replace(tmp, dst / "metadata.jsonl")
    (dst / "heldout.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout))
    return {"train": len(train), "heldout": len(heldout),
            "heldout_names": len({caption_group(r["text"]) for r in heldout})}


def measure_latent_scale(vae, data: str | os.PathLike, *, images: int = 256, seed: int = 0) -> float:
    """1 / std of the VAE's posterior samples on `images` training images: LDM's rescaling of the latents to
    unit variance (Rombach et al. 2022, Sec. 4.3.2; SDXL's 0.13025 is this number for its VAE)."""
    import torch

    from xldm.train.buckets import training_buckets
    from xldm.train.data import TrainingBatches

    batches = TrainingBatches(data, buckets=training_buckets(128, 32), batch_size=16, seed=seed, drop_last=False)
    generator = torch.Generator().manual_seed(seed)
    samples = []
    with torch.no_grad():
        for batch in batches:
            samples.append(vae.encode(batch["pixels"]).sample(generator).flatten())
            if sum(s.numel() for s in samples) >= images * 4 * 16 * 16:
                break
    return float(1.0 / torch.cat(samples).std())


def compose_init_file(kind: str, text_encoders_file: str | os.PathLike, vae_file: str | os.PathLike,
                      out: str | os.PathLike, *, data: str | os.PathLike | None = None,
                      scaling_factor: float | None = None) -> float:
    """A single file holding the pre-trained text encoders and VAE (no UNet) for the `default-base` or
    `default-refiner` stage (`--init OUT --init-components vae,text_encoders`), with the VAE's measured latent
    scale in its config.  Returns that scale."""
    import torch
    from safetensors.torch import load_file

    from xldm.models.components import Components
    from xldm.models.vae import AutoencoderKL
    from xldm.weights.load import load_model
    from xldm.weights.save import save_single_file

    base = MODEL_PRESETS[kind]
    vae = AutoencoderKL(DEFAULT_VAE)
    vae.load_state_dict(load_file(str(vae_file)), strict=True)
    vae.eval().requires_grad_(False)
    if scaling_factor is None:
        if data is None:
            raise ValueError("compose: give --data (to measure the latent scale) or --scaling-factor")
        scaling_factor = round(measure_latent_scale(vae, data), 5)
    config = replace(base, vae=replace(base.vae, scaling_factor=scaling_factor))
    encoders = load_model(text_encoders_file, components=["text_encoders"], dtype=torch.float32).text_encoders
    if kind == "default-refiner":
        encoders = encoders[-1:]  # the refiner conditions on the bigG-shaped encoder alone (SDXL Sec. 2.5)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_single_file(Components(config=config, vae=vae, text_encoders=tuple(encoders)), out)
    return scaling_factor


def export_fp16(src: str | os.PathLike, out: str | os.PathLike) -> int:
    """Re-save a trained single file in fp16 (the shipped form); returns its size in bytes."""
    import torch

    from xldm.weights.load import load_model
    from xldm.weights.save import save_single_file

    model = load_model(src, dtype=torch.float32)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_single_file(model, out, dtype=torch.float16)
    return Path(out).stat().st_size


def fp16_bytes(config: ModelConfig) -> int:
    """fp16 bytes of a full single file (UNet + VAE + text encoders) of `config`, from meta-built modules."""
    import torch

    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    with torch.device("meta"):
        modules = [UNet(config.unet), AutoencoderKL(config.vae), *(CLIPTextModel(te) for te in config.text_encoders)]
    return 2 * sum(p.numel() for m in modules for p in m.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xldm.default_model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="training folder without the held-out names (+ heldout.jsonl)")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("compose", help="init file (text encoders + VAE) for the base or refiner stage")
    p.add_argument("kind", choices=sorted(MODEL_PRESETS))
    p.add_argument("--text-encoders", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="images to measure the latent scale on")
    p.add_argument("--scaling-factor", type=float, default=None)
    p = sub.add_parser("export", help="fp16 copy of a trained single file")
    p.add_argument("src")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "split":
        print(json.dumps(split_dataset(args.src, args.dst)))
    elif args.command == "compose":
        scale = compose_init_file(args.kind, args.text_encoders, args.vae, args.out, data=args.data,
                                  scaling_factor=args.scaling_factor)
        print(f"wrote {args.out} (latent scaling factor {scale})")
    else:
        size = export_fp16(args.src, args.out)
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["DEFAULT_BASE", "DEFAULT_REFINER", "DEFAULT_VAE", "DEFAULT_CLIP_L", "DEFAULT_BIGG", "DEFAULT_MODEL_PATH",
           "DEFAULT_REFINER_PATH", "DEFAULT_MODEL_DIR", "MODEL_PRESETS", "default_train_presets", "is_heldout",
           "caption_group", "split_dataset", "compose_init_file", "export_fp16", "fp16_bytes", "SIZE_BUDGET_BYTES"]
