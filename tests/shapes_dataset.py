"""A generated dataset of simple captioned images, for testing that training learns captions.

Each image is one filled shape (circle or square) in one colour (red, green, blue, yellow) at one of five
positions (the four quadrant centres and the middle) on a white canvas, square or not; its caption says exactly
that: "a red circle at the top left", "a blue square in the center".  `describe(caption)` gives back the
colour and the position as fractions of the canvas, so a test can measure a generated image against its prompt.

Non-square canvases have the aspect ratio of a bucket (5:3 and 3:5, e.g. 80x48 for size 64), so with buckets
of the same shape (`training_buckets(size, 8)` or `(size, 16)`) they are resized without cropping, and the
positions in the caption stay true in the training crops.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 30, 220),
    "yellow": (235, 215, 25),
}
SHAPES = ("circle", "square")
POSITIONS: dict[str, tuple[float, float]] = {  # (cx, cy) as fractions of the canvas width and height
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
BACKGROUND: RGB = (255, 255, 255)
SHAPE_RADIUS = 0.18  # half the shape's extent, as a fraction of the canvas's shorter side


def caption_for(colour: str, shape: str, position: str) -> str:
    preposition = "in the" if position == "center" else "at the"
    return f"a {colour} {shape} {preposition} {position}"


_CAPTION = re.compile(
    r"a (?P<colour>{}) (?P<shape>{}) (?:at|in) the (?P<position>{})".format(
        "|".join(COLOURS), "|".join(SHAPES), "|".join(POSITIONS)
    )
)


def describe(caption: str) -> tuple[RGB, tuple[float, float]]:
    """The shape's colour (RGB) and centre (cx, cy) in [0, 1] of the canvas, from a caption of this dataset."""
    match = _CAPTION.fullmatch(caption.strip())
    if match is None:
        raise ValueError(f"not a caption of the shapes dataset: {caption!r}")
    return COLOURS[match["colour"]], POSITIONS[match["position"]]


def canvas_sizes(size: int) -> tuple[tuple[int, int], ...]:
    """(width, height) canvases: square, 5:3 landscape and 3:5 portrait, sides multiples of 8 near `size`^2."""
    long_side = max(8, round(size * 1.25 / 8) * 8)
    short_side = max(8, round(long_side * 0.6 / 8) * 8)
    return (size, size), (long_side, short_side), (short_side, long_side)


def draw_shape(width: int, height: int, colour: str, shape: str, position: str) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUND)
    cx, cy = POSITIONS[position]
    radius = SHAPE_RADIUS * min(width, height)
    box = (cx * width - radius, cy * height - radius, cx * width + radius, cy * height + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def make_shapes_dataset(out_dir: str | Path, n: int, *, size: int = 64, seed: int = 0) -> Path:
    """Write `n` images `shape_00000.png` with captions `shape_00000.txt` into `out_dir`; returns it.

    The 40 (colour, shape, position) combinations are dealt out evenly (a shuffled round per 40 images); the
    canvas of each image is drawn from `canvas_sizes(size)`.  The same arguments give the same files.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    canvases = canvas_sizes(size)
    deck: list[tuple[str, str, str]] = []
    for index in range(n):
        if not deck:
            deck = combos[:]
            rng.shuffle(deck)
        colour, shape, position = deck.pop()
        width, height = rng.choice(canvases)
        name = f"shape_{index:05d}"
        draw_shape(width, height, colour, shape, position).save(out / f"{name}.png", compress_level=1)
        (out / f"{name}.txt").write_text(caption_for(colour, shape, position), encoding="utf-8")
    return out


__all__ = [
    "BACKGROUND", "COLOURS", "POSITIONS", "SHAPES", "canvas_sizes", "caption_for", "describe", "draw_shape",
    "make_shapes_dataset",
]
