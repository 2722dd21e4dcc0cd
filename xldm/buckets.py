"""Multi-aspect resolution buckets: the SDXL paper's table, the rule behind it, and nearest-bucket lookup.

SDXL was fine-tuned on buckets "where we keep the pixel count as close to 1024^2 pixels as possible, varying
height and width accordingly in multiples of 64" (Podell et al. 2023, Sec. 2.3); App. I lists the 40 buckets.

Every size in this module is a pair **(width, height)**, the order of `WIDTHxHEIGHT` on the command line
(`xldm generate --size 1344x768`).  The paper's table lists height first; it is transposed here.

The rule that reproduces the table (see `buckets_for_area`): every (width, height) with both sides multiples of
`step`, an aspect ratio between 1:4 and 4:1, and an area in [0.9 * base^2, base^2].  For base 1024 and step 64 this
gives 41 sizes: the paper's 40 plus 704x1344 (width x height), the portrait mirror of the paper's 1344x704, which
App. I leaves out (sgm's demo list `SD_XL_BASE_RATIOS` does have it, as "1.91": (1344, 704) in its (W, H) order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

Size = tuple[int, int]  # (width, height)

# SDXL paper (arXiv 2307.01952), App. I, "Multi-Aspect Training Hyperparameters": the paper's rows are
# (height, width, aspect ratio = height/width) from 512x2048 (0.25) to 2048x512 (4.0).  Here transposed to
# (width, height) and kept in the paper's row order, i.e. from the widest landscape to the tallest portrait.
SDXL_BUCKETS: tuple[Size, ...] = (
    (2048, 512), (1984, 512), (1920, 512), (1856, 512),
    (1792, 576), (1728, 576), (1664, 576),
    (1600, 640), (1536, 640),
    (1472, 704), (1408, 704), (1344, 704),
    (1344, 768), (1280, 768),
    (1216, 832), (1152, 832),
    (1152, 896), (1088, 896),
    (1088, 960), (1024, 960),
    (1024, 1024),
    (960, 1024), (960, 1088),
    (896, 1088), (896, 1152),
    (832, 1152), (832, 1216),
    (768, 1280), (768, 1344),
    (704, 1408), (704, 1472),
    (640, 1536), (640, 1600),
    (576, 1664), (576, 1728), (576, 1792),
    (512, 1856), (512, 1920), (512, 1984), (512, 2048),
)

# The one size the area rule produces that App. I does not list (see the module docstring).
SDXL_RULE_EXTRA: Size = (704, 1344)

# Rule parameters fitted to App. I: the smallest area in the table is 704*1344 = 946,176 = 0.902 * 1024^2, the
# largest excluded candidate is 640*1472 = 942,080 = 0.898 * 1024^2; the extreme aspect ratios are 1:4 and 4:1.
DEFAULT_MIN_AREA_FRACTION = 0.9
DEFAULT_MAX_ASPECT = 4.0


def _aspect_key(size: Size) -> Fraction:
    """Sort key of the paper's row order: height / width, ascending (widest first)."""
    width, height = size
    return Fraction(height, width)


def buckets_for_area(
    base: int = 1024,
    step: int = 64,
    *,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> tuple[Size, ...]:
    """Every (width, height) with sides multiple of `step`, area in [min_area_fraction * base^2, base^2] and
    aspect ratio between 1:max_aspect and max_aspect:1, ordered like the paper (by height/width, ascending).

    `buckets_for_area(1024, 64)` is `SDXL_BUCKETS` plus `SDXL_RULE_EXTRA`.  A smaller base gives the same rule
    for a small model: `buckets_for_area(128, 8)` is the SDXL table divided by 8 (plus the extra size); a coarser
    step (e.g. `buckets_for_area(128, 16)`) gives fewer buckets.  The square `base x base` is always included
    when `base` is a multiple of `step`.
    """
    if base <= 0 or step <= 0:
        raise ValueError(f"base and step must be positive, got base={base}, step={step}")
    if not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"min_area_fraction must be in (0, 1], got {min_area_fraction}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    max_area = base * base
    min_area = min_area_fraction * max_area
    # No side can exceed base * sqrt(max_aspect): then the other side would be too short for the aspect limit.
    longest = int(base * math.sqrt(max_aspect))
    sizes = []
    for height in range(step, longest + 1, step):
        # The widest width that keeps the area <= base^2, then narrower ones while the area stays large enough.
        width = (max_area // height) // step * step
        while width >= step and width * height >= min_area:
            if max(width, height) <= max_aspect * min(width, height):
                sizes.append((width, height))
            width -= step
    return tuple(sorted(sizes, key=_aspect_key))


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")


def nearest_bucket(width: int, height: int, buckets: Sequence[Size] = SDXL_BUCKETS) -> Size:
    """The bucket (width, height) whose aspect ratio is closest to `width/height` in log-ratio distance
    |log(w/h) - log(bw/bh)|, so 2:1 and 1:2 are equally far from 1:1.

    Distances are compared exactly (as fractions), and ties go to the bucket with the larger area, then to
    the one with the smaller width, so the answer never depends on the order of `buckets`.
    """
    _check_size(width, height)
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket")
    target = Fraction(width, height)

    def key(bucket: Size) -> tuple[Fraction, int, int]:
        bucket_width, bucket_height = bucket
        _check_size(bucket_width, bucket_height)
        ratio = Fraction(bucket_width, bucket_height)
        # exp(|log a - log b|) = max(a/b, b/a): monotone in the log distance, and exact.
        distance = max(target / ratio, ratio / target)
        return distance, -bucket_width * bucket_height, bucket_width

    return min(buckets, key=key)


def format_sizes(buckets: Iterable[Size] = SDXL_BUCKETS) -> str:
    """A table for `xldm generate --list-sizes`: a header, then one `WIDTHxHEIGHT  aspect` line per bucket,
    where aspect is width/height with two decimals (1.75 for 1344x768)."""
    rows = [(f"{w}x{h}", f"{w / h:.2f}") for w, h in buckets]
    size_width = max([len("size (WxH)")] + [len(size) for size, _ in rows])
    lines = [f"{'size (WxH)':<{size_width}}  aspect (w/h)"]
    lines += [f"{size:<{size_width}}  {aspect:>5}" for size, aspect in rows]
    return "\n".join(lines)


__all__ = [
    "SDXL_BUCKETS", "SDXL_RULE_EXTRA", "Size", "buckets_for_area", "format_sizes", "nearest_bucket",
]
