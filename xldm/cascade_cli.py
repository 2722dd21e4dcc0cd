"""`xldm generate --cascade ...` and `xldm info --cascade ...`: the command-line side of `xldm.cascade`.

`xldm.cli` adds the flags with `add_cascade_arguments(generate_parser)` / `add_cascade_info_argument(info_parser)`
and hands over to `cmd_generate_cascade(args)` / `cmd_info_cascade(args)` when `--cascade` is given.  The other
`generate` flags keep their meaning: PROMPT, --negative, --seed, --batch, --sampler, --dtype, --device, --out;
--width/--height set the final size; --init-image is the low-res input of a cascade that starts with an SR stage
(any image with the stage's aspect ratio; it is resized to the expected input).
"""

from __future__ import annotations

import argparse
import random
import sys


def _number_list(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s such as "
                                             f"{'30,20,20' if kind is int else '5,4,4'}, got {text!r}") from None

    return parse


def add_cascade_arguments(parser: argparse.ArgumentParser) -> None:
    """The cascade flags of `xldm generate`."""
    parser.add_argument("--cascade", default=None, metavar="DIR_OR_FILES",
                        help="run a pixel-space cascade instead of --model: a folder of stage_N.safetensors, "
                             "comma-separated stage files, or 'default'")
    parser.add_argument("--cascade-steps", type=_number_list(int), default=None, metavar="N,N,N",
                        help="sampling steps per stage (default 30 for a base stage, 20 for SR)")
    parser.add_argument("--cascade-cfg", type=_number_list(float), default=None, metavar="G,G,G",
                        help="guidance scale per stage (default 5 base, 4 SR)")
    parser.add_argument("--cascade-aug", type=_number_list(float), default=None, metavar="S,S,S",
                        help="noise augmentation level in [0, 1] of each stage's low-res input (0 for a base stage; "
                             "default 0.1 for SR)")


def add_cascade_info_argument(parser: argparse.ArgumentParser) -> None:
    """`xldm info --cascade DIR`: make the info parser's `path` optional and add the flag."""
    parser.add_argument("--cascade", default=None, metavar="DIR_OR_FILES",
                        help="show a cascade's stages and its cost (pixels, measured FLOPs) against generating the "
                             "final size directly")
    parser.add_argument("--cascade-steps", type=_number_list(int), default=None, metavar="N,N,N")
    parser.add_argument("--cascade-cfg", type=_number_list(float), default=None, metavar="G,G,G")


def cmd_info_cascade(args: argparse.Namespace) -> int:
    from xldm.cascade_cost import cascade_info

    print(cascade_info(args.cascade, getattr(args, "cascade_steps", None), getattr(args, "cascade_cfg", None)))
    return 0


def cmd_generate_cascade(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise SystemExit("xldm generate: error: a PROMPT is required")
    if args.out is None:
        raise SystemExit("xldm generate: error: --out FILE.png is required")
    if getattr(args, "model", None) is not None:
        raise SystemExit("xldm generate: error: --cascade and --model are exclusive")
    if (args.width is None) != (args.height is None):
        raise SystemExit("xldm generate: error: with --cascade give both --width and --height (the final size)")

    import torch
    from tqdm import tqdm

    from xldm.cascade import CascadePipeline, describe, load_cascade
    from xldm.images import open_image
    from xldm.pngmeta import save_png

    dtype = getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[args.dtype]) \
        if args.dtype else torch.float32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    init = open_image(args.init_image) if args.init_image else None
    stages = load_cascade(args.cascade, dtype=dtype, device=device)
    pipe = CascadePipeline(stages, device=device, dtype=dtype)
    seed = args.seed if args.seed is not None else random.randint(0, 2**31 - 1)
    print(f"seed {seed}", file=sys.stderr)
    bars: dict[int, tqdm] = {}

    def progress(stage: int, i: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, desc=f"stage {stage} ({describe(pipe.configs[stage])})", unit="step",
                               file=sys.stderr)
        bars[stage].update(1)

    size = (args.width, args.height) if args.width is not None else None
    result = pipe(args.prompt, steps=args.cascade_steps, cfg=args.cascade_cfg, aug=args.cascade_aug, seed=seed,
                  init_image=init, resize_init_image=True, size=size, negative_prompt=args.negative,
                  batch=args.batch, sampler=args.sampler, callback=progress)
    for bar in bars.values():
        bar.close()
    from xldm.cli import _output_paths

    for path, image, s in zip(_output_paths(args.out, args.batch), result.images, result.seeds):
        save_png(image, path, {**result.params, "seed": s, "cascade": str(args.cascade)})
        print(path)
    return 0


__all__ = ["add_cascade_arguments", "add_cascade_info_argument", "cmd_generate_cascade", "cmd_info_cascade"]
