"""`xldm train`: parse flags and an optional TOML file into a `TrainConfig`, then run `xldm.train.loop.train`.

    xldm train --preset tiny-sdxl-base --data DIR_OR_SHARDS --steps N --batch-size B --out RUN_DIR
               [--checkpoint-every K] [--resume] [--seed S] [--lr X] [--init PATH] [--grad-accum N]
               [--sample-every N --sample-prompts FILE] [--set FIELD=VALUE ...]
    xldm train CONFIG.toml [flags]
    xldm train --preset cascade-base-32 --data DIR --out RUN_DIR [--text-encoders-from MODEL_OR_STAGE] [flags]

A cascade preset trains one stage of a pixel-space cascade (--init then takes a stage file).  The TOML file holds
data only: `preset = "sdxl-base"` (optional) and any `TrainConfig` field at the top level (`steps = 1000`,
`lr = 1e-5`, `data = "shards/{000..099}.tar"`).  Precedence: preset < TOML < flags.
Under torchrun the same command runs in every process: `torchrun --nproc_per_node 2 -m xldm.train.cli ...`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from typing import Any

from xldm.train.config import TRAIN_PRESETS, TrainConfig, preset

# flag -> TrainConfig field, for the flags that set a field directly.
_FIELD_FLAGS = ("data", "steps", "batch_size", "out", "checkpoint_every", "seed", "lr", "init", "keep_checkpoints",
                "mixed_precision", "device", "text_encoders_from", "grad_accum_steps", "sample_every",
                "sample_prompts", "lora_rank", "lora_alpha", "teacher", "control")
RANDOM_INIT_NOTE = ("random init of every network unless --init is given (a tiny preset is meant for tests; a full "
                    "one from scratch needs pretrained text encoders and VAE: pass --init with a single file or "
                    "diffusers folder)")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` sub-command to an `argparse` sub-parsers object."""
    p = subparsers.add_parser("train", help="train or fine-tune a base, refiner, VAE, text encoders or cascade stage",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml", help="TOML file of TrainConfig fields")
    p.add_argument("--preset", default=None, help=f"starting settings: {', '.join(sorted(TRAIN_PRESETS))}")
    p.add_argument("--data", default=None, help="image folder (name.txt captions, metadata.jsonl, or kohya "
                                                        "N_name/ subfolders) or .tar shards")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps (resumed ones included)")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="checkpoints/, metrics.jsonl, final/")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="K")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="K", help="keep the newest K")
    p.add_argument("--resume", action="store_true", help="continue from the newest loadable checkpoint")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--init", default=None, metavar="PATH", help="starting weights: single file or diffusers folder "
                                                                "(cascade presets: a stage file)")
    p.add_argument("--init-components", default=None, metavar="LIST",
                   help="comma-separated subset of unet,vae,text_encoders to take from --init (default: all)")
    p.add_argument("--text-encoders-from", default=None, metavar="MODEL_OR_STAGE",
                   help="cascade presets: frozen text encoders from an xldm model file or folder, a stage file, or "
                        "'default' (the bundled default model's)")
    p.add_argument("--grad-accum", dest="grad_accum_steps", type=int, default=None, metavar="N",
                   help="gradient accumulation: one step = one update over N batches (default 1)")
    p.add_argument("--sample-every", type=int, default=None, metavar="N", help="sample images every N steps (0 = off)")
    p.add_argument("--sample-prompts", default=None, metavar="FILE",
                   help="one prompt per line, kohya options --n --s --l --d --w --h; grids in RUN_DIR/samples/")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distillation presets (*-turbo): the model distilled into a few-step student")
    p.add_argument("--control", default=None, metavar="PREPROCESSOR",
                   help="ControlNet presets (*-controlnet): how control images are made from the training images: "
                        "canny or canny:LOW,HIGH; or dir:FOLDER, a folder mirroring --data with each image's control "
                        "image (same relative path and stem)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train a rank-R LoRA (kohya file RUN/final/lora.safetensors) instead of the weights")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default: the rank)")
    p.add_argument("--lora-conv", action="store_true", help="LoCon: adapt the convolutions too")
    p.add_argument("--lora-text-encoders", action="store_true", help="adapt the text encoders too")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other TrainConfig field, e.g. --set offset_noise=0.05 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return p


def _parse_value(field: dataclasses.Field, text: str) -> Any:
    """A --set value as the field's type (bool, int, float, str, tuple of str, optional str)."""
    kind = str(field.type)
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {field.name}: expected true/false, got {text!r}")
    try:
        if "tuple" in kind:
            return tuple(int(part) if "int" in kind else part for part in text.split(",") if part)
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"--set {field.name}: expected {kind}, got {text!r}") from None
    if "None" in kind and text.lower() in ("", "none"):
        return None
    return text


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """preset < TOML < flags."""
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config, "rb") as f:
            values = tomllib.load(f)
    file_preset = values.pop("preset", None)
    name = args.preset or file_preset
    base = TrainConfig() if name is None else preset(name)  # (an unknown name is a ValueError listing the presets)
    values.update({flag: getattr(args, flag) for flag in _FIELD_FLAGS if getattr(args, flag) is not None})
    if args.init_components is not None:
        values["init_components"] = tuple(c for c in args.init_components.split(",") if c)
    for flag in ("deterministic", "lora_conv", "lora_text_encoders"):
        if getattr(args, flag):
            values[flag] = True
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in args.set:
        field, sep, text = item.partition("=")
        if not sep or field not in fields:
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        values[field] = _parse_value(fields[field], text)
    return TrainConfig.from_dict({**base.to_dict(), **values})


def cmd_train(args: argparse.Namespace) -> int:
    from xldm.train.loop import train

    config = config_from_args(args)
    if not config.data:
        raise ValueError("xldm train: --data DIR_OR_SHARDS is required (or `data` in the TOML file)")
    if not config.out:
        raise ValueError("xldm train: --out RUN_DIR is required (or `out` in the TOML file)")
    if args.preset and not config.init and not config.text_encoders_from and config.task != "add":
        print(f"xldm train: preset {args.preset}: {RANDOM_INIT_NOTE}", file=sys.stderr)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.final_path is not None:
        print(f"step {result.step}: wrote {result.final_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m xldm.train.cli ...` (the same arguments as `xldm train`), e.g. under torchrun."""
    parser = argparse.ArgumentParser(prog="xldm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"xldm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
