"""The crop and size bookkeeping of SDXL's multi-aspect training (Podell et al. 2023, arXiv 2307.01952).

Sec. 2.3: images are grouped into buckets of about 1024^2 pixels with sides in multiples of 64 (App. I), and a
batch holds images of one bucket.  Each image is resized to *cover* its bucket and then cropped to it.
Sec. 2.2 ("Conditioning the model on cropping parameters") and Algorithm 1: the model is told what happened,
as micro-conditioning that must equal what was really done (the paper's Table 2 depends on it):

* `original_size` = c_size, the (height, width) of the image before any resizing (after EXIF orientation,
  since that is the image a person looks at);
* `crop_top_left` = c_crop, the (top, left) of the crop, in the pixels of the resized image;
* `target_size` = the bucket, as (height, width).

Buckets themselves are `(width, height)` pairs, as everywhere in xldm (see `xldm.buckets`); the three
conditioning pairs are (height, width), the order of SDXL's `time_ids`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from collections.abc import Sequence

from PIL import Image

from xldm.buckets import SDXL_BUCKETS, buckets_for_area, nearest_bucket

Size = tuple[int, int]

# Lanczos, as xldm.images and diffusers' VaeImageProcessor use for SDXL inputs: Pillow's antialiased filter
# with the least blur when shrinking, which is the usual direction here.  (sgm/kohya resize with OpenCV's
# INTER_AREA / Lanczos; the choice only changes pixel values, never the bookkeeping.)
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class Placement:
    """What happens to one image: cover-resize to `resized_size`, then crop `bucket` at `crop_top_left`."""

    bucket: Size  # (width, height) the image is trained at; as (height, width) it is SDXL's target_size
    original_size: Size  # (height, width) before any resizing: SDXL's c_size
    resized_size: Size  # (height, width) after the cover-resize; both sides >= the bucket's
    crop_top_left: Size  # (top, left) of the crop in the resized image's pixels: SDXL's c_crop

    @property
    def target_size(self) -> Size:
        """The bucket as (height, width), the order of SDXL's time_ids."""
        return self.bucket[1], self.bucket[0]


def training_buckets(base_size: int, step: int) -> tuple[Size, ...]:
    """The bucket table for a model trained at `base_size`^2 pixels with sides in multiples of `step`.

    1024/64 is the SDXL paper's App. I table (`xldm.buckets.SDXL_BUCKETS`, 40 sizes); any other pair uses the
    rule behind it (`buckets_for_area`: area in [0.9, 1] x base^2, aspect 1:4 to 4:1).  `step` must keep the
    latent divisible by the UNet's downsampling: 8 (VAE) x 2^(levels - 1), i.e. 64 for SDXL's three levels.
    """
    if base_size == 1024 and step == 64:
        return SDXL_BUCKETS
    return buckets_for_area(base_size, step)


def choose_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket (width, height) nearest in aspect ratio to a `width` x `height` image: exact log-ratio
    distance, ties to the larger area then the smaller width, independent of the table's order."""
    return nearest_bucket(width, height, buckets)


def _round_half_up(value: Fraction) -> int:
    return int((value * 2 + 1) // 2)


def place_in_bucket(width: int, height: int, bucket: Size, rng: random.Random | None, zoom: float = 1.0) -> Placement:
    """Cover-resize a `width` x `height` image to `bucket` and choose the crop (see `place`).

    `zoom` > 1 resizes that much further than the cover, so there is spare on both sides and the crop can cut
    into the subject anywhere (`TrainConfig.zoom_crops`); the crop offsets stay SDXL's c_crop, in the pixels of
    the image as resized."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    bucket_width, bucket_height = bucket
    if bucket_width <= 0 or bucket_height <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_width}x{bucket_height}")
    if not zoom >= 1.0:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    # Exact arithmetic: the side that sets the scale lands exactly on the bucket (times the zoom), the other is
    # rounded and then clamped, so both sides are >= the bucket's (the resize covers it); without zoom the excess
    # lies on one side only.
    scale = max(Fraction(bucket_width, width), Fraction(bucket_height, height)) * Fraction(zoom)
    resized_width = max(bucket_width, _round_half_up(width * scale))
    resized_height = max(bucket_height, _round_half_up(height * scale))
    spare_top, spare_left = resized_height - bucket_height, resized_width - bucket_width
    if rng is None:  # centre crop
        top, left = spare_top // 2, spare_left // 2
    else:  # SDXL Algorithm 1: crop offsets drawn uniformly
        top, left = rng.randint(0, spare_top), rng.randint(0, spare_left)
    return Placement(
        bucket=(bucket_width, bucket_height),
        original_size=(height, width),
        resized_size=(resized_height, resized_width),
        crop_top_left=(top, left),
    )


def place(width: int, height: int, buckets: Sequence[Size], rng: random.Random | None) -> Placement:
    """Where a `width` x `height` image (after EXIF orientation) goes: its bucket by aspect ratio, the resize
    that covers the bucket (scale = max(bw / w, bh / h)), and a crop along the side that is too long, at a
    uniformly random offset (`rng`) or centred (`rng=None`)."""
    return place_in_bucket(width, height, choose_bucket(width, height, buckets), rng)


def apply_placement(image: Image.Image, placement: Placement, resample: Image.Resampling = RESAMPLE) -> Image.Image:
    """Resize `image` to `placement.resized_size` and crop the bucket at `placement.crop_top_left`.

    The result is exactly bucket-sized and equals `image.resize(resized).crop((left, top, left + bw, top + bh))`.
    `image` must have the placement's original size (checked).
    """
    height, width = placement.original_size
    if image.size != (width, height):
        raise ValueError(
            f"image is {image.size[0]}x{image.size[1]} (WxH) but the placement was made for {width}x{height}"
        )
    resized_height, resized_width = placement.resized_size
    top, left = placement.crop_top_left
    bucket_width, bucket_height = placement.bucket
    if (resized_width, resized_height) != image.size:
        image = image.resize((resized_width, resized_height), resample=resample)
    return image.crop((left, top, left + bucket_width, top + bucket_height))


__all__ = [
    "RESAMPLE", "Placement", "apply_placement", "choose_bucket", "place", "place_in_bucket", "training_buckets",
]
