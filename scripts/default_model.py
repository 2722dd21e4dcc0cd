"""Glue between the stages of the bundled default model's training run (scripts/train_default.sh).

    python scripts/default_model.py compose default-base --text-encoders CLIP.safetensors --vae VAE.safetensors \
        --data TRAIN_DIR --out INIT.safetensors
    python scripts/default_model.py export TRAINED.safetensors OUT.safetensors
    python scripts/default_model.py snapshot RUN/checkpoints/step_N.safetensors --init INIT.safetensors --out OUT
    python scripts/default_model.py prune-vocab SRC.safetensors... --out-dir DIR --data TRAIN_DIR \
        --names EMOJIBASE/en/data.json
    python scripts/default_model.py sizes [KIND...] [--kept N]

`compose` builds the init file of the base or refiner stage: the pre-trained text encoders and VAE (no UNet),
with the VAE's latent scale measured as 1 / std of its latents (the LDM recipe, Rombach et al. 2022,
Sec. 4.3.2 / App. G) written into the config stored in the file's header, which is what every later stage and
the loader read (`xldm.config.DEFAULT_VAE` holds a placeholder).  `export` re-saves a trained file in fp16, the
shipped form.  The dataset split comes before both: datasets/split.py.  `prune-vocab` re-saves files with their
text encoders' vocabulary pruned to the CLIP tokens of the training captions and of every CLDR emoji name and
keyword (`TextEncoderConfig.kept_tokens`; other words map to one fallback row), outputs on kept tokens unchanged.
`snapshot` turns a checkpoint of a base or refiner stage that is still training into the single file the stage's
`final/model.safetensors` would be at that step (its EMA weights over the init file's frozen parts), so that a run
of days can be measured on the way (scripts/prompt_following.py --model OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from xldm.config import DEFAULT_VAE, PRESETS, ModelConfig

KINDS = ("default-base", "default-refiner", "default-base-v2", "default-refiner-v2")  # the model presets an init file is composed for


def measure_latent_scale(vae, data: str | os.PathLike, *, images: int = 256, seed: int = 0) -> float:
    """1 / std of the VAE's posterior samples on `images` training images: LDM's rescaling of the latents to
    unit variance (Rombach et al. 2022, Sec. 4.3.2; SDXL's 0.13025 is this number for its VAE)."""
    import torch

    from xldm.buckets import training_buckets
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

    base = PRESETS[kind]
    vae = AutoencoderKL(DEFAULT_VAE)
    vae.load_state_dict(load_file(str(vae_file)), strict=True)
    vae.eval().requires_grad_(False)
    if scaling_factor is None:
        if data is None:
            raise ValueError("compose: give --data (to measure the latent scale) or --scaling-factor")
        scaling_factor = round(measure_latent_scale(vae, data), 5)
    config = replace(base, vae=replace(base.vae, scaling_factor=scaling_factor))
    encoders = load_model(text_encoders_file, components=["text_encoders"], dtype=torch.float32).text_encoders
    if kind.startswith("default-refiner"):
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


def snapshot(checkpoint: str | os.PathLike, init: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """`out`: the init file (text encoders + VAE, with or without a UNet) with the networks that `checkpoint`
    trained put in, from its EMA weights (`ema.*`) or, for a run without EMA, its raw ones (`model.*`): what the
    stage's export (xldm.train.diffusion.export) writes at that step.  Returns the networks put in."""
    import torch

    from xldm.models.unet import UNet
    from xldm.train.checkpoint import load_checkpoint, load_module_state
    from xldm.weights.load import load_model
    from xldm.weights.save import save_single_file

    model = load_model(init, dtype=torch.float32)
    if model.unet is None:
        model = replace(model, unet=UNet(model.config.unet))
    tensors, _ = load_checkpoint(checkpoint)
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
    networks = {"unet": model.unet, **{f"text_encoder_{i}": te for i, te in enumerate(model.text_encoders)}}
    put_in = []
    for name, network in networks.items():
        head = f"{prefix}{name}."
        if not any(k.startswith(head) for k in tensors):
            continue
        try:
            load_module_state(network, tensors, head)
        except RuntimeError as e:
            raise ValueError(f"{checkpoint}: its {name} does not fit the config of {init}: {e}") from None
        put_in.append(name)
    if "unet" not in put_in:
        raise ValueError(f"{checkpoint}: no UNet weights ({prefix}unet.*); expected a base or refiner stage's "
                         f"checkpoint, found {sorted({k.split('.')[1] for k in tensors if k.startswith('model.')})}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_single_file(model, out)
    return put_in


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of the UNet, VAE and text encoders of `config`, from modules built on the meta device."""
    import torch

    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    with torch.device("meta"):
        modules = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae),
                   **{f"text_encoder_{i}": CLIPTextModel(te) for i, te in enumerate(config.text_encoders)}}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def fp16_bytes(config: ModelConfig) -> int:
    """fp16 bytes of a full single file (UNet + VAE + text encoders) of `config`, from meta-built modules."""
    return 2 * sum(parameter_counts(config).values())


def with_pruned_vocabulary(config: ModelConfig, kept: int) -> ModelConfig:
    """`config` with every text encoder keeping `kept` CLIP ids (placeholder ids: only the table's size matters)."""
    from xldm.tokenizer import BOS_ID, EOS_ID

    ids = tuple(range(kept - 2)) + (BOS_ID, EOS_ID)
    return replace(config, text_encoders=tuple(replace(te, kept_tokens=ids, vocab_size=kept + 1)
                                               for te in config.text_encoders))


def size_table(kinds: list[str], kept: int | None) -> list[str]:
    """One line per preset: parameters by component and the fp16 tensor bytes of its single file."""
    lines = []
    for kind in kinds:
        config = PRESETS[kind] if kept is None else with_pruned_vocabulary(PRESETS[kind], kept)
        counts = parameter_counts(config)
        parts = ", ".join(f"{name} {n / 1e6:.3f} M" for name, n in counts.items())
        lines.append(f"{kind}: {parts}; fp16 {fp16_bytes(config) / 1e6:.2f} MB")
    return lines


def vocabulary_texts(data: str | os.PathLike | None = None, names: str | os.PathLike | None = None) -> list[str]:
    """What a pruned vocabulary must cover: the captions of the image folders `data` (their `metadata.jsonl`, and a
    split's `heldout.jsonl`) and, from an emojibase-data `en/data.json` (`names`; datasets/emoji.py's name source),
    the CLDR short name and keywords (`label`, `tags`) of every emoji and skin variant, held-out ones included:
    the words a user types for an emoji."""
    import json

    texts: list[str] = []
    for folder in [data] if data is not None else []:
        found = [Path(folder) / f for f in ("metadata.jsonl", "heldout.jsonl") if (Path(folder) / f).is_file()]
        if not found:
            raise FileNotFoundError(f"{folder} has no metadata.jsonl; expected an image folder (datasets/emoji.py)")
        for path in found:
            texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    if names is not None:
        entries = json.loads(Path(names).read_text(encoding="utf-8"))
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "label" in e for e in entries):
            raise ValueError(f"{names}: expected emojibase-data's en/data.json, a list of objects with a 'label'")
        for entry in entries:
            for item in [entry, *entry.get("skins", [])]:
                texts += [item["label"], *item.get("tags", [])]
    if not texts:
        raise ValueError("prune-vocab: give --data and/or --names (no text to keep the tokens of)")
    return texts


def prune_vocab(sources: list[str | os.PathLike], out_dir: str | os.PathLike, kept: list[int]) -> dict[str, int]:
    """Each single file of `sources` re-saved in `out_dir` (same name, same dtype) with its text encoders pruned to
    `kept`; files without text encoders (the turbo UNet) are skipped.  Returns the written files' sizes."""
    from xldm.models.components import prune_text_encoders
    from xldm.weights.load import load_model
    from xldm.weights.save import save_single_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for src in map(Path, sources):
        model = load_model(src)
        if not model.text_encoders:  # e.g. the turbo student, a UNet alone: nothing to prune
            print(f"prune-vocab: skipped {src.name} (no text encoders)", file=sys.stderr)
            continue
        if (out_dir / src.name).resolve() == src.resolve():
            raise ValueError(f"prune-vocab: {src} would overwrite itself; choose another --out-dir")
        save_single_file(prune_text_encoders(model, kept), out_dir / src.name)
        sizes[src.name] = (out_dir / src.name).stat().st_size
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/default_model.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compose", help="init file (text encoders + VAE) for the base or refiner stage")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--text-encoders", required=True)
    p.add_argument("--vae", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="images to measure the latent scale on")
    p.add_argument("--scaling-factor", type=float, default=None)
    p = sub.add_parser("export", help="fp16 copy of a trained single file")
    p.add_argument("src")
    p.add_argument("out")
    p = sub.add_parser("snapshot", help="single file from a training checkpoint of a base or refiner stage")
    p.add_argument("checkpoint")
    p.add_argument("--init", required=True, help="the stage's init file (text encoders + VAE)")
    p.add_argument("--out", required=True)
    p = sub.add_parser("prune-vocab", help="copies of single files with the text encoders' vocabulary pruned")
    p.add_argument("sources", nargs="+", help="single files (e.g. base.safetensors refiner.safetensors)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--data", default=None, help="image folder whose captions are kept (metadata.jsonl)")
    p.add_argument("--names", default=None, help="emojibase-data en/data.json: every emoji name and keyword kept")
    p = sub.add_parser("sizes", help="parameters and fp16 bytes of the default presets (meta-device build)")
    p.add_argument("kinds", nargs="*", default=["default-base", "default-refiner", "default-base-v2",
                                                "default-refiner-v2"])
    p.add_argument("--kept", type=int, default=None, help="as with a vocabulary pruned to this many tokens")
    args = parser.parse_args(argv)
    if args.command == "sizes":
        print("\n".join(size_table(args.kinds, args.kept)))
    elif args.command == "prune-vocab":
        from xldm.tokenizer import kept_token_ids

        kept = kept_token_ids(vocabulary_texts(args.data, args.names))
        for name, size in prune_vocab(args.sources, args.out_dir, kept).items():
            before = Path(next(s for s in args.sources if Path(s).name == name)).stat().st_size
            print(f"wrote {Path(args.out_dir) / name}: {len(kept)} kept tokens, {size / 1e6:.2f} MB "
                  f"(was {before / 1e6:.2f} MB)")
    elif args.command == "snapshot":
        put_in = snapshot(args.checkpoint, args.init, args.out)
        print(f"wrote {args.out} ({', '.join(put_in)} from {args.checkpoint})")
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
