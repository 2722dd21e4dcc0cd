"""The prompt-following measure (moved here from scripts/prompt_following.py, which uses it): the contrastive
evaluator (`xldm.train.contrastive`) picks each image's caption among up to 15 distractor captions (chance 1/16)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from xldm.train.contrastive import CaptionedImages, evaluate, letterbox
from xldm.train.data import to_rgb


def to_evaluator_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) uint8: each image on white (alpha composited), letterboxed square, Lanczos-resized, as
    the evaluator was trained (`xldm.train.contrastive.load_images`)."""
    arrays = [letterbox(to_rgb(image), size) for image in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def score(evaluator, images: list[Image.Image], captions: list[str], *, seed: int = 0) -> dict[str, float]:
    """Retrieval accuracy of each image's caption among 15 distractors of the distinct `captions` (image i has
    caption i; repeated captions are one candidate)."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image, found {len(images)} images and {len(captions)} captions")
    distinct = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(distinct)}
    pixels = to_evaluator_pixels(images, evaluator.tower_config.image_size)
    data = CaptionedImages(pixels, torch.tensor([index[c] for c in captions]), distinct)
    return evaluate(evaluator, data, torch.device("cpu"), seed=seed)


__all__ = ["to_evaluator_pixels", "score"]
