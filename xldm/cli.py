"""The `xldm` command line: `xldm info`, `xldm convert`."""

from __future__ import annotations

import argparse
import sys

from xldm.errors import XldmError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch_dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPES[name])


def cmd_info(args: argparse.Namespace) -> int:
    from xldm.weights.info import model_info

    info = model_info(args.path, allow_pickle=args.allow_pickle)
    print("\n".join(info.lines()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from xldm.weights.save import convert

    out = convert(args.src, args.dst, to=args.to, dtype=_torch_dtype(args.dtype), allow_pickle=args.allow_pickle)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xldm", description="Stable Diffusion XL, from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="what a checkpoint holds: kind, components, parameters, dtypes")
    info.add_argument("path", help="single-file .safetensors, diffusers folder, or a preset name (e.g. sdxl-base)")
    info.add_argument("--allow-pickle", action="store_true",
                      help="read .ckpt/.pt/.bin pickles (can run code; only for files you trust)")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert between single-file and diffusers layouts")
    conv.add_argument("src", help="single-file checkpoint or diffusers folder")
    conv.add_argument("dst", help="output .safetensors file or folder")
    conv.add_argument("--to", required=True, choices=["single-file", "diffusers"])
    conv.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating weights (default: keep)")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="read a .ckpt/.pt/.bin pickle (torch.load weights_only=True, torch >= 2.6)")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (XldmError, FileNotFoundError) as e:
        print(f"xldm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
