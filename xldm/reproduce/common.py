"""What every reproduction shares: scales, a seeded offline dataset, resumable training runs through the one training
loop, the metrics (Fréchet distance, sharpness, subject mask and its IoU, subject touching the frame), image grids
and the report writer."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SCALES = ("smoke", "small", "full")


@dataclass(frozen=True)
class Scale:
    """How big one reproduction runs.  smoke: tiny random-initialised models and a handful of steps (the default
    test suite); small: the bundled default model's architecture trained for real on the 2-core CPU (< 2 h);
    full: the same at several times the steps and samples."""

    name: str
    base_preset: str  # xldm.train.config preset of the base UNet
    refiner_preset: str
    resolution: int  # training / native sampling size
    bucket_step: int
    images: int  # synthetic dataset size (when no --data is given)
    steps: int  # UNet training steps per run
    refiner_steps: int
    batch_size: int
    evaluator_steps: int  # contrastive evaluator (FID feature space, prompt following)
    evaluator_resolution: int
    evaluator_batch: int
    samples: int  # generated images per sampling seed / per setting
    sampling_seeds: int  # FID confidence intervals: one FID per seed
    sample_steps: int
    checkpoint_every: int


SCALE_SETTINGS: dict[str, Scale] = {
    "smoke": Scale("smoke", "tiny-sdxl-base", "tiny-sdxl-refiner", resolution=64, bucket_step=64, images=24, steps=2,
                   refiner_steps=2, batch_size=2, evaluator_steps=2, evaluator_resolution=32, evaluator_batch=8,
                   samples=4, sampling_seeds=2, sample_steps=2, checkpoint_every=2),
    # The default model's architecture from scratch (its presets' rates), with the bundled model's frozen VAE and
    # text encoders (init_components): steps sized for ~12 min per UNet run on the 2-core CPU (measured ~1.4 it/s
    # at batch 16, scripts/train_default.sh), so that all four reproductions run in about two hours together.
    "small": Scale("small", "default-base", "default-refiner", resolution=128, bucket_step=32, images=1500,
                   steps=1000, refiner_steps=500, batch_size=16, evaluator_steps=400, evaluator_resolution=64,
                   evaluator_batch=128, samples=64, sampling_seeds=3, sample_steps=20, checkpoint_every=250),
    "full": Scale("full", "default-base", "default-refiner", resolution=128, bucket_step=32, images=4000,
                  steps=8000, refiner_steps=2000, batch_size=16, evaluator_steps=3000, evaluator_resolution=64,
                  evaluator_batch=128, samples=256, sampling_seeds=5, sample_steps=30, checkpoint_every=250),
}


def scale_settings(name: str) -> Scale:
    if name not in SCALE_SETTINGS:
        raise ValueError(f"unknown scale {name!r}; expected one of {list(SCALE_SETTINGS)}")
    return SCALE_SETTINGS[name]


# ------------------------------------------------------------------------------------------------------------ data

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 30), "blue": (30, 30, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 180), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "diamond")


def shape_image(size: int, colour: str, shape: str, rng: random.Random) -> Image.Image:
    """One filled shape, centred with a little jitter and covering 50-70 % of the side, on white (a subject that
    never touches the frame in the full image, so a crop that cuts it is visible)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = size * rng.uniform(0.25, 0.35)
    cx, cy = size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.05, 0.05) * size
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=COLOURS[colour])
    return image


def make_shapes_dataset(folder: Path, count: int, size: int, seed: int) -> Path:
    """A captioned image folder (metadata.jsonl, Hugging Face imagefolder layout) of `count` shapes at `size` px,
    "a red circle": deterministic for `seed`.  Written once; a finished folder (DONE) is reused."""
    folder = Path(folder)
    if (folder / "DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(f"xldm-reproduce-shapes:{seed}")
    records = []
    for i in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"{i:05d}.png"
        shape_image(size, colour, shape, rng).save(folder / name)
        records.append({"file_name": name, "text": f"a {colour} {shape}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "DONE").write_text("")
    return folder


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines() if line.strip()]


def write_records(folder: Path, records: list[dict]) -> None:
    (Path(folder) / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def load_rgb(path: Path) -> Image.Image:
    from xldm.train.data import to_rgb

    with Image.open(path) as image:
        return to_rgb(image.copy())


def base_data(out: Path, scale: Scale, seed: int, data: str | None) -> Path:
    """The images a reproduction trains on: `data` (an image folder with metadata.jsonl, e.g. the emoji build of
    datasets/emoji.py) or the seeded synthetic shapes at the scale's resolution."""
    if data:
        if not (Path(data) / "metadata.jsonl").is_file():
            raise ValueError(f"--data {data}: expected an image folder with a metadata.jsonl, found none")
        return Path(data)
    return make_shapes_dataset(out / "data" / "shapes", scale.images, scale.resolution, seed)


def split_holdout(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): a seeded `share` of the records kept aside as the real reference."""
    order = list(range(len(records)))
    random.Random(f"xldm-reproduce-holdout:{seed}").shuffle(order)
    cut = max(2, int(round(len(records) * share)))
    held = sorted(order[:cut])
    held_set = set(held)
    return [r for i, r in enumerate(records) if i not in held_set], [records[i] for i in held]


# -------------------------------------------------------------------------------------------------------- training

def train_once(config, *, progress: bool = False) -> Path:
    """`xldm.train.loop.train(config)` with the loop's resume semantics: a finished run (RUN/DONE) is reused, a run
    with checkpoints is resumed, else it starts; returns the exported file."""
    from xldm.train.loop import train

    out = Path(config.out)
    done = out / "DONE"
    if done.is_file():
        return out / done.read_text().strip()
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    t0 = time.perf_counter()
    result = train(config, resume=resume, progress=progress)
    final = Path(result.final_path)
    if config.task == "clip":
        final = final.parent / "clip_evaluator.safetensors"
    (out / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    done.write_text(str(final.relative_to(out)))
    return final


def run_seconds(run_dir: Path) -> float | None:
    path = Path(run_dir) / "seconds.txt"
    return float(path.read_text()) if path.is_file() else None


def unet_config(scale: Scale, preset: str, out: Path, data: Path, seed: int, steps: int, **changes):
    """A UNet training run of `preset` at this scale; the small and full scales take the bundled default model's
    frozen VAE and text encoders (the preset's init_components)."""
    from xldm.config import DEFAULT_MODEL_PATH
    from xldm.train.config import preset as train_preset

    base = train_preset(preset)
    settings = dict(data=str(data), out=str(out), seed=seed, steps=steps, batch_size=scale.batch_size,
                    resolution=scale.resolution, bucket_step=max(scale.bucket_step, base.bucket_step),  # refiner: 64
                    checkpoint_every=scale.checkpoint_every, keep_checkpoints=2)
    if scale.name != "smoke":
        settings.update(init=str(DEFAULT_MODEL_PATH), init_components=("vae", "text_encoders"))
    if preset.endswith("refiner") and scale.name != "smoke":
        settings["init"] = str(DEFAULT_MODEL_PATH.with_name("refiner.safetensors"))
    return base.replace(**{**settings, **changes})


def evaluator_config(scale: Scale, out: Path, data: Path, seed: int):
    """The contrastive evaluator (xldm.train.contrastive, task "clip") trained on the real images: its image tower is
    the feature space of the FID, its retrieval accuracy the prompt-following score."""
    from xldm.train.config import preset as train_preset

    model = "tiny-sdxl-base" if scale.name == "smoke" else "default-base"
    return train_preset("default-clip").replace(model=model, data=str(data), out=str(out), seed=seed,
                                                steps=scale.evaluator_steps, resolution=scale.evaluator_resolution,
                                                batch_size=scale.evaluator_batch,
                                                warmup_steps=min(100, scale.evaluator_steps // 4),
                                                checkpoint_every=max(1, min(250, scale.evaluator_steps)))


# --------------------------------------------------------------------------------------------------------- metrics

def fid_features(evaluator, images: Sequence[Image.Image]) -> np.ndarray:
    """(N, D) image-tower features of the contrastive evaluator (before its heads), images letterboxed as it was
    trained (xldm.train.contrastive.load_images)."""
    from xldm.reproduce.metrics import to_evaluator_pixels

    pixels = to_evaluator_pixels(list(images), evaluator.tower_config.image_size)
    with torch.no_grad():
        features = evaluator.image_tower(pixels.float() / 127.5 - 1.0)
    return features.double().numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition (negative rounding
    errors clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with tr((S_a S_b)^(1/2)) computed as
    tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix, so both roots are symmetric eigendecompositions."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, found {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    cross = np.trace(_sqrt_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean and a 95 % confidence interval half-width (normal approximation, 1.96 standard errors) over seeds."""
    x = np.asarray(values, dtype=np.float64)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": float(half), "values": [float(v) for v in x]}


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (Pech-Pacheco et al. 2000): higher = sharper."""
    g = grey(image)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def high_frequency_energy(image: Image.Image, cutoff: float = 0.25) -> float:
    """Share of the grey image's spectral energy (mean removed) above `cutoff` x the Nyquist frequency."""
    g = grey(image)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    h, w = g.shape
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    radius = np.sqrt(fx ** 2 + fy ** 2) / 0.5
    total = spectrum.sum()
    return float(spectrum[radius > cutoff].sum() / total) if total > 0 else 0.0


def subject_mask(image: Image.Image, threshold: float = 0.25) -> np.ndarray:
    """Pixels that are not background: farther than `threshold` (RGB distance / 255, max over channels) from the
    white the data is composited on."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return (1.0 - rgb).max(axis=2) > threshold


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every background region that does not reach the frame filled in: a silhouette, so that a
    subject's white eyes or a white body inside a dark outline count as subject."""
    import cv2

    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    cv2.floodFill(padded, None, (0, 0), 2)  # the background connected to the frame (4-connected)
    return padded[1:-1, 1:-1] != 2


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape; 0.0 when both are empty (nothing to
    match)."""
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, found {a.shape} and {b.shape}")
    union = int(np.logical_or(a, b).sum())
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def centred_disc(shape: tuple[int, int], area: float) -> np.ndarray:
    """A boolean disc of about `area` pixels (radius sqrt(area / pi)) centred in an array of `shape` (clipped by
    the frame when it does not fit): the shapeless blob a silhouette is compared with."""
    if area < 0:
        raise ValueError(f"area must be >= 0, found {area}")
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return (yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2 <= area / math.pi


def touches_frame(image: Image.Image, border: int = 1, min_share: float = 0.2) -> bool:
    """The subject touches the frame: at least `min_share` of the pixels in the outer `border`-pixel ring belong to
    it along some side (a few stray pixels do not count)."""
    mask = subject_mask(image)
    sides = (mask[:border], mask[-border:], mask[:, :border], mask[:, -border:])
    return any(side.mean() >= min_share for side in sides)


# ---------------------------------------------------------------------------------------------------------- report

def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], cell: int = 96) -> Image.Image:
    """Rows of images, each row headed by its label on the left."""
    label_width = 8 + 7 * max((len(s) for s in labels), default=0)
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for y, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, y * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for x, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                        (label_width + x * cell, y * cell))
    return sheet


CELL = 128  # side of a labelled_grid cell: the bundled models' native size


def font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def labelled_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str], *,
                  title: str = "", label_width: int = 150, cell: int = CELL) -> Image.Image:
    """Cells of `cell` x `cell` px with row labels on the left and column labels on top (the README's figures:
    scripts/default_model_figures.py, controlnet_figure.py, shape_following.py)."""
    top = 24 + (20 if title else 0)
    width = label_width + cell * max(len(r) for r in rows)
    canvas = Image.new("RGB", (width, top + cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0), font=font(13))
    for j, text in enumerate(col_labels):
        draw.text((label_width + j * cell + 4, top - 18), text, fill=(60, 60, 60), font=font(11))
    for i, (row, text) in enumerate(zip(rows, row_labels)):
        draw.text((6, top + i * cell + cell // 2 - 8), text, fill=(0, 0, 0), font=font(12))
        for j, image in enumerate(row):
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                         (label_width + j * cell, top + i * cell))
    return canvas


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, title: str, intro: str, sections: Sequence[tuple[str, str]], figures: dict[str, Image.Image],
                 results: dict[str, Any]) -> Path:
    """DIR/report.md (title, what was run, tables, figures) and DIR/results.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name, image in figures.items():
        image.save(out / name)
    parts = [f"# {title}", "", intro, ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body, ""]
    parts += [f"![{name}]({name})" for name in figures]
    (out / "report.md").write_text("\n".join(parts).rstrip() + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return out / "report.md"


def fmt(x: float, digits: int = 2) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def bar_chart(title: str, bars: Sequence[tuple[str, float]], width: int = 480, unit: str = "") -> Image.Image:
    """Horizontal bars, each labelled with its name and value (longest bar = full width)."""
    label_width, row = 8 + 7 * max(len(name) for name, _ in bars), 22
    sheet = Image.new("RGB", (label_width + width + 90, 28 + row * len(bars)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 6), title, fill=(0, 0, 0))
    top = max(value for _, value in bars) or 1.0
    for i, (name, value) in enumerate(bars):
        y = 28 + i * row
        draw.text((4, y + 4), name, fill=(0, 0, 0))
        draw.rectangle((label_width, y + 2, label_width + max(1, int(width * value / top)), y + row - 4),
                       fill=(70, 110, 200))
        draw.text((label_width + int(width * value / top) + 4, y + 4), f"{value:.3g}{unit}", fill=(0, 0, 0))
    return sheet


def stack_vertically(images: Sequence[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), (255, 255, 255))
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    return sheet
