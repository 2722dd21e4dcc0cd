"""Bucket properties of multi-aspect training (SDXL paper Sec. 2.2-2.3, App. I).

For many random input sizes: the bucket is deterministic, within the pixel budget, a multiple of 64, and the
nearest in aspect ratio; the cover-resize covers the bucket with the excess on one side only; and the crop
coordinates handed to the model equal the crop actually taken, checked on pixel content.  All comparisons are
exact (integers, uint8 pixels: max abs diff 0), except where a tolerance is stated.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from xldm.buckets import (
    SDXL_BUCKETS, Placement, apply_placement, buckets_for_area, nearest_bucket, place, place_in_bucket,
    training_buckets,
)

SDXL_AREA = 1024 * 1024


def random_sizes(count: int, seed: int, longest: int = 6000) -> list[tuple[int, int]]:
    """(width, height) pairs with log-uniform sides (aspect ratios from about 1:100 to 100:1)."""
    rng = random.Random(seed)
    return [(max(1, round(math.exp(rng.uniform(0, math.log(longest))))),
             max(1, round(math.exp(rng.uniform(0, math.log(longest)))))) for _ in range(count)]


def coordinate_image(width: int, height: int) -> Image.Image:
    """Each pixel encodes its own (x, y): R = x mod 256, G = y mod 256, B = (x // 256) + 16 * (y // 256)."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    array = np.stack([x % 256, y % 256, x // 256 + 16 * (y // 256)], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def decode_coordinates(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(image).astype(np.int64)
    return array[..., 0] + 256 * (array[..., 2] % 16), array[..., 1] + 256 * (array[..., 2] // 16)


def test_training_buckets_are_the_paper_table_or_the_scaled_rule() -> None:
    assert training_buckets(1024, 64) == SDXL_BUCKETS and len(training_buckets(1024, 64)) == 40
    small = training_buckets(64, 8)
    assert small == buckets_for_area(64, 8)
    assert (64, 64) in small and (80, 48) in small and (48, 80) in small
    for width, height in small:
        assert width % 8 == 0 and height % 8 == 0
        assert 0.9 * 64 * 64 <= width * height <= 64 * 64


def test_chosen_bucket_is_deterministic_in_budget_multiple_of_64_and_nearest() -> None:
    shuffled = list(SDXL_BUCKETS)
    random.Random(1).shuffle(shuffled)
    for width, height in random_sizes(600, seed=0):
        bucket = nearest_bucket(width, height, SDXL_BUCKETS)
        assert bucket == nearest_bucket(width, height, SDXL_BUCKETS)  # same call, same answer
        assert bucket == nearest_bucket(width, height, shuffled)  # independent of the table's order
        assert bucket in SDXL_BUCKETS
        bucket_width, bucket_height = bucket
        assert bucket_width % 64 == 0 and bucket_height % 64 == 0
        assert 0.9 * SDXL_AREA <= bucket_width * bucket_height <= SDXL_AREA
        # Nearest in log aspect ratio, against a brute force over the table (exact fractions).
        def distance(b: tuple[int, int]) -> Fraction:
            ratio, target = Fraction(b[0], b[1]), Fraction(width, height)
            return max(ratio / target, target / ratio)
        assert distance(bucket) == min(distance(b) for b in SDXL_BUCKETS)


@pytest.mark.parametrize("buckets", [SDXL_BUCKETS, training_buckets(128, 16)], ids=["sdxl", "small"])
def test_placement_covers_the_bucket_with_the_excess_on_one_side(buckets) -> None:
    rng = random.Random(5)
    for width, height in random_sizes(400, seed=2):
        p = place(width, height, buckets, rng)
        bucket_width, bucket_height = p.bucket
        resized_height, resized_width = p.resized_size
        assert p.bucket == nearest_bucket(width, height, buckets)
        assert p.target_size == (bucket_height, bucket_width)
        assert p.original_size == (height, width)
        # Cover: both sides >= the bucket, the side that sets the scale exactly on it.
        assert resized_width >= bucket_width and resized_height >= bucket_height
        assert resized_width == bucket_width or resized_height == bucket_height
        # The other side is the exact scale rounded (within 0.5 px), unless clamped up to the bucket.
        scale = max(Fraction(bucket_width, width), Fraction(bucket_height, height))
        assert abs(resized_width - width * scale) <= Fraction(1, 2) or resized_width == bucket_width
        assert abs(resized_height - height * scale) <= Fraction(1, 2) or resized_height == bucket_height
        top, left = p.crop_top_left
        assert 0 <= top <= resized_height - bucket_height and 0 <= left <= resized_width - bucket_width
        centred = place(width, height, buckets, None)
        assert centred.crop_top_left == ((resized_height - bucket_height) // 2, (resized_width - bucket_width) // 2)


def test_random_crop_is_uniform_over_the_spare_pixels() -> None:
    # 1024 x 1100 placed in 1024x1024: no resize, 76 spare rows, so every top offset 0..76 must occur.
    rng = random.Random(0)
    tops = [place_in_bucket(1024, 1100, (1024, 1024), rng).crop_top_left for _ in range(4000)]
    assert {left for _, left in tops} == {0}
    counts = np.bincount([top for top, _ in tops], minlength=77)
    assert len(counts) == 77 and counts.min() > 0
    assert counts.max() < 2 * 4000 / 77  # loose uniformity bound (expected 52 per offset)
    # The same generator state gives the same crop.
    assert place(1024, 1100, SDXL_BUCKETS, random.Random(7)) == place(1024, 1100, SDXL_BUCKETS, random.Random(7))
    # By aspect ratio 1024x1100 goes to 960x1024 instead, with a 7-row excess.
    p = place(1024, 1100, SDXL_BUCKETS, None)
    assert (p.bucket, p.resized_size, p.crop_top_left) == ((960, 1024), (1031, 960), (3, 0))


def test_crop_coordinates_equal_the_crop_taken_without_resize() -> None:
    # Images whose short side already equals the bucket's: the resize is the identity, so each output pixel's
    # encoded source coordinate must be exactly (left + x, top + y).  Max abs diff 0.
    rng = random.Random(3)
    checked = 0
    for bucket_width, bucket_height in SDXL_BUCKETS[::3]:
        for extra in (1, 17, 150):
            wide = bucket_width / bucket_height >= 1
            width, height = (bucket_width + extra, bucket_height) if wide else (bucket_width, bucket_height + extra)
            p = place_in_bucket(width, height, (bucket_width, bucket_height), rng)
            assert p.resized_size == (height, width)
            out = apply_placement(coordinate_image(width, height), p)
            assert out.size == (bucket_width, bucket_height)
            xs, ys = decode_coordinates(out)
            top, left = p.crop_top_left
            assert np.array_equal(xs, np.arange(bucket_width)[None, :] + left + 0 * ys)
            assert np.array_equal(ys, np.arange(bucket_height)[:, None] + top + 0 * xs)
            checked += 1
    assert checked == 3 * len(SDXL_BUCKETS[::3])


def test_crop_coordinates_equal_the_crop_taken_with_resize() -> None:
    rng = random.Random(4)
    buckets = training_buckets(128, 16)
    for width, height in random_sizes(40, seed=9, longest=700):
        width, height = max(width, 2), max(height, 2)
        p = place(width, height, buckets, rng)
        image = coordinate_image(width, height)
        top, left = p.crop_top_left
        (bucket_width, bucket_height), (resized_height, resized_width) = p.bucket, p.resized_size
        # 1) The default (Lanczos) output is exactly the resized image cropped at crop_top_left (max abs diff 0).
        resized = image.resize((resized_width, resized_height), resample=Image.Resampling.LANCZOS)
        expected = resized.crop((left, top, left + bucket_width, top + bucket_height))
        assert np.array_equal(np.asarray(apply_placement(image, p)), np.asarray(expected))
        # 2) With nearest-neighbour resampling the content can be decoded: output pixel (x, y) comes from source
        # pixel floor((left + x + 0.5) * w / resized_w), likewise for y (Pillow's pixel-centre mapping).
        # Tolerance 1 source pixel: Pillow accumulates the step in floating point, so a few pixels that fall
        # exactly on a boundary round the other way (mean abs error < 0.25 px).
        out = apply_placement(image, p, resample=Image.Resampling.NEAREST)
        xs, ys = decode_coordinates(out)
        expected_x = np.floor((left + np.arange(bucket_width) + 0.5) * width / resized_width).astype(np.int64)
        expected_y = np.floor((top + np.arange(bucket_height) + 0.5) * height / resized_height).astype(np.int64)
        assert np.abs(xs - expected_x[None, :]).max() <= 1 and np.abs(ys - expected_y[:, None]).max() <= 1
        assert np.abs(xs - expected_x[None, :]).mean() < 0.25 and np.abs(ys - expected_y[:, None]).mean() < 0.25


def test_apply_placement_refuses_an_image_of_another_size() -> None:
    p = Placement(bucket=(64, 64), original_size=(80, 64), resized_size=(80, 64), crop_top_left=(3, 0))
    with pytest.raises(ValueError, match="placement was made for 64x80"):
        apply_placement(Image.new("RGB", (80, 64)), p)
    assert apply_placement(Image.new("RGB", (64, 80)), p).size == (64, 64)


def test_place_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        place(0, 10, SDXL_BUCKETS, None)
    with pytest.raises(ValueError, match="positive"):
        place_in_bucket(10, 10, (0, 64), None)


def test_zoom_leaves_spare_on_both_sides_and_the_crop_is_what_is_taken() -> None:
    # A square image in a square bucket has no spare pixels; zoom 1.5 resizes it to 1.5x the bucket, so crops
    # land anywhere in [0, 64] on both axes (TrainConfig.zoom_crops).
    rng = random.Random(5)
    crops = {place_in_bucket(128, 128, (128, 128), rng, zoom=1.5).crop_top_left for _ in range(400)}
    assert place_in_bucket(128, 128, (128, 128), rng, zoom=1.5).resized_size == (192, 192)
    tops, lefts = {top for top, _ in crops}, {left for _, left in crops}
    assert min(tops) >= 0 and max(tops) <= 64 and min(lefts) >= 0 and max(lefts) <= 64
    assert len(tops) > 40 and len(lefts) > 40
    # zoom 1 is the plain cover-resize, with the same draws.
    assert place_in_bucket(70, 66, (64, 64), random.Random(1), zoom=1.0) == place_in_bucket(70, 66, (64, 64),
                                                                                          random.Random(1))
    # The pixels are the zoomed image cropped at crop_top_left (max abs diff 0).
    image = coordinate_image(100, 60)
    p = place_in_bucket(100, 60, (80, 48), random.Random(2), zoom=1.37)
    assert p.resized_size[0] > 48 and p.resized_size[1] > 80
    top, left = p.crop_top_left
    resized = image.resize(p.resized_size[::-1], resample=Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(apply_placement(image, p)), np.asarray(resized.crop((left, top, left + 80, top + 48))))
    with pytest.raises(ValueError, match="zoom must be >= 1"):
        place_in_bucket(64, 64, (64, 64), None, zoom=0.9)
