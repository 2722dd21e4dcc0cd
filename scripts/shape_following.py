"""Shape following beyond hearts and faces (issue 15): do generated subjects have the real emoji's outline?

For each category (a CLDR name with a characteristic outline: banana, thumbs up, ghost, ...) the real emoji of that
name in an emoji build (datasets/emoji.py: Twemoji and Noto, and Fluent / blob when the build has them; native
samples without skin tone) are the references, each reduced to its silhouette at 128x128: the subject mask
(`xldm.reproduce.common.subject_mask`: the pixels that are not the white background) with its enclosed holes filled
(`fill_holes`).  The builds composite onto exact white, so a reference counts every pixel 2 % off white (a white
ghost's body too); a generated image, whose background is never exactly white, counts the mask's default 25 %.  N
images per category are generated from the bare name (seeds 0..N-1).  Per category:

- shape IoU: the IoU of a generated mask with the category's best-matching reference, mean over seeds;
- other categories: the same against each OTHER category's references (best reference per category), mean over
  those categories and seeds: what any emoji-sized subject scores; shape IoU minus this is the margin;
- nearest: the share of seeds whose best-matching category (over all the categories' references) is their own;
- disc: the shape IoU that a plain centred disc of the generated mask's area would get (a blob of the right size);
- real vs real: each reference against the category's other references (best), mean: the ceiling set by the
  emoji sets themselves disagreeing.

A last row scores the real emoji as if generated (each against the other sets): what the measure gives a model
that draws the real shapes.

    python scripts/shape_following.py --data EMOJI_DIR [--data MORE_DIRS] --out DIR [--seeds 8] [--steps 30]
        [--model BASE [--refiner REFINER]] [--categories "banana,thumbs up,..."] [--figure PATH]

writes DIR/shape_following.md (the table), DIR/shape_following.json and DIR/shape_following.png (per category: the
reference silhouettes, then per shown seed the generated image and its mask over the best reference: grey both,
red generated only, blue reference only).  Default model: the bundled base, no refiner (what `xldm generate`
runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xldm.reproduce.common import (centred_disc, fill_holes, font, labelled_grid, markdown_table, mask_iou,
                                   subject_mask)
from xldm.reproduce.metrics import Generate, latent_generator
from xldm.train.data import is_heldout

CATEGORIES = ("banana", "thumbs up", "ghost", "rocket", "pizza", "sunflower", "crescent moon", "high voltage", "star")
SIZE = 128  # masks are compared at the bundled model's native size
STYLE_ORDER = ("twitter", "google", "fluent", "blob")
REFERENCE_THRESHOLD = 0.02  # the real emoji sit on exact white (datasets/emoji.py composites them)


@dataclass(frozen=True)
class Reference:
    category: str
    style: str
    image: Image.Image  # RGB on white, SIZE x SIZE
    mask: np.ndarray


def to_mask(image: Image.Image, threshold: float = 0.25, size: int = SIZE) -> np.ndarray:
    """The silhouette of `image` at size x size (Lanczos-resized first when it has another size): its subject
    mask at `threshold` with the holes filled."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return fill_holes(subject_mask(image, threshold))


def load_references(data: list[str | Path], categories: list[str]) -> dict[str, list[Reference]]:
    """{category: references}: the native, skin-tone-free images whose CLDR name is the category, one per style
    (the first build that has a style wins), styles in STYLE_ORDER."""
    found: dict[str, dict[str, Reference]] = {c: {} for c in categories}
    for folder in data:
        folder = Path(folder)
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise ValueError(f"--data {folder}: expected an emoji build with a metadata.jsonl, found none")
        for line in meta.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            name, style = r.get("name"), r.get("style")
            if (name not in found or r.get("kind", "native") != "native" or r.get("skin_tone")
                    or style in found[name]):
                continue
            with Image.open(folder / r["file_name"]) as img:
                image = img.convert("RGB")
            found[name][style] = Reference(name, style, image, to_mask(image, REFERENCE_THRESHOLD))
    missing = [c for c, refs in found.items() if not refs]
    if missing:
        raise ValueError(f"no native image named {missing} in {[str(d) for d in data]}; expected CLDR names such as "
                         f"'thumbs up' (datasets/emoji.py builds)")
    rank = {s: i for i, s in enumerate(STYLE_ORDER)}
    return {c: [refs[s] for s in sorted(refs, key=lambda s: (rank.get(s, len(rank)), s))] for c, refs in found.items()}


def best_iou(mask: np.ndarray, references: list[Reference]) -> tuple[float, int]:
    """(the best IoU of `mask` with any of `references`, that reference's index)."""
    scores = [mask_iou(mask, r.mask) for r in references]
    i = int(np.argmax(scores))
    return scores[i], i


def score_category(category: str, masks: list[np.ndarray], references: dict[str, list[Reference]]) -> dict:
    """The row of one category for its generated masks (see the module docstring for each figure)."""
    own, other, nearest, disc = [], [], [], []
    for mask in masks:
        by_category = {c: best_iou(mask, refs)[0] for c, refs in references.items()}
        own.append(by_category[category])
        others = [v for c, v in by_category.items() if c != category]
        other.append(float(np.mean(others)) if others else float("nan"))
        nearest.append(max(by_category, key=by_category.get) == category)
        disc.append(best_iou(centred_disc(mask.shape, mask.sum()), references[category])[0])
    refs = references[category]
    real = [max(mask_iou(r.mask, q.mask) for q in refs if q is not r) for r in refs] if len(refs) > 1 else []
    return {"category": category, "heldout": is_heldout(category), "references": [r.style for r in refs],
            "seeds": len(masks), "shape_iou": float(np.mean(own)), "per_seed": [float(v) for v in own],
            "other_categories": float(np.mean(other)), "margin": float(np.mean(own) - np.mean(other)),
            "nearest": float(np.mean(nearest)), "disc": float(np.mean(disc)),
            "real_vs_real": float(np.mean(real)) if real else float("nan")}


def summary_row(rows: list[dict]) -> dict:
    keys = ("shape_iou", "other_categories", "margin", "nearest", "disc", "real_vs_real")
    def mean(values: list[float]) -> float:  # NaN (no value) entries left out; all NaN: NaN
        kept = [v for v in values if v == v]
        return float(np.mean(kept)) if kept else float("nan")

    return {"category": "mean", **{k: mean([r[k] for r in rows]) for k in keys}}


def real_emoji_row(references: dict[str, list[Reference]]) -> dict:
    """The same figures for the real emoji themselves, each reference scored as if generated against all the
    others (its own set left out; categories with one reference are skipped): how well the measure can tell the
    categories apart at best."""
    rows = []
    for category, refs in references.items():
        for r in refs if len(refs) > 1 else []:
            rest = {c: [q for q in v if q is not r] for c, v in references.items()}
            rows.append(score_category(category, [r.mask], rest))
    if not rows:
        raise ValueError("the real-emoji row needs a category with at least 2 references, found none")
    return {**summary_row(rows), "category": "real emoji, each against the other sets", "real_vs_real": float("nan"),
            "references": len(rows)}


def table(rows: list[dict], real: dict | None = None) -> str:
    def f(x: float) -> str:
        return "" if x != x else f"{x:.2f}"  # NaN: no value

    header = ["category", "references", "shape IoU", "other categories", "margin", "nearest", "disc (same area)",
              "real vs real"]
    body = [[r["category"] + (" (held out)" if r["heldout"] else ""), len(r["references"]), f(r["shape_iou"]),
             f(r["other_categories"]), f"{r['margin']:+.2f}", f"{100 * r['nearest']:.0f} %", f(r["disc"]),
             f(r["real_vs_real"])] for r in rows]
    mean = summary_row(rows)
    body.append(["**mean**", "", f(mean["shape_iou"]), f(mean["other_categories"]), f"{mean['margin']:+.2f}",
                 f"{100 * mean['nearest']:.0f} %", f(mean["disc"]), f(mean["real_vs_real"])])
    if real is not None:
        body.append([f"*{real['category']}*", real["references"], f(real["shape_iou"]), f(real["other_categories"]),
                     f"{real['margin']:+.2f}", f"{100 * real['nearest']:.0f} %", f(real["disc"]), ""])
    return markdown_table(header, body)


def silhouette(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, 0, 255).astype(np.uint8)).convert("RGB")


def overlay(mask: np.ndarray, reference: np.ndarray, iou: float, cell: int) -> Image.Image:
    """Generated mask over a reference at cell x cell px: grey both, red generated only, blue reference only; the
    IoU written in."""
    pixels = np.full(mask.shape + (3,), 255, dtype=np.uint8)
    pixels[mask & reference] = (110, 110, 110)
    pixels[mask & ~reference] = (230, 60, 50)
    pixels[~mask & reference] = (120, 160, 235)
    image = Image.fromarray(pixels).resize((cell, cell), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, cell - 15, 52, cell), fill=(255, 255, 255))
    draw.text((2, cell - 14), f"IoU {iou:.2f}", fill=(0, 0, 0), font=font(12))
    return image


def figure(references: dict[str, list[Reference]], generated: dict[str, list[Image.Image]], shown: int,
           title: str, cell: int = 96) -> Image.Image:
    styles = max(len(refs) for refs in references.values())
    rows, labels = [], []
    for category, refs in references.items():
        row = [silhouette(r.mask) for r in refs] + [Image.new("RGB", (SIZE, SIZE), "white")] * (styles - len(refs))
        for image in generated[category][:shown]:
            mask = to_mask(image)
            iou, i = best_iou(mask, refs)
            row += [image, overlay(mask, refs[i].mask, iou, cell)]
        rows.append(row)
        labels.append(category + (" (held out)" if is_heldout(category) else ""))
    longest = max(references.values(), key=len)
    columns = [f"real: {r.style}" for r in longest] + [c for s in range(shown) for c in (f"seed {s}", "mask")]
    return labelled_grid(rows, labels, columns, title=title, label_width=110, cell=cell)


def measure(generate: Generate, references: dict[str, list[Reference]], seeds: int, *,
            prompt: str = "{name}", progress: bool = True) -> tuple[list[dict], dict[str, list[Image.Image]]]:
    """(rows, generated images by category): seed s of every category is seed s."""
    from tqdm import tqdm

    generated = {c: [generate(prompt.format(name=c), s) for s in range(seeds)]
                 for c in tqdm(list(references), desc="categories", disable=not progress, file=sys.stderr)}
    rows = [score_category(c, [to_mask(i) for i in images], references) for c, images in generated.items()]
    return rows, generated


def main(argv: list[str] | None = None) -> int:
    from xldm.config import DEFAULT_MODEL_PATH

    parser = argparse.ArgumentParser(prog="python scripts/shape_following.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True,
                        help="an emoji build (metadata.jsonl); repeat to add styles from other builds")
    parser.add_argument("--out", required=True, type=Path, help="folder for the table, results and figure")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--refiner", default=None)
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma list of CLDR names")
    parser.add_argument("--seeds", type=int, default=8, help="images per category (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--prompt", default="{name}", help="prompt template (default: the bare name)")
    parser.add_argument("--figure-seeds", type=int, default=4, help="seeds shown in the figure")
    parser.add_argument("--figure", type=Path, default=None, help="write the figure here (default OUT/...png)")
    args = parser.parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if len(categories) < 2:
        parser.error(f"--categories needs at least 2 names (the other-category baseline), got {categories}")
    if args.seeds < 1 or args.steps < 1:
        parser.error(f"--seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    if "{name}" not in args.prompt:
        parser.error(f"--prompt must contain {{name}}, got {args.prompt!r}")

    references = load_references(args.data, categories)
    t0 = time.perf_counter()
    generate = latent_generator(args.model, args.refiner, steps=args.steps, cfg=args.cfg)
    rows, generated = measure(generate, references, args.seeds, prompt=args.prompt)
    seconds = time.perf_counter() - t0
    real = real_emoji_row(references)
    text = table(rows, real)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shape_following.md").write_text(text + "\n")
    settings = {k: getattr(args, k) for k in ("model", "refiner", "seeds", "steps", "cfg", "prompt")}
    (args.out / "shape_following.json").write_text(json.dumps(
        {"rows": rows, "mean": summary_row(rows), "real_emoji": real, "settings": settings, "seconds": seconds}, indent=2) + "\n")
    model = Path(args.model).name + (f" + {Path(args.refiner).name}" if args.refiner else "")
    path = args.figure or args.out / "shape_following.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(references, generated, min(args.figure_seeds, args.seeds),
           f"shape following: {model}, {args.steps} steps, cfg {args.cfg:g}; mask over the best real silhouette "
           f"(grey both, red generated only, blue real only)").quantize(
        colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)  # small
    print(text)
    print(f"{len(rows)} categories x {args.seeds} seeds in {seconds:.0f} s; wrote {args.out}/shape_following.md, "
          f".json and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["load_references", "score_category", "real_emoji_row", "table", "measure", "figure"]
