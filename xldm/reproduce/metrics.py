"""The prompt-following measure (moved here from scripts/prompt_following.py, which uses it): the contrastive
evaluator (`xldm.train.contrastive`) picks each image's caption among up to 15 distractor captions (chance 1/16).
`latent_generator` is the (caption, seed) -> image function that it and scripts/shape_following.py sample with."""

from __future__ import annotations

from typing import Callable

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


Generate = Callable[[str, int], Image.Image]  # (caption, seed) -> image


def latent_generator(model: str, refiner: str | None, *, steps: int, cfg: float, unet: str | None = None,
                     **settings) -> Generate:
    """`settings`: further generation settings (sampler, timestep_spacing); `unet` swaps the base's UNet (a
    distilled student such as the bundled turbo UNet)."""
    import xldm
    from xldm.pipeline import Pipeline

    pipe = Pipeline(model, refiner, unet=unet) if unet else xldm.load(model, refiner=refiner)

    def generate(caption: str, seed: int) -> Image.Image:
        return pipe(caption, steps=steps, cfg=cfg, seed=seed, **settings).images[0]

    return generate


__all__ = ["to_evaluator_pixels", "score", "latent_generator", "Generate"]
