"""`xldm data emoji OUT_DIR ...`: build a training dataset.  Hooked into `xldm.cli` by `add_data_parser`."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,48, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data` (with its `emoji` sub-command) to the `xldm` sub-command parsers."""
    data = subparsers.add_parser("data", help="build training datasets (emoji: the default model's data)")
    kinds = data.add_subparsers(dest="dataset", required=True)
    emoji = kinds.add_parser(
        "emoji", help="Twemoji + Noto emoji with CLDR captions, from npm packages",
        description="Build a captioned emoji image folder (metadata.jsonl + README.md) from the npm packages "
        "emoji-datasource-twitter / emoji-datasource-google (images) and emojibase-data (CLDR names). "
        "Needs npm unless --offline with a filled --cache.",
    )
    emoji.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    emoji.add_argument("--sources", type=_names, default=["twitter", "google"], metavar="LIST",
                       help="comma list of image sets: twitter, google (default: both)")
    emoji.add_argument("--size", type=int, default=128, help="side of the native square samples (default 128)")
    emoji.add_argument("--multi-aspect", type=int, default=0, metavar="N",
                       help="N extra samples placed at a random scale and offset on non-square bucket canvases")
    emoji.add_argument("--low-res", type=int, default=0, metavar="N", help="N extra samples stored small")
    emoji.add_argument("--low-res-sizes", type=_int_list, default=[32, 48], metavar="LIST",
                       help="canvas sides of the low-res samples (default 32,48)")
    emoji.add_argument("--seed", type=int, default=0)
    emoji.add_argument("--cache", default=None, metavar="DIR",
                       help="where npm tarballs are kept and unpacked (default ~/.cache/xldm/npm)")
    emoji.add_argument("--offline", action="store_true", help="use only tarballs already in --cache; never run npm")
    emoji.add_argument("--limit", type=int, default=None, metavar="N",
                       help="only the first N emoji of each set (with their skin variants), for quick tests")
    emoji.add_argument("--no-position-phrase", action="store_true",
                       help="do not append 'at the top left' etc. to off-centre multi-aspect captions")
    emoji.add_argument("--workers", type=int, default=2, help="rendering threads (default 2)")
    emoji.set_defaults(func=cmd_data)
    return data


def _command_line(args: argparse.Namespace) -> str:
    """The full command with every option explicit, so the README records exactly what was built."""
    words = ["xldm", "data", "emoji", args.out_dir, "--sources", ",".join(args.sources), "--size", str(args.size),
             "--multi-aspect", str(args.multi_aspect), "--low-res", str(args.low_res),
             "--low-res-sizes", ",".join(map(str, args.low_res_sizes)), "--seed", str(args.seed)]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    if args.no_position_phrase:
        words.append("--no-position-phrase")
    return shlex.join(words)


def cmd_data(args: argparse.Namespace) -> int:
    from xldm.datasets.emoji import BuildOptions, build_emoji_dataset

    if args.dataset != "emoji":  # argparse only lets known names through; kept for a clear error if one is added
        raise ValueError(f"unknown dataset {args.dataset!r}")
    options = BuildOptions(
        out_dir=Path(args.out_dir), sources=args.sources, size=args.size, multi_aspect=args.multi_aspect,
        low_res=args.low_res, low_res_sizes=args.low_res_sizes, seed=args.seed,
        cache_dir=Path(args.cache) if args.cache else None, limit=args.limit, offline=args.offline,
        position_phrases=not args.no_position_phrase, workers=args.workers, command=_command_line(args),
    )
    start = time.perf_counter()
    summary = build_emoji_dataset(options, log=print)
    for key, value in summary.counts().items():
        print(f"  {key}: {value}")
    for key, value in sorted(summary.stats.items()):
        print(f"  {key}: {value}")
    print(f"wrote {len(summary.samples)} images, metadata.jsonl and README.md to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
