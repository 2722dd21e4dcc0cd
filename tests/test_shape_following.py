"""The shape-following measure (scripts/shape_following.py): mask IoU on hand-made masks with known values, the
per-category scoring, the reference loader, and the script end to end on the bundled model at 2 steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import load_script
from xldm.reproduce.common import centred_disc, fill_holes, mask_iou

shape_following = load_script("scripts/shape_following.py", "shape_following")
Reference = shape_following.Reference

pytestmark = pytest.mark.usefixtures("one_thread")


def square(size: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    lo = (size - side) // 2
    mask[lo:lo + side, lo:lo + side] = True
    return mask


def test_iou_of_disc_and_square_is_pi_over_four():
    # A disc inscribed in a square: intersection pi r^2, union (2r)^2.
    disc, box = centred_disc((128, 128), math.pi * 40 ** 2), square(128, 80)
    assert abs(disc.sum() - math.pi * 40 ** 2) < 0.01 * math.pi * 40 ** 2
    assert mask_iou(disc, box) == pytest.approx(math.pi / 4, abs=0.01)
    # Two squares of side 80 and 40, one inside the other: 1600 / 6400.
    assert mask_iou(square(128, 40), box) == 0.25
    assert mask_iou(box, box) == 1.0
    assert mask_iou(box, ~box) == 0.0
    assert mask_iou(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) == 0.0  # nothing to match
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(box, box[:64])
    with pytest.raises(ValueError, match="area"):
        centred_disc((8, 8), -1)


def test_silhouettes_fill_enclosed_holes_only():
    disc, inner = centred_disc((64, 64), math.pi * 20 ** 2), centred_disc((64, 64), math.pi * 8 ** 2)
    assert (fill_holes(disc & ~inner) == disc).all()  # a ring is its disc
    open_c = disc & ~inner
    open_c[28:36, 32:] = False  # a slot from the hole to the background: nothing is enclosed
    assert (fill_holes(open_c) == open_c).all()
    # A near-white body with dark eyes and no outline (the Twemoji ghost): the references' threshold keeps the body,
    # the generated images' 25 % sees the eyes only.
    image = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((24, 24, 104, 104), fill=(245, 248, 250))
    draw.ellipse((44, 50, 56, 62), fill=(40, 40, 40))
    draw.ellipse((72, 50, 84, 62), fill=(40, 40, 40))
    body = centred_disc((128, 128), math.pi * 40 ** 2)
    assert mask_iou(shape_following.to_mask(image, shape_following.REFERENCE_THRESHOLD), body) > 0.95
    assert mask_iou(shape_following.to_mask(image, 0.25), body) < 0.1


def reference(category: str, mask: np.ndarray, style: str = "twitter") -> Reference:
    return Reference(category, style, Image.new("RGB", mask.shape[::-1], "white"), mask)


def test_scoring_on_hand_made_masks():
    disc, box = centred_disc((128, 128), math.pi * 40 ** 2), square(128, 80)
    small_disc = centred_disc((128, 128), math.pi * 30 ** 2)
    refs = {"disc": [reference("disc", disc), reference("disc", small_disc, "google")],
            "square": [reference("square", box)]}
    row = shape_following.score_category("square", [box, box], refs)
    assert row["shape_iou"] == 1.0 and row["seeds"] == 2
    assert row["other_categories"] == pytest.approx(math.pi / 4, abs=0.01)  # the better disc of the two
    assert row["margin"] == pytest.approx(1 - math.pi / 4, abs=0.01)
    assert row["nearest"] == 1.0
    assert row["real_vs_real"] != row["real_vs_real"]  # one reference: no ceiling (NaN)
    # A generated disc scored as "disc": its own references win, and a disc of its area is exactly its reference.
    row = shape_following.score_category("disc", [disc], refs)
    assert row["shape_iou"] == 1.0 and row["disc"] == 1.0 and row["nearest"] == 1.0
    assert row["real_vs_real"] == pytest.approx(30 ** 2 / 40 ** 2, abs=0.01)  # nested discs
    # A square drawn for "disc": the other category fits better.
    row = shape_following.score_category("disc", [box], refs)
    assert row["nearest"] == 0.0 and row["margin"] == pytest.approx(math.pi / 4 - 1, abs=0.01)
    text = shape_following.table([row, shape_following.score_category("square", [box], refs)])
    labels = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
    assert [label.split(" (")[0] for label in labels] == ["disc", "square", "**mean**"]
    # The real emoji as if generated: each disc against the other disc (nested: 30^2 / 40^2) and the square; the
    # big disc fits the square better (pi / 4), the small one its sibling.  The lone square has no other set.
    real = shape_following.real_emoji_row(refs)
    assert real["references"] == 2 and real["shape_iou"] == pytest.approx(30 ** 2 / 40 ** 2, abs=0.01)
    assert real["nearest"] == 0.5
    assert shape_following.table([row], real).splitlines()[-1].startswith("| *real emoji")


def emoji(path, draw_shape: str, colour) -> None:
    image = Image.new("RGB", (64, 64), "white")  # a 64 px source: resized to 128 like the bundled model's
    draw = ImageDraw.Draw(image)
    (draw.ellipse if draw_shape == "disc" else draw.rectangle)((12, 12, 52, 52), fill=colour)
    image.save(path)


@pytest.fixture
def build(tmp_path):
    """An emoji-build-shaped folder: banana (two styles) and rocket, plus records the loader must skip."""
    data = tmp_path / "emoji"
    data.mkdir()
    records = []
    for name, style, shape, extra in [("banana", "twitter", "disc", {}), ("banana", "google", "disc", {}),
                                      ("rocket", "google", "square", {}),
                                      ("rocket", "twitter", "disc", {"skin_tone": "dark skin tone"}),
                                      ("rocket", "twitter", "disc", {"kind": "multi_aspect"})]:
        file_name = f"{name}-{style}-{len(records)}.png"
        emoji(data / file_name, shape, (230, 200, 30))
        records.append({"file_name": file_name, "text": f"{name}, {style} style", "kind": "native", "style": style,
                        "name": name, "skin_tone": None, **extra})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def test_references_are_native_skin_tone_free_and_missing_names_fail(build):
    refs = shape_following.load_references([build], ["banana", "rocket"])
    assert [r.style for r in refs["banana"]] == ["twitter", "google"]
    assert [r.style for r in refs["rocket"]] == ["google"]  # the skin-tone and multi-aspect records are skipped
    assert refs["rocket"][0].mask.shape == (128, 128)
    assert mask_iou(refs["rocket"][0].mask, square(128, 82)) > 0.9  # the 64 px square, scaled to 128
    with pytest.raises(ValueError, match="ghost"):
        shape_following.load_references([build], ["banana", "ghost"])


def test_main_on_the_bundled_model_writes_every_row(build, tmp_path):
    out = tmp_path / "out"
    assert shape_following.main(["--data", str(build), "--out", str(out), "--categories", "banana,rocket",
                                 "--seeds", "1", "--steps", "2"]) == 0
    text = (out / "shape_following.md").read_text()
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:]] == [
        "banana", "rocket", "**mean**", "*real emoji, each against the other sets*"]
    results = json.loads((out / "shape_following.json").read_text())
    assert [r["category"] for r in results["rows"]] == ["banana", "rocket"]
    assert all(0.0 <= r["shape_iou"] <= 1.0 and len(r["per_seed"]) == 1 for r in results["rows"])
    with Image.open(out / "shape_following.png") as figure:
        assert figure.width > 4 * 96 and figure.height > 2 * 96  # 2 references + image + mask, 2 rows
