"""It learns: train a tiny VAE, then a tiny SDXL base on the generated shapes dataset, then generate and measure.

The whole recipe runs as a user would: `train(tiny-vae)` on the images -> a single file holding that VAE, random
text encoders and a random (smaller) UNet -> `train(tiny-sdxl-base, init=that file)` -> final/model.safetensors
-> `Pipeline` generates from captions -> each image's dominant non-white colour is compared with the caption's.

Scope, measured on this 2-core CPU: the short test trains on ONE colour (red shapes at five positions); in the
time a default-suite test can take (~300 UNet steps) the tiny model learns the data (red shapes on white) but not
yet to tell colours apart from random tiny text encoders: with red and blue it drew the mean colour (magenta)
after 700 steps.  The slow test trains two colours for 2000 steps and checks that the colour follows the caption;
it has NOT yet been seen to pass (its first run was stopped unfinished on a loaded machine).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.models.clip import CLIPTextModel
from xldm.models.components import Components
from xldm.models.unet import UNet
from xldm.train.config import preset
from xldm.train.loop import train
from xldm.train.shapes_dataset import COLOURS, make_shapes_dataset

torch.set_num_threads(1)


def _dataset(folder: Path, colours: tuple[str, ...], n: int) -> Path:
    data = make_shapes_dataset(folder, n, size=32)
    for caption in list(data.glob("*.txt")):
        if caption.read_text().split()[1] not in colours:
            caption.unlink()
            caption.with_suffix(".png").unlink()
    return data


def _dominant_colour(image, names: tuple[str, ...]) -> tuple[str | None, int]:
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3)
    shape = pixels[pixels.min(axis=1) < 200]  # non-white pixels
    if len(shape) == 0:
        return None, 0
    mean = shape.mean(axis=0)
    return min(names, key=lambda n: float(((np.array(COLOURS[n]) - mean) ** 2).sum())), len(shape)


def _train_and_sample(tmp: Path, colours: tuple[str, ...], *, images: int, vae_steps: int, unet_steps: int,
                      small_unet: bool, samples_per_colour: int) -> list[tuple[str, str | None, int]]:
    from xldm.pipeline import GenerationRequest, Pipeline
    from xldm.weights.load import load_model, load_vae
    from xldm.weights.save import save_single_file

    data = _dataset(tmp / "data", colours, images)
    common = dict(data=str(data), resolution=32, bucket_step=32, batch_size=8, checkpoint_every=10**6,
                  keep_checkpoints=1)
    train(preset("tiny-vae", out=str(tmp / "vae"), steps=vae_steps, lr=3e-3, disc_start=10**9, **common),
          progress=False)
    config = TINY_SDXL_BASE
    if small_unet:  # a quarter of the tiny UNet's parameters: faster steps on a CPU
        config = dataclasses.replace(config, unet=dataclasses.replace(
            config.unet, model_channels=16, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 1),
            transformer_depth_middle=1, num_head_channels=16, norm_groups=8))
    torch.manual_seed(0)
    start = Components(config=config, unet=UNet(config.unet), vae=load_vae(tmp / "vae/final/model.safetensors"),
                       text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders))
    save_single_file(start, tmp / "init.safetensors")
    train(preset("tiny-sdxl-base", out=str(tmp / "base"), steps=unet_steps, init=str(tmp / "init.safetensors"),
                 **common), progress=False)

    pipe = Pipeline(load_model(tmp / "base/final/model.safetensors"), dtype=torch.float32,
                    device=torch.device("cpu"))
    results = []
    for i, colour in enumerate(list(colours) * samples_per_colour):
        request = GenerationRequest(prompt=f"a {colour} circle in the center", width=32, height=32, steps=15,
                                    cfg=4.0, seed=i)
        guess, count = _dominant_colour(pipe.generate(request).images[0], tuple(COLOURS))
        results.append((colour, guess, count))
    return results


def test_tiny_model_learns_the_shapes_data(tmp_path):
    results = _train_and_sample(tmp_path, ("red",), images=60, vae_steps=100, unet_steps=250, small_unet=True,
                                samples_per_colour=8)
    matches = sum(colour == guess for colour, guess, _ in results)
    # a shape is drawn (some non-white pixels, less than half the 32x32 canvas) and it is red, in most samples
    assert matches >= 6, results
    assert sum(10 <= count <= 512 for _, _, count in results) >= 6, results


@pytest.mark.slow
def test_tiny_model_follows_colour_in_captions(tmp_path):
    results = _train_and_sample(tmp_path, ("red", "blue"), images=160, vae_steps=150, unet_steps=2000,
                                small_unet=False, samples_per_colour=6)
    matches = sum(colour == guess for colour, guess, _ in results)
    assert matches >= 9, results  # of 12; chance is 6
