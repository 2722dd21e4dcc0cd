"""Cascade stage training from the command line (`xldm train --preset cascade-...`), SR training on crops, and the
shipped form of a cascade (fp16 UNets only, the text encoder borrowed from the default model)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

import xldm.cascade
from xldm.cascade import (
    CascadePipeline,
    load_cascade,
    load_stage,
    random_stage,
    read_stage_header,
    save_cascade,
    save_stage,
)
from xldm.config import TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2, TINY_OPENCLIP_BIGG, TINY_SDXL_BASE
from xldm.train.cli import main as train_main
from xldm.train.config import preset as cascade_train_preset
from xldm.train.diffusion import random_crops, sample_generators

FP16_TOL = 1e-3  # fp16 storage of weights of size ~0.1: relative rounding 2^-11


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def image_folder(tmp_path):
    """Eight captioned 64x64 images (flat colours on white) in the folder layout `xldm train` reads."""
    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "yellow": (240, 220, 20)}
    for i, (name, rgb) in enumerate(list(colours.items()) * 2):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        img.paste(Image.new("RGB", (32, 32), rgb), ((i % 2) * 32, 16))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"{name} square")
    return folder


def test_train_cli_runs_a_cascade_preset_and_resumes_exactly(image_folder, tmp_path):
    donor = random_stage(TINY_CASCADE_BASE, seed=5)
    donor_file = save_stage(donor, tmp_path / "donor.safetensors")
    common = ["--preset", "tiny-cascade-sr-32", "--data", str(image_folder), "--checkpoint-every", "1",
              "--text-encoders-from", str(donor_file), "--set", "train_crop=16", "--batch-size", "2", "--no-progress"]
    assert train_main([*common, "--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    assert train_main([*common, "--out", str(tmp_path / "b"), "--steps", "1"]) == 0
    assert train_main([*common, "--out", str(tmp_path / "b"), "--steps", "3", "--resume"]) == 0
    a = load_stage(tmp_path / "a" / "final" / "stage.safetensors")
    b = load_stage(tmp_path / "b" / "final" / "stage.safetensors")
    assert a.config == TINY_CASCADE_SR
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(va, vb), k  # exact: same draws (crops included), same data position
    for k, v in donor.text_encoders[0].state_dict().items():  # the frozen encoder is the donor's, unchanged
        assert torch.equal(a.text_encoders[0].state_dict()[k], v), k
    fresh = random_stage(TINY_CASCADE_SR, seed=0)
    assert any(not torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), fresh.unet.state_dict().values()))


def test_train_cli_rejects_flags_that_do_not_apply(image_folder, tmp_path, capsys):
    base = ["--data", str(image_folder), "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
    for flags, message in (
        (["--preset", "tiny-cascade-base-16", "--mixed-precision", "bf16"], "--mixed-precision does not apply"),
        (["--preset", "tiny-sdxl-base", "--text-encoders-from", "x.safetensors"], "cascade presets only"),
        (["--preset", "tiny-cascade-sr-32", "--set", "aug_level_maxx=0.2"], "aug_level_maxx"),
        (["--preset", "tiny-cascade-base-16", "--set", "train_crop=8"], "super-resolution stages only"),
    ):
        assert train_main([*flags, *base]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing started
    with pytest.raises(ValueError, match="multiple of the scale 2 and at most 32"):
        cascade_train_preset("tiny-cascade-sr-32", train_crop=40)


def test_random_crops_are_seeded_and_on_the_8_pixel_grid():
    pixels = torch.arange(2 * 3 * 64 * 96, dtype=torch.float32).reshape(2, 3, 64, 96)
    crops = random_crops(pixels, 32, sample_generators(0, 1, range(2)))
    again = random_crops(pixels, 32, sample_generators(0, 1, range(2)))
    assert crops.shape == (2, 3, 32, 32) and torch.equal(crops, again)
    for image, crop in zip(pixels, crops):
        flat = int(crop[0, 0, 0]) - int(image[0, 0, 0])  # position of the crop's corner in the image
        top, left = divmod(flat, 96)
        assert top % 8 == 0 and left % 8 == 0 and top <= 32 and left <= 64
        assert torch.equal(crop, image[:, top:top + 32, left:left + 32])
    other_step = random_crops(pixels, 32, sample_generators(0, 2, range(2)))
    offsets = {tuple(int(c[0, 0, 0]) for c in x) for x in (crops, other_step, random_crops(
        pixels, 32, sample_generators(0, 3, range(2))), random_crops(pixels, 32, sample_generators(0, 4, range(2))))}
    assert len(offsets) > 1  # the offsets change from step to step


def _bigg_stages() -> list:
    """Tiny stages whose one encoder has the config of TINY_SDXL_BASE's bigG-shaped encoder."""
    te = TINY_OPENCLIP_BIGG
    configs = []
    for c in (TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2):
        n = len(c.micro_conditioning) * (2 if c.kind == "cascade-base" else 1)  # two values per size scalar
        unet = replace(c.unet, context_dim=te.width, adm_in_channels=te.projection_dim + n * c.micro_conditioning_dim)
        configs.append(replace(c, text_encoders=(te,), unet=unet))
    base = random_stage(configs[0], seed=0)
    return [base] + [random_stage(c, seed=i + 1, text_encoders=base.text_encoders)
                     for i, c in enumerate(configs[1:])]


def test_shipped_cascade_borrows_the_default_models_encoder(tmp_path, monkeypatch):
    from tests.tiny_models import random_components
    from xldm.weights.save import save_single_file

    stages = _bigg_stages()
    model = random_components(TINY_SDXL_BASE, seed=3)
    stages = [replace(s, text_encoders=(model.text_encoders[1],)) for s in stages]
    trained = [save_stage(s, tmp_path / f"trained_{i}.safetensors") for i, s in enumerate(stages)]
    # the shipped form (scripts/train_default_cascade.sh): fp16, no text encoders
    paths = save_cascade(load_cascade(trained, dtype=torch.float32), tmp_path / "shipped", dtype=torch.float16,
                         text_encoders="none")
    assert [p.name for p in paths] == ["stage_0.safetensors", "stage_1.safetensors", "stage_2.safetensors"]
    assert all(not read_stage_header(p)[1] for p in paths)  # UNets only
    with pytest.raises(ValueError, match="nor the default model"):
        monkeypatch.setattr(xldm.cascade, "DEFAULT_MODEL_PATH", tmp_path / "absent.safetensors")
        load_cascade(tmp_path / "shipped")
    default_file = save_single_file(model, tmp_path / "default_base.safetensors", dtype=torch.float16)
    monkeypatch.setattr(xldm.cascade, "DEFAULT_MODEL_PATH", default_file)
    loaded = load_cascade(tmp_path / "shipped")
    assert all(s.text_encoders[0] is loaded[0].text_encoders[0] for s in loaded)  # one encoder, shared
    expected = model.text_encoders[1].state_dict()
    for k, v in loaded[0].text_encoders[0].state_dict().items():
        assert (v - expected[k]).abs().max() <= FP16_TOL, k
    # the shipped cascade generates what the trained one does, up to fp16 storage of the weights
    settings = dict(steps=[2, 1, 1], cfg=[2.0, 2.0, 1.0], aug=[0.0, 0.1, 0.1], seed=4)
    ours = CascadePipeline(loaded)("red apple", **settings).stage_outputs[-1]
    reference = CascadePipeline(stages)("red apple", **settings).stage_outputs[-1]
    assert (ours - reference).abs().max() <= 0.05  # fp16 weights through 3 stages; loose, stated
