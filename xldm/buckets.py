"""Multi-aspect buckets (Podell et al. 2023, "SDXL", Sec. 2.3 and App. I) and the crop bookkeeping of training on them.

SDXL was fine-tuned on buckets "where we keep the pixel count as close to 1024^2 pixels as possible, varying
height and width accordingly in multiples of 64" (Sec. 2.3); App. I lists the 40 buckets.  A batch holds images of
one bucket; each image is resized to *cover* its bucket, then cropped to it, and the model is told what happened
(Sec. 2.2 and Algorithm 1), as micro-conditioning that must equal what was really done:

* `original_size` = c_size, the (height, width) of the image before any resizing (after EXIF orientation);
* `crop_top_left` = c_crop, the (top, left) of the crop, in the pixels of the resized image;
* `target_size` = the bucket, as (height, width).

Buckets are **(width, height)** pairs, the order of `WIDTHxHEIGHT` on the command line; the paper's table lists
height first and is transposed here.  The three conditioning pairs are (height, width), the order of SDXL's time_ids.

The rule that reproduces the table (`buckets_for_area`): every (width, height) with both sides multiples of `step`,
an aspect ratio between 1:4 and 4:1, and an area in [0.9 * base^2, base^2].  For base 1024 and step 64 it gives 41
sizes: the paper's 40 plus 704x1344, the portrait mirror of the paper's 1344x704, which App. I leaves out (sgm's
demo list `SD_XL_BASE_RATIOS` has it, as "1.91": (1344, 704) in its (W, H) order)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from PIL import Image

Size = tuple[int, int]  # (width, height), or (height, width) / (top, left) where said

# SDXL paper (arXiv 2307.01952), App. I: rows (height, width, height/width) from 512x2048 (0.25) to 2048x512 (4.0),
# transposed to (width, height) and kept in the paper's row order, from the widest landscape to the tallest portrait.
SDXL_BUCKETS: tuple[Size, ...] = (
    (2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
    (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
    (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960),
    (1024, 1024),
    (960, 1024), (960, 1088), (896, 1088), (896, 1152), (832, 1152), (832, 1216),
    (768, 1280), (768, 1344), (704, 1408), (704, 1472), (640, 1536), (640, 1600),
    (576, 1664), (576, 1728), (576, 1792), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
)
SDXL_RULE_EXTRA: Size = (704, 1344)  # the one size of the area rule that App. I does not list

# Rule parameters fitted to App. I: the smallest area in the table is 704*1344 = 946,176 = 0.902 * 1024^2, the
# largest excluded candidate is 640*1472 = 942,080 = 0.898 * 1024^2; the extreme aspect ratios are 1:4 and 4:1.
DEFAULT_MIN_AREA_FRACTION = 0.9
DEFAULT_MAX_ASPECT = 4.0

# Lanczos, as xldm.images and diffusers' VaeImageProcessor resize SDXL inputs (sgm/kohya use OpenCV's INTER_AREA /
# Lanczos); the filter changes pixel values only, never the bookkeeping.
RESAMPLE = Image.Resampling.LANCZOS


def buckets_for_area(base: int = 1024, step: int = 64, *, min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
                     max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[Size, ...]:
    """Every (width, height) with sides multiple of `step`, area in [min_area_fraction * base^2, base^2] and
    aspect ratio between 1:max_aspect and max_aspect:1, ordered like the paper (by height/width, ascending).

    `buckets_for_area(1024, 64)` is `SDXL_BUCKETS` plus `SDXL_RULE_EXTRA`; `buckets_for_area(128, 8)` is that
    divided by 8; a coarser step (e.g. 16) gives fewer buckets.  `base x base` is included when `step` divides it."""
    if base <= 0 or step <= 0:
        raise ValueError(f"base and step must be positive, got base={base}, step={step}")
    if not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"min_area_fraction must be in (0, 1], got {min_area_fraction}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    max_area = base * base
    min_area, sizes = min_area_fraction * max_area, []
    # No side can exceed base * sqrt(max_aspect): then the other side would be too short for the aspect limit.
    for height in range(step, int(base * math.sqrt(max_aspect)) + 1, step):
        # The widest width that keeps the area <= base^2, then narrower ones while the area stays large enough.
        width = (max_area // height) // step * step
        while width >= step and width * height >= min_area:
            if max(width, height) <= max_aspect * min(width, height):
                sizes.append((width, height))
            width -= step
    return tuple(sorted(sizes, key=lambda size: Fraction(size[1], size[0])))


def training_buckets(base_size: int, step: int) -> tuple[Size, ...]:
    """The buckets of a model trained at `base_size`^2 pixels with sides in multiples of `step`: the paper's table
    for 1024/64, the rule behind it otherwise.  `step` must keep the latent divisible by the UNet's downsampling:
    8 (VAE) x 2^(levels - 1), i.e. 64 for SDXL's three levels."""
    return SDXL_BUCKETS if (base_size, step) == (1024, 64) else buckets_for_area(base_size, step)


def _check_size(width: int, height: int, what: str = "width and height") -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} must be positive, got {width}x{height}")


def nearest_bucket(width: int, height: int, buckets: Sequence[Size] = SDXL_BUCKETS) -> Size:
    """The bucket whose aspect ratio is closest to `width/height` in log-ratio distance |log(w/h) - log(bw/bh)|
    (so 2:1 and 1:2 are equally far from 1:1), compared exactly as fractions; ties go to the larger area, then the
    smaller width, so the answer never depends on the order of `buckets`."""
    _check_size(width, height)
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket")
    target = Fraction(width, height)

    def key(bucket: Size) -> tuple[Fraction, int, int]:
        _check_size(*bucket)
        ratio = Fraction(*bucket)
        return max(target / ratio, ratio / target), -bucket[0] * bucket[1], bucket[0]  # exp(|log a - log b|)

    return min(buckets, key=key)


def scaled_buckets(side: int, buckets: Iterable[Size] = SDXL_BUCKETS) -> list[Size]:
    """The buckets of a 1024^2 table scaled to a model of native size `side`, sides rounded to multiples of 8
    (at least 8), without repeats, in the table's order."""
    scale, sizes = side / 1024, []
    for w, h in buckets:
        size = (max(8, round(w * scale / 8) * 8), max(8, round(h * scale / 8) * 8))
        if size not in sizes:
            sizes.append(size)
    return sizes


def format_sizes(buckets: Iterable[Size] = SDXL_BUCKETS) -> str:
    """The table of `xldm generate --list-sizes`: a header, then `WIDTHxHEIGHT  aspect` (w/h, two decimals)."""
    rows = [(f"{w}x{h}", f"{w / h:.2f}") for w, h in buckets]
    size_width = max([len("size (WxH)")] + [len(size) for size, _ in rows])
    lines = [f"{'size (WxH)':<{size_width}}  aspect (w/h)"]
    return "\n".join(lines + [f"{size:<{size_width}}  {aspect:>5}" for size, aspect in rows])


@dataclass(frozen=True)
class Placement:
    """What happens to one image: cover-resize to `resized_size`, then crop `bucket` at `crop_top_left`."""

    bucket: Size  # (width, height) the image is trained at; as (height, width) it is SDXL's target_size
    original_size: Size  # (height, width) before any resizing: SDXL's c_size
    resized_size: Size  # (height, width) after the cover-resize; both sides >= the bucket's
    crop_top_left: Size  # (top, left) of the crop in the resized image's pixels: SDXL's c_crop

    @property
    def target_size(self) -> Size:
        return self.bucket[1], self.bucket[0]


def place_in_bucket(width: int, height: int, bucket: Size, rng: random.Random | None, zoom: float = 1.0) -> Placement:
    """Cover-resize a `width` x `height` image to `bucket` (scale = max(bw / w, bh / h)) and choose the crop along the
    side that is too long: at a uniformly random offset (`rng`, SDXL Algorithm 1) or centred (`rng=None`).

    `zoom` > 1 resizes that much further than the cover, so there is spare on both sides and the crop can cut into
    the subject anywhere (`TrainConfig.zoom_crops`); the offsets stay c_crop, in the pixels of the resized image."""
    _check_size(width, height, "image size")
    bucket_width, bucket_height = bucket
    _check_size(bucket_width, bucket_height, "bucket size")
    if not zoom >= 1.0:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    # Exact arithmetic: the side that sets the scale lands exactly on the bucket (times the zoom), the other is
    # rounded half up and clamped, so both sides cover the bucket; without zoom the excess lies on one side only.
    scale = max(Fraction(bucket_width, width), Fraction(bucket_height, height)) * Fraction(zoom)
    resized_width = max(bucket_width, int((width * scale * 2 + 1) // 2))
    resized_height = max(bucket_height, int((height * scale * 2 + 1) // 2))
    spare_top, spare_left = resized_height - bucket_height, resized_width - bucket_width
    if rng is None:
        top, left = spare_top // 2, spare_left // 2
    else:
        top, left = rng.randint(0, spare_top), rng.randint(0, spare_left)
    return Placement(bucket=(bucket_width, bucket_height), original_size=(height, width),
                     resized_size=(resized_height, resized_width), crop_top_left=(top, left))


def place(width: int, height: int, buckets: Sequence[Size], rng: random.Random | None) -> Placement:
    """Where a `width` x `height` image (after EXIF orientation) goes: its nearest bucket, the cover-resize and the
    crop of `place_in_bucket`."""
    return place_in_bucket(width, height, nearest_bucket(width, height, buckets), rng)


def apply_placement(image: Image.Image, placement: Placement, resample: Image.Resampling = RESAMPLE) -> Image.Image:
    """`image.resize(resized).crop((left, top, left + bw, top + bh))`: exactly bucket-sized.  `image` must have
    the placement's original size (checked)."""
    height, width = placement.original_size
    if image.size != (width, height):
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} (WxH) but the placement was made for {width}x{height}")
    (resized_height, resized_width), (top, left) = placement.resized_size, placement.crop_top_left
    bucket_width, bucket_height = placement.bucket
    if (resized_width, resized_height) != image.size:
        image = image.resize((resized_width, resized_height), resample=resample)
    return image.crop((left, top, left + bucket_width, top + bucket_height))
