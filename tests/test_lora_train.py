"""`xldm train --lora-rank`: a kohya file that diffusers loads with every key used and that gives the same image
there; a LoRA on the bundled model that learns a concept the model never saw (a red square called "zkq")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from xldm.config import DEFAULT_MODEL_PATH, TINY_SDXL_BASE
from xldm.lora import read_lora
from xldm.pipeline import Pipeline, load
from xldm.train.cli import config_from_args
from xldm.train.config import preset
from xldm.train.loop import train
from xldm.weights.save import save_diffusers, save_single_file

from shapes_dataset import make_shapes_dataset
from tiny_models import random_components

pytestmark = pytest.mark.usefixtures("one_thread")
PIXEL_TOL = 2


def test_trained_lora_is_a_kohya_file_diffusers_loads_the_same(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    init = save_single_file(base, tmp_path / "base.safetensors")
    config = preset("tiny-sdxl-base").replace(
        data=str(make_shapes_dataset(tmp_path / "data", 8, size=64)), out=str(tmp_path / "run"), steps=3,
        batch_size=2, init=str(init), lora_rank=4, lora_alpha=2.0, lora_text_encoders=True, lora_conv=True, lr=1e-2,
        ema_decay=0.0)
    result = train(config, progress=False)
    path = result.final_path
    assert path == tmp_path / "run" / "final" / "lora.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        up = f.get_tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight")
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "3"
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"} and up.abs().max() > 0  # it trained
    assert any("in_layers_2.lora_down" in k for k in keys)  # LoCon: the resblock convolutions
    lora = read_lora(path, TINY_SDXL_BASE)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(save_diffusers(base, tmp_path / "diffusers"),
                                                              local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path), adapter_name="trained")
    adapted = [name for net in (ref.unet, ref.text_encoder, ref.text_encoder_2) for name, m in net.named_modules()
               if hasattr(m, "lora_A") and "trained" in m.lora_A]
    assert len(adapted) == len(lora.adapters)  # no key left out on either side
    settings = dict(steps=4, cfg=5.0, width=64, height=64, seed=5)
    theirs = ref("a red circle", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                 generator=[torch.Generator().manual_seed(5)]).images[0]
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    ours = pipe("a red circle", loras=[path], **settings)
    plain = pipe("a red circle", **settings)
    assert np.abs(np.asarray(ours.images[0], dtype=int) - np.asarray(theirs, dtype=int)).max() <= PIXEL_TOL
    assert (ours.latents - plain.latents).abs().max() > 1e-2  # the trained LoRA changes the result


def test_lora_flags_and_refused_combinations(tmp_path):
    from xldm.cli import build_parser

    args = build_parser().parse_args(["train", "--preset", "tiny-sdxl-base", "--lora-rank", "16", "--lora-alpha",
                                      "8", "--lora-conv", "--lora-text-encoders", "--data", "d", "--out", "o"])
    config = config_from_args(args)
    assert (config.lora_rank, config.lora_alpha, config.lora_conv, config.lora_text_encoders) == (16, 8.0, True, True)
    with pytest.raises(ValueError, match="need --lora-rank"):
        preset("tiny-sdxl-base").replace(lora_conv=True)
    with pytest.raises(ValueError, match="instead of train_text_encoders"):
        preset("tiny-sdxl-base").replace(lora_rank=4, train_text_encoders=True)


def _concept(folder: Path, count: int) -> Path:
    """White 128x128 canvases with one red square of random size and place, captioned "a zkq"."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = np.full((128, 128, 3), 255, np.uint8)
        side = int(rng.integers(30, 60))
        x, y = (int(v) for v in rng.integers(0, 128 - side, 2))
        pixels[y:y + side, x:x + side] = (220, 30, 30)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a zkq")
    return folder


def _red_share(images) -> float:
    """Mean share of strongly red pixels (R above both G and B by 0.3)."""
    shares = []
    for image in images:
        a = np.asarray(image, dtype=np.float32) / 255
        shares.append(float(((a[..., 0] - np.maximum(a[..., 1], a[..., 2])) > 0.3).mean()))
    return float(np.mean(shares))


def _squareness(images) -> float:
    """Mean share of each image's red pixels' bounding box that is red (1 for an axis-aligned square)."""
    fills = []
    for image in images:
        a = np.asarray(image, dtype=np.float32) / 255
        red = (a[..., 0] - np.maximum(a[..., 1], a[..., 2])) > 0.3
        ys, xs = np.nonzero(red)
        if len(ys):
            fills.append(red.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    return float(np.mean(fills)) if fills else 0.0


def _learns(tmp_path, steps: int, lr: float = 4e-3):
    if not DEFAULT_MODEL_PATH.exists():
        pytest.skip("the bundled model is not in this copy")
    config = preset("tiny-sdxl-base").replace(
        data=str(_concept(tmp_path / "zkq", 8)), out=str(tmp_path / "run"), steps=steps, batch_size=4, lora_rank=8,
        init=str(DEFAULT_MODEL_PATH), resolution=128, lr=lr, ema_decay=0.0, checkpoint_every=1000)
    path = train(config, progress=False).final_path
    pipe = load(DEFAULT_MODEL_PATH, device="cpu")
    before = pipe("a zkq", steps=12, seed=0, batch=4).images
    after = pipe("a zkq", steps=12, seed=0, batch=4, loras=[path]).images
    return _red_share(before), _red_share(after), after


@pytest.mark.slow  # a learning run (~35 s on 2 cores); the kohya-file test above trains a LoRA and checks it against diffusers
def test_lora_teaches_the_bundled_model_a_new_concept(tmp_path):
    # measured (100 steps, ~20 s): red share 0.0 without the LoRA, 0.14-0.28 per image with it
    before, after, _ = _learns(tmp_path, 100)
    assert before < 0.02 and after > 0.08, (before, after)


@pytest.mark.slow
def test_lora_teaches_the_concept_well_with_more_steps(tmp_path):
    # measured (300 steps at 2e-3, ~70 s): red share 0.09-0.18 per image (the data's squares: 0.05-0.22), the red
    # filling 0.85 of its bounding box: red squares on white, where the base draws pale blue shapes
    before, after, images = _learns(tmp_path, 300, lr=2e-3)
    assert before < 0.02 and 0.06 < after < 0.3, (before, after)
    assert _squareness(images) > 0.6
