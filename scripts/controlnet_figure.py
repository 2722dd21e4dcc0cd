"""The README's ControlNet figure and edge-agreement table, from one command:

    python scripts/controlnet_figure.py docs/controlnet.png

writes the figure (a row per control image: two drawn sketches and the canny map of a bundled-model image; columns:
the control image, then the image generated at each --scales value, scale 0 = without the ControlNet) and prints a
markdown table: scale -> mean boundary F1 (`xldm.controlnet.edge_agreement`, 2 px) between the generated image's
canny edges and the control's edges, over --prompts prompts whose control is the canny map of *another* prompt's
image (so the layout asked for is not the one the prompt would give anyway), and over the sketches.  All seeds
fixed; CPU, about a minute on 2 cores.  --model / --controlnet point at other files (default: the bundled base and
default-canny).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# Prompts of different layouts (the bundled model's emoji names); prompt k is steered by prompt k+1's edges.
TABLE_PROMPTS = ["red heart", "banana", "grinning face", "rocket", "pizza", "Christmas tree"]
SCALES = (0.0, 0.5, 1.0, 1.5)
SIDE = 128  # the bundled model's native size


def heart_sketch(side: int = SIDE) -> Image.Image:
    """A heart outline, 1 px white on black (the look of a canny map), off-centre and smaller than an emoji."""
    points = []
    for i in range(200):  # the classic heart curve x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t
        t = 2 * math.pi * i / 200
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((side * 0.42 + x * side / 48, side * 0.45 - y * side / 48))
    image = Image.new("RGB", (side, side))
    ImageDraw.Draw(image).line(points + points[:1], fill=(255, 255, 255), width=1)
    return image


def star_sketch(side: int = SIDE) -> Image.Image:
    """A five-pointed star outline, 1 px white on black."""
    points = []
    for i in range(10):
        radius = side * (0.42 if i % 2 == 0 else 0.17)
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((side / 2 + radius * math.cos(angle), side * 0.53 + radius * math.sin(angle)))
    image = Image.new("RGB", (side, side))
    ImageDraw.Draw(image).line(points + points[:1], fill=(255, 255, 255), width=1)
    return image


def generate(pipe, prompt: str, controlnet, control: Image.Image, scale: float, *, seed: int, steps: int):
    """One image; scale 0 runs without the ControlNet (the pipeline's own result, bit for bit)."""
    from xldm.controlnet import ControlUnit

    units = [ControlUnit(controlnet, control, scale=scale)] if scale else []
    return pipe(prompt, seed=seed, steps=steps, controlnets=units).images[0]


def other_prompts_edges(pipe, prompts: list[str], *, seed: int, steps: int) -> list[Image.Image]:
    """Control k = the canny map of prompt k+1's image (the model's own picture, without a ControlNet)."""
    from xldm.controlnet import canny

    edges = [canny(pipe(p, seed=seed, steps=steps).images[0]) for p in prompts]
    return edges[1:] + edges[:1]


def edge_scores(pipe, controlnet, pairs: list[tuple[str, Image.Image]], scales, *, seed: int,
                steps: int) -> dict[float, list[float]]:
    """scale -> the F1 of each (prompt, control) pair's image against its control."""
    from xldm.controlnet import edge_agreement

    return {s: [edge_agreement(generate(pipe, p, controlnet, c, s, seed=seed, steps=steps), c)["f1"]
                for p, c in pairs] for s in scales}


def main(argv: list[str] | None = None) -> int:
    import xldm
    from xldm.config import BUNDLED_CONTROLNETS, DEFAULT_MODEL_PATH
    from xldm.controlnet import canny
    from xldm.reproduce.common import labelled_grid
    from xldm.weights.load import load_controlnet

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/controlnet.png"))
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--controlnet", default="default-canny", help="a ControlNet folder/file or a bundled name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=len(TABLE_PROMPTS), help="how many of the table's prompts")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)))
    args = parser.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    if not 2 <= args.prompts <= len(TABLE_PROMPTS):
        parser.error(f"--prompts must lie in [2, {len(TABLE_PROMPTS)}], got {args.prompts}")
    path = BUNDLED_CONTROLNETS.get(args.controlnet, args.controlnet)
    pipe = xldm.load(args.model)
    controlnet = load_controlnet(path)

    # The figure: prompts chosen so that the control's shape is not what the prompt alone would draw.
    apple_edges = canny(pipe("red apple", seed=args.seed, steps=args.steps).images[0])
    rows_spec = [("heart sketch", "pizza", heart_sketch()), ("star sketch", "banana", star_sketch()),
                 ("red apple's edges", "grinning face", apple_edges)]
    rows = [[control] + [generate(pipe, prompt, controlnet, control, s, seed=args.seed, steps=args.steps)
                         for s in scales] for _, prompt, control in rows_spec]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, [f'"{prompt}"\n+ {name}' for name, prompt, _ in rows_spec],
                  ["control image"] + [f"scale {s:g}" + (" (off)" if s == 0 else "") for s in scales],
                  label_width=130, title=f"{Path(str(path)).name} on the bundled base, seed {args.seed}, "
                                         f"{args.steps} steps").save(args.out)

    prompts = TABLE_PROMPTS[: args.prompts]
    crossed = edge_scores(pipe, controlnet, list(zip(prompts, other_prompts_edges(pipe, prompts, seed=args.seed,
                                                                                 steps=args.steps))),
                          scales, seed=args.seed, steps=args.steps)
    sketches = edge_scores(pipe, controlnet, [(p, c) for _, p, c in rows_spec[:2]], scales, seed=args.seed,
                           steps=args.steps)
    print(args.out)
    print(f"\n| scale | F1, {len(prompts)} prompts with another prompt's edges | F1, the 2 sketches |")
    print("|---|---|---|")
    for s in scales:
        print(f"| {s:g}{' (off)' if s == 0 else ''} | {sum(crossed[s]) / len(crossed[s]):.2f} | "
              f"{sum(sketches[s]) / len(sketches[s]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
