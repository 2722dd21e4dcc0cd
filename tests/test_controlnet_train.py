"""ControlNet training (`xldm train --preset *-controlnet --init MODEL --control canny`): the ControlNet starts as
the base's encoder with zero convolutions (changing nothing), only it learns, the one loop's resume is exact for it,
and its export is a diffusers ControlNet folder that xldm and diffusers load into the same network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.train import checkpoint as ckpt
from xldm.train.config import preset
from xldm.train.controlnet import control_images, controlnet_from_unet
from xldm.train.loop import train
from xldm.weights.load import load_controlnet, load_model
from xldm.weights.save import save_single_file

from shapes_dataset import make_shapes_dataset
from tiny_models import random_components

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, out: str, steps: int, **changes):
    base = tmp_path / "base.safetensors"
    if not base.exists():
        save_single_file(random_components(TINY_SDXL_BASE, seed=0), base)
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, 8, size=64)
    settings = dict(init=str(base), data=str(data), out=str(tmp_path / out), steps=steps, batch_size=2,
                    checkpoint_every=2, deterministic=True)
    return preset("tiny-sdxl-base-controlnet", **(settings | changes))


def test_a_fresh_controlnet_is_the_bases_encoder_and_changes_nothing():
    model = random_components(TINY_SDXL_BASE, seed=0)
    net = controlnet_from_unet(model.unet).eval()
    unet = model.unet.state_dict()
    for key, value in net.state_dict().items():
        if key.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
            continue
        assert torch.equal(value, unet[key]), key
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 7, TINY_SDXL_BASE.unet.context_dim)
    y = torch.randn(2, TINY_SDXL_BASE.unet.adm_in_channels)
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        down, mid = net(x, t, context, y, hint)
        assert all(r.abs().max() == 0 for r in [*down, mid])  # the zero convolutions (paper Sec. 3.1)
        assert torch.equal(model.unet(x, t, context, y, control=(down, mid)), model.unet(x, t, context, y))


def test_control_images_are_the_canny_maps_of_the_crops():
    from PIL import Image

    from xldm.controlnet import canny

    pixels = torch.full((1, 3, 32, 48), -1.0)
    pixels[:, :, 8:24, 12:36] = 1.0  # a white box on black: edges on its outline
    maps = control_images(pixels, "canny:50,100")
    assert maps.shape == (1, 3, 32, 48) and set(maps.unique().tolist()) == {0.0, 1.0}
    as_image = Image.fromarray(((pixels[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    expected = torch.from_numpy(np.asarray(canny(as_image, 50, 100), dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(maps[0], expected) and maps[0, 0, 16, 20] == 0 and maps[0, 0].sum() > 0


def test_controlnet_training_resumes_exactly_and_exports_a_diffusers_folder(tmp_path, capsys):
    import diffusers

    from xldm.cli import main

    straight = train(_config(tmp_path, "a", 2, lr=1e-3, checkpoint_every=1), progress=False)
    assert all(np.isfinite(straight.losses)) and straight.skipped_steps == 0
    half = _config(tmp_path, "b", 1)  # the first half from the command line
    assert main(["train", "--preset", "tiny-sdxl-base-controlnet", "--init", half.init, "--control", "canny",
                 "--data", half.data, "--out", half.out, "--steps", "1", "--batch-size", "2", "--lr", "1e-3",
                 "--deterministic", "--checkpoint-every", "1", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    resumed = train(_config(tmp_path, "b", 2, lr=1e-3, checkpoint_every=1), resume=True, progress=False)
    _, a, a_state = ckpt.load_latest(tmp_path / "a" / "checkpoints")
    _, b, b_state = ckpt.load_latest(tmp_path / "b" / "checkpoints")
    assert a_state["step"] == b_state["step"] == 2 and set(a) == set(b)
    assert all(not k.startswith("model.") or k.startswith("model.controlnet.") for k in a)  # only the ControlNet
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed.losses == straight.losses[1:]

    folder = straight.final_path
    assert (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").exists()
    base = load_model(tmp_path / "base.safetensors", dtype=torch.float32)
    ours = load_controlnet(folder, base.config, dtype=torch.float32).eval()
    ref = diffusers.ControlNetModel.from_pretrained(folder).eval()
    zero_conv = ours.zero_convs[0][0].weight
    assert zero_conv.abs().max() > 0  # it trained: the zero convolutions left zero
    torch.manual_seed(1)
    x, t, hint = torch.randn(2, 4, 8, 12), torch.tensor([500.0, 20.0]), torch.rand(2, 3, 64, 96)
    context, pooled = torch.randn(2, 7, TINY_SDXL_BASE.unet.context_dim), torch.randn(2, 48)
    ids = torch.tensor([[64.0, 96, 0, 0, 64, 96], [128, 192, 8, 4, 64, 96]])
    from xldm.conditioning import vector_conditioning

    with torch.no_grad():
        down, mid = ours(x, t, context, vector_conditioning(base.config, pooled, ids), hint)
        ref_down, ref_mid = ref(x, t, context, controlnet_cond=hint, return_dict=False,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    diff = max((p - q).abs().max().item() for p, q in zip([*down, mid], [*ref_down, ref_mid]))
    assert diff <= 1e-4, diff
    assert max(r.abs().max().item() for r in down) > 0
    # the base stayed frozen: the exported folder holds the ControlNet only, and the init file is untouched
    assert load_model(tmp_path / "base.safetensors").unet.state_dict().keys() == base.unet.state_dict().keys()


def test_controlnet_training_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs --control"):
        preset("tiny-sdxl-base-controlnet", control="")
    with pytest.raises(ValueError, match="unknown control preprocessor"):
        preset("tiny-sdxl-base-controlnet", control="depth")
    with pytest.raises(ValueError, match="applies to task 'controlnet' only"):
        preset("tiny-sdxl-base", control="canny")
    with pytest.raises(ValueError, match="needs --init"):
        train(preset("tiny-sdxl-base-controlnet", out=str(tmp_path / "run"), data=str(tmp_path)), progress=False)
