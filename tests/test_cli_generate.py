"""`xldm generate` end to end on tiny random single-file checkpoints: PNGs with their parameters, batches,
the refiner, low-memory mode, and errors before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.pipeline import Pipeline, load
from xldm.pngmeta import read_png_params
from xldm.weights.save import save_single_file

from tiny_models import random_components

PROMPT = "a red heart"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    refiner = save_single_file(random_components(TINY_SDXL_REFINER, seed=1), root / "refiner.safetensors")
    return base, refiner


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_png_with_parameters(files, tmp_path, capsys):
    base, _ = files
    out = tmp_path / "heart.png"
    assert cli_main(["generate", PROMPT, "--model", str(base), "--steps", "3", "--width", "64", "--height", "96",
                     "--seed", "7", "--sampler", "dpmpp_2m_karras", "--negative", "blurry",
                     "--original-size", "512x768", "--crop-top-left", "8,0", "--dtype", "fp32",
                     "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "seed 7" in captured.err
    image = Image.open(out)
    assert image.size == (64, 96)
    params = read_png_params(out)
    assert params["prompt"] == PROMPT and params["seed"] == 7 and params["steps"] == 3
    assert params["sampler"] == "dpmpp_2m_karras" and params["negative_prompt"] == "blurry"
    assert list(params["original_size"]) == [512, 768] and list(params["crop_top_left"]) == [8, 0]
    text = image.info["parameters"]
    assert text.startswith(PROMPT) and "Negative prompt: blurry" in text
    assert "Steps: 3" in text and "Sampler: DPM++ 2M Karras" in text and "Seed: 7" in text and "Size: 64x96" in text
    # the CLI's image is the Python API's image for the same settings
    api = load(base, dtype=torch.float32, device="cpu")(
        PROMPT, steps=3, width=64, height=96, seed=7, sampler="dpmpp_2m_karras", negative_prompt="blurry",
        original_size=(512, 768), crop_top_left=(8, 0)).images[0]
    assert np.array_equal(np.asarray(api), pixels(out))


def test_batch_with_refiner_files_and_regeneration(files, tmp_path):
    base, refiner = files
    out = tmp_path / "img.png"
    assert cli_main(["generate", PROMPT, "--model", str(base), "--refiner", str(refiner), "--refiner-start", "0.7",
                     "--steps", "4", "--width", "64", "--height", "64", "--seed", "100", "--batch", "2",
                     "--out", str(out)]) == 0
    first, second = tmp_path / "img_0.png", tmp_path / "img_1.png"
    assert read_png_params(first)["seed"] == 100 and read_png_params(second)["seed"] == 101
    assert read_png_params(second)["refiner_start"] == 0.7
    # image 1 of the batch regenerated alone from its recorded seed: equal to 1/255 (a batch of 2 runs the
    # matmuls with other blocking than a batch of 1, about 1e-6 apart in the latents; README, "Batches")
    solo = tmp_path / "solo.png"
    assert cli_main(["generate", PROMPT, "--model", str(base), "--refiner", str(refiner), "--refiner-start", "0.7",
                     "--steps", "4", "--width", "64", "--height", "64", "--seed", "101", "--out", str(solo)]) == 0
    difference = np.abs(pixels(solo).astype(int) - pixels(second).astype(int))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 0.001 * difference.size


def test_low_memory_mode_gives_the_same_image(files):
    base, refiner = files
    settings = dict(steps=3, width=64, height=64, seed=3)
    eager = load(base, refiner=refiner, dtype=torch.float32, device="cpu")(PROMPT, **settings).images[0]
    pipe = Pipeline(base, refiner, dtype=torch.float32, device="cpu", low_memory=True)
    lazy = pipe(PROMPT, **settings).images[0]
    assert np.array_equal(np.asarray(eager), np.asarray(lazy))
    assert set(pipe.refiner._near) == {"text_encoders", "unet", "vae"}  # kept near (tests/test_low_memory.py)


def test_img2img_and_inpaint_from_cli(files, tmp_path):
    base, refiner = files
    src = tmp_path / "src.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(src)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (80, 64), 0)
    m.paste(255, (10, 10, 40, 40))
    m.save(mask)
    out = tmp_path / "edit.png"
    assert cli_main(["generate", PROMPT, "--model", str(refiner), "--init-image", str(src), "--strength", "0.5",
                     "--steps", "4", "--seed", "1", "--out", str(out)]) == 0  # refiner as SDEdit
    assert Image.open(out).size == (80, 64)
    assert read_png_params(out)["strength"] == 0.5
    assert cli_main(["generate", PROMPT, "--model", str(base), "--init-image", str(src), "--mask", str(mask),
                     "--strength", "0.8", "--steps", "4", "--seed", "1", "--out", str(out), "--force"]) == 0
    edited = pixels(out).astype(int)
    original = np.asarray(Image.open(src).convert("RGB")).astype(int)
    # far from the mask the picture is kept up to the VAE round trip; inside it is repainted
    assert np.abs(edited - original)[10:40, 10:40].mean() > np.abs(edited - original)[50:, 50:].mean()


def test_list_sizes(capsys):
    assert cli_main(["generate", "--list-sizes"]) == 0
    out = capsys.readouterr().out
    assert "1024x1024" in out and "1344x768" in out and "2048x512" in out


@pytest.mark.parametrize("flags, message", [
    (["--refiner-start", "0.8"], "without a refiner"),
    (["--width", "100"], "multiple of 8"),
    (["--steps", "0"], "steps must be"),
    (["--sampler", "plms"], "unknown sampler"),
])
def test_errors_come_before_loading(tmp_path, capsys, flags, message):
    missing = tmp_path / "does-not-exist.safetensors"
    assert cli_main(["generate", PROMPT, "--model", str(missing), "--out", str(tmp_path / "x.png"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
