"""The prompt-following measure (scripts/prompt_following.py) on a tiny evaluator and a small emoji-style folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import load_script
from xldm.config import TINY_CLIP_L, TINY_OPENCLIP_BIGG
from xldm.train.contrastive import ContrastiveModel, ImageTowerConfig
from xldm.train.data import is_heldout

prompt_following = load_script("scripts/prompt_following.py", "prompt_following")
caption_sets, measure, to_evaluator_pixels = (prompt_following.caption_sets, prompt_following.measure,
                                              prompt_following.to_evaluator_pixels)


@pytest.fixture
def folder(tmp_path):
    """Native images of 24 names, 4 of them held out, plus a non-native variant that must be ignored."""
    names = [f"thing {i}" for i in range(400)]
    held = [n for n in names if is_heldout(n)][:4]
    train = [n for n in names if not is_heldout(n)][:20]
    records = []
    for i, name in enumerate(held + train):
        img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
        img.paste(Image.new("RGBA", (16, 16), (i * 10 % 256, 255 - i * 10 % 256, i * 37 % 256, 255)), (8, 8))
        img.save(tmp_path / f"{i}.png")
        records.append({"file_name": f"{i}.png", "text": f"{name}, twitter style", "kind": "native"})
    records.append({"file_name": "0.png", "text": f"{held[0]}, twitter style, small", "kind": "multi_aspect"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path, held


def test_caption_sets_split_held_out_names_and_keep_native_images(folder):
    path, held = folder
    sets = caption_sets(path, count=10, seed=0)
    assert [r["text"] for r in sets["heldout"]] == [f"{n}, twitter style" for n in held]
    assert len(sets["train"]) == 10 and all(not is_heldout(r["text"]) for r in sets["train"])
    assert sets["train"] == caption_sets(path, count=10, seed=0)["train"]  # seeded sample


def test_evaluator_pixels_composite_on_white_and_letterbox():
    clear = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    pixels = to_evaluator_pixels([clear, Image.new("RGB", (16, 16), (0, 0, 255))], 8)
    assert pixels.shape == (2, 3, 8, 8) and pixels.dtype == torch.uint8
    assert int(pixels[0].min()) == 255  # transparent -> white, not red or black
    assert pixels[1, 2].float().mean() > 250 and pixels[1, 0].float().mean() < 5


def test_real_images_as_generator_score_like_real_images(folder):
    path, _ = folder
    torch.manual_seed(0)
    evaluator = ContrastiveModel((TINY_CLIP_L, TINY_OPENCLIP_BIGG), ImageTowerConfig(image_size=16,
                                                                                   channels=(8, 8), features=16))
    sets = caption_sets(path)
    lookup = {r["text"]: r for part in sets.values() for r in part}

    def copy_of_real(caption, seed):
        with Image.open(path / lookup[caption]["file_name"]) as img:
            return img.copy()

    results = measure(evaluator.eval(), path, copy_of_real, progress=False)
    for part in ("heldout", "train"):
        assert results[part]["generated"] == results[part]["real"]  # exact: the same pixels
        assert 0.0 <= results[part]["real"] <= 1.0 and results[part]["chance"] == 1 / 16
