"""Aspect-ratio buckets against the SDXL paper's App. I table (Podell et al. 2023, arXiv 2307.01952).

All comparisons are exact (integer sizes); aspect ratios against the paper's two-decimal column use a tolerance
of 0.005 (the rounding of the printed column).
"""

from __future__ import annotations

import math

import pytest

from xldm.buckets import (
    SDXL_BUCKETS,
    SDXL_RULE_EXTRA,
    buckets_for_area,
    format_sizes,
    nearest_bucket,
)

# App. I, transcribed as printed: (height, width, aspect ratio = height / width).
PAPER_ROWS = [
    (512, 2048, 0.25), (512, 1984, 0.26), (512, 1920, 0.27), (512, 1856, 0.28),
    (576, 1792, 0.32), (576, 1728, 0.33), (576, 1664, 0.35),
    (640, 1600, 0.4), (640, 1536, 0.42),
    (704, 1472, 0.48), (704, 1408, 0.5), (704, 1344, 0.52),
    (768, 1344, 0.57), (768, 1280, 0.6),
    (832, 1216, 0.68), (832, 1152, 0.72),
    (896, 1152, 0.78), (896, 1088, 0.82),
    (960, 1088, 0.88), (960, 1024, 0.94),
    (1024, 1024, 1.0),
    (1024, 960, 1.07), (1088, 960, 1.13), (1088, 896, 1.21), (1152, 896, 1.29), (1152, 832, 1.38),
    (1216, 832, 1.46), (1280, 768, 1.67), (1344, 768, 1.75), (1408, 704, 2.0), (1472, 704, 2.09),
    (1536, 640, 2.4), (1600, 640, 2.5), (1664, 576, 2.89), (1728, 576, 3.0), (1792, 576, 3.11),
    (1856, 512, 3.62), (1920, 512, 3.75), (1984, 512, 3.88), (2048, 512, 4.0),
]
ASPECT_COLUMN_TOL = 0.005


def test_sdxl_buckets_are_the_paper_table_as_width_height() -> None:
    assert len(PAPER_ROWS) == 40
    assert SDXL_BUCKETS == tuple((width, height) for height, width, _ in PAPER_ROWS)
    assert len(set(SDXL_BUCKETS)) == 40
    for (width, height), (_, _, printed) in zip(SDXL_BUCKETS, PAPER_ROWS):
        assert abs(height / width - printed) <= ASPECT_COLUMN_TOL, (width, height, printed)
        assert width % 64 == 0 and height % 64 == 0
        assert 0.9 * 1024**2 <= width * height <= 1024**2  # "pixel count as close to 1024^2 as possible"
    assert SDXL_BUCKETS[0] == (2048, 512) and SDXL_BUCKETS[20] == (1024, 1024) and SDXL_BUCKETS[-1] == (512, 2048)


def test_rule_reproduces_the_paper_table_except_one_mirror() -> None:
    rule = buckets_for_area(1024, 64)
    assert len(rule) == 41
    # Exactly one deviation: the rule also yields 704x1344 (width x height), the mirror of the paper's 1344x704.
    assert set(rule) - set(SDXL_BUCKETS) == {SDXL_RULE_EXTRA} == {(704, 1344)}
    assert set(SDXL_BUCKETS) <= set(rule)
    assert (1344, 704) in SDXL_BUCKETS
    assert tuple(size for size in rule if size != SDXL_RULE_EXTRA) == SDXL_BUCKETS  # same order too
    # Every other size is mirrored in the table: the rule is symmetric, the paper nearly so.
    assert {(h, w) for w, h in rule} == set(rule)
    assert [size for size in SDXL_BUCKETS if (size[1], size[0]) not in SDXL_BUCKETS] == [(1344, 704)]


def test_rule_edges_are_those_fitted_to_the_paper() -> None:
    # The smallest table area (704*1344) is just above 0.9 * 1024^2; the largest excluded 64-multiple is just below.
    assert 704 * 1344 == min(w * h for w, h in SDXL_BUCKETS) == 946_176
    assert 640 * 1472 == 942_080 < 0.9 * 1024**2 < 946_176
    assert (1472, 640) not in buckets_for_area(1024, 64)
    # 1:4 is the widest: 448x1792 would fit the area bound only with a longer side than 4x the shorter.
    assert all(max(w, h) <= 4 * min(w, h) for w, h in buckets_for_area(1024, 64))
    assert buckets_for_area(1024, 64, max_aspect=2.0) == tuple(
        s for s in buckets_for_area(1024, 64) if max(s) <= 2 * min(s)
    )


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_smaller_base_with_proportional_step_is_the_table_scaled(scale: int) -> None:
    expected = tuple((w // scale, h // scale) for w, h in buckets_for_area(1024, 64))
    assert buckets_for_area(1024 // scale, 64 // scale) == expected
    assert (128, 128) in buckets_for_area(128, 8) and len(buckets_for_area(128, 8)) == 41


def test_coarser_step_for_a_tiny_model() -> None:
    tiny = buckets_for_area(128, 16)
    assert tiny == (
        (256, 64), (240, 64), (192, 80), (160, 96), (144, 112), (128, 128),
        (112, 144), (96, 160), (80, 192), (64, 240), (64, 256),
    )
    assert all(w % 16 == 0 and h % 16 == 0 and 0.9 * 128**2 <= w * h <= 128**2 for w, h in tiny)


def test_buckets_for_area_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="base and step must be positive"):
        buckets_for_area(0, 64)
    with pytest.raises(ValueError, match="min_area_fraction"):
        buckets_for_area(1024, 64, min_area_fraction=1.5)
    with pytest.raises(ValueError, match="max_aspect"):
        buckets_for_area(1024, 64, max_aspect=0.5)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((1024, 1024), (1024, 1024)),
        ((512, 512), (1024, 1024)),
        ((1920, 1080), (1344, 768)),  # 16:9 = 1.778 -> 1.75
        ((1080, 1920), (768, 1344)),
        ((3000, 2000), (1216, 832)),  # 1.5 -> 1.46
        ((4000, 3000), (1152, 896)),  # 4:3 = 1.333 -> 1.29 (1.38 is farther in log distance)
        ((100, 10_000), (512, 2048)),  # beyond the table: the extreme bucket
        ((1344, 704), (1344, 704)),
    ],
)
def test_nearest_bucket_by_log_aspect_ratio(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert nearest_bucket(*size) == expected
    # Independent check with float logs: no bucket is closer than the answer (tolerance 1e-12).
    width, height = size
    distance = lambda b: abs(math.log(width / height) - math.log(b[0] / b[1]))  # noqa: E731
    assert distance(expected) <= min(distance(b) for b in SDXL_BUCKETS) + 1e-12


def test_nearest_bucket_ties_are_deterministic() -> None:
    # 2:1 and 1:2 are equally far from 1:1 in log ratio; the tie goes to the larger area, then the smaller width.
    assert nearest_bucket(10, 10, [(200, 100), (100, 200)]) == (100, 200)
    assert nearest_bucket(10, 10, [(100, 200), (200, 100)]) == (100, 200)
    assert nearest_bucket(10, 10, [(100, 200), (300, 150)]) == (300, 150)  # same distance, larger area
    # Equal ratios: the larger bucket wins regardless of order.
    assert nearest_bucket(3, 2, [(96, 64), (192, 128)]) == nearest_bucket(3, 2, [(192, 128), (96, 64)]) == (192, 128)
    # The log-space midpoint of 1:1 and 3:2 is sqrt(1.5) = 1.22474...; near-ties are decided exactly.
    assert nearest_bucket(1225, 1000, [(1000, 1000), (1500, 1000)]) == (1500, 1000)  # 1.225^2 = 1.500625 > 1.5
    assert nearest_bucket(1224, 1000, [(1000, 1000), (1500, 1000)]) == (1000, 1000)  # 1.224^2 = 1.498176 < 1.5


def test_nearest_bucket_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive, got 0x512"):
        nearest_bucket(0, 512)
    with pytest.raises(ValueError, match="at least one bucket"):
        nearest_bucket(512, 512, [])


def test_format_sizes_lists_width_by_height_and_aspect() -> None:
    text = format_sizes()
    lines = text.splitlines()
    assert len(lines) == 41  # header + 40 buckets
    assert lines[0].split() == ["size", "(WxH)", "aspect", "(w/h)"]
    assert lines[1].split() == ["2048x512", "4.00"]
    assert lines[13].split() == ["1344x768", "1.75"]
    assert lines[21].split() == ["1024x1024", "1.00"]
    assert lines[-1].split() == ["512x2048", "0.25"]
    for line, (w, h) in zip(lines[1:], SDXL_BUCKETS):
        size, aspect = line.split()
        assert size == f"{w}x{h}" and abs(float(aspect) - w / h) <= 0.005
    assert format_sizes([(64, 32)]).splitlines()[1].split() == ["64x32", "2.00"]
