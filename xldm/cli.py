"""The `xldm` command line: `xldm generate | train | plot | serve | info | convert | reproduce`; each sub-command's
flags live with it (`xldm.generate_cli`, `xldm.train.cli`, `xldm.serve.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xldm.generate_cli import add_generate_parser
from xldm.serve.cli import DTYPES, add_serve_parser, torch_dtype


def cmd_info(args: argparse.Namespace) -> int:
    if args.cascade:
        return cmd_info_cascade(args)
    if args.path is None:
        raise SystemExit("xldm info: error: a PATH (or --cascade DIR) is required")
    from xldm.lora.files import describe_lora
    from xldm.weights.info import model_info

    lines = describe_lora(args.path) if Path(args.path).is_file() and args.path.endswith(".safetensors") else None
    print("\n".join(lines or model_info(args.path, allow_pickle=args.allow_pickle).lines()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from xldm.weights.save import convert

    out = convert(args.src, args.dst, to=args.to or convert_target(args.dst), dtype=torch_dtype(args.dtype),
                  allow_pickle=args.allow_pickle)
    print(f"wrote {out}")
    return 0


def convert_target(dst: str) -> str:
    """`--to` from the destination: a .safetensors file is a single file, a folder (existing, or a name without an
    extension) a diffusers folder."""
    path = Path(dst)
    if path.suffix.lower() == ".safetensors" and not path.is_dir():
        return "single-file"
    if path.is_dir() or not path.suffix:
        return "diffusers"
    raise ValueError(f"convert: cannot tell the layout from {dst!r}; name a .safetensors file or a folder, "
                     f"or give --to single-file | diffusers")


def cmd_info_cascade(args: argparse.Namespace) -> int:
    """The stages of a cascade, from the file headers only: kind, sizes, prediction, scalars, UNet parameters."""
    import torch

    from xldm.cascade import cascade_files, describe, read_stage_header
    from xldm.models.unet import UNet

    for i, path in enumerate(cascade_files(args.cascade)):
        config, has_encoders = read_stage_header(path)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in UNet(config.unet).parameters())
        note = "" if has_encoders else (" (text encoders shared with an earlier stage)" if i else
                                        " (text encoders from the default model)")
        print(f"stage {i}: {describe(config)}, {config.prediction_type} prediction, scalars "
              f"{', '.join(config.micro_conditioning) or 'none'}, {parameters:,} UNet parameters, "
              f"{config.default_size ** 2:,} pixels out{note} [{path.name}]")
    print(f"FLOPs per stage, against generating the final size directly: "
          f"python benchmarks/cascade_cost.py --cascade {args.cascade}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from xldm.reproduce import reproduce

    out = Path(args.out or f"reproduce/{args.name}-{args.scale}")
    results = reproduce(args.name, out, scale=args.scale, seed=args.seed, data=args.data, progress=True)
    print(f"{out / 'report.md'} ({results['seconds']:.0f} s; the paper's ordering "
          f"{'holds' if results['paper_ordering_holds'] else 'does not hold'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xldm import __version__

    parser = argparse.ArgumentParser(prog="xldm", description="Stable Diffusion XL, from scratch in PyTorch.")
    parser.add_argument("--version", action="version", version=f"xldm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_generate_parser(sub)

    info = sub.add_parser("info", help="what a checkpoint holds: kind, components, parameters, dtypes")
    info.add_argument("path", nargs="?",
                      help="single-file .safetensors, diffusers folder, or a preset name (e.g. sdxl-base)")
    info.add_argument("--allow-pickle", action="store_true",
                      help="read .ckpt/.pt/.bin pickles (can run code; only for files you trust)")
    info.add_argument("--cascade", default=None, metavar="DIR_OR_FILES",
                      help="show a cascade's stages (the cost: benchmarks/cascade_cost.py --cascade DIR_OR_FILES)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert between single-file and diffusers layouts")
    conv.add_argument("src", help="single-file checkpoint or diffusers folder")
    conv.add_argument("dst", help="output .safetensors file or folder")
    conv.add_argument("--to", default=None, choices=["single-file", "diffusers"],
                      help="default: from DST (a .safetensors file: single-file; a folder: diffusers)")
    conv.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating weights (default: keep)")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="read a .ckpt/.pt/.bin pickle (torch.load weights_only=True, torch >= 2.6)")
    conv.set_defaults(func=cmd_convert)
    rep = sub.add_parser("reproduce", help="the SDXL paper's claims at small scale: a report.md and results.json")
    rep.add_argument("name", choices=["size-conditioning", "crop-conditioning", "refiner", "cascade-cost"])
    rep.add_argument("--out", default=None, help="output folder (default reproduce/NAME-SCALE); finished training "
                                                 "runs in it are reused, unfinished ones resumed")
    rep.add_argument("--scale", default="smoke", choices=["smoke", "small", "full"],
                     help="smoke: tiny models, seconds; small: the real experiment, < 2 h on a 2-core CPU; full: more")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--data", default=None, help="image folder with metadata.jsonl (e.g. the emoji dataset of "
                                                  "datasets/emoji.py); default: seeded synthetic shapes")
    rep.set_defaults(func=cmd_reproduce)
    from xldm.train.cli import add_plot_parser, add_train_parser

    add_train_parser(sub)
    add_plot_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # XldmError is a ValueError
        print(f"xldm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
