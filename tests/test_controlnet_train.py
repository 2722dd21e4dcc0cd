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


def _control_files(data: Path, folder: Path, *, skip: str | None = None) -> Path:
    """A control image beside each training image (same relative path and stem): seeded noise of the image's size,
    nothing a canny map of it could be."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for image_path in sorted(data.glob("*.png")):
        if image_path.name == skip:
            continue
        with Image.open(image_path) as image:
            width, height = image.size
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        (folder / image_path.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise).save((folder / image_path.relative_to(data)).with_suffix(".png"))
    return folder


def test_control_images_read_from_files_are_cropped_as_their_images_and_steer_the_step(tmp_path):
    from dataclasses import replace

    from PIL import Image

    from xldm.buckets import apply_placement, place_in_bucket
    from xldm.train import controlnet as task
    from xldm.train.parallel import Processes

    controls = _control_files(Path(_config(tmp_path, "run", 1).data), tmp_path / "controls")
    config = _config(tmp_path, "run", 1, control=f"dir:{controls}", batch_size=4)
    data = task.batches(config, Processes())
    batch = next(iter(data))
    assert batch["control"].shape == batch["pixels"].shape and batch["control"].dtype == torch.float32
    cropped = 0
    for i, key in enumerate(batch["keys"]):
        with Image.open(controls / key) as file:
            control_file = file.convert("RGB")
        (h, w), (target_h, target_w) = batch["original_size"][i].tolist(), batch["target_size"][i].tolist()
        assert control_file.size == (w, h)
        placement = replace(place_in_bucket(w, h, (target_w, target_h), None),
                            crop_top_left=tuple(batch["crop_top_left"][i].tolist()))
        expected = torch.from_numpy(np.array(apply_placement(control_file, placement))).permute(2, 0, 1)
        assert torch.equal((batch["control"][i] * 255).round().to(torch.uint8), expected), key
        cropped += (w, h) != (target_w, target_h)
    assert cropped > 0  # some images were resized and cropped, not just copied
    assert not torch.equal(batch["control"], control_images(batch["pixels"], "canny"))

    # one training step: the ControlNet is fed the batch's control images (not canny maps of the pixels)
    run = task.build(config, Processes())
    controlnet, seen = run.forward["controlnet"], []

    def recording(x, t, context, vector, hint):
        seen.append(hint.clone())
        return controlnet(x, t, context, vector, hint)

    run.forward["controlnet"] = recording
    result = task.step(run, batch, 0)
    assert np.isfinite(float(result.loss)) and len(seen) == 1 and torch.equal(seen[0], batch["control"])


def test_control_files_must_all_be_there_and_fit_their_images(tmp_path):
    from PIL import Image

    from xldm.train.controlnet import batches
    from xldm.train.parallel import Processes

    config = _config(tmp_path, "run", 1)
    data = Path(config.data)
    controls = _control_files(data, tmp_path / "controls", skip="shape_00003.png")
    with pytest.raises(ValueError, match=r"1 of 8 images have no usable control image.*missing .*shape_00003\.png"):
        train(_config(tmp_path, "run", 1, control=f"dir:{controls}"), progress=False)  # before any step
    assert not (tmp_path / "run" / "checkpoints").exists()
    with Image.open(data / "shape_00003.png") as image:
        width, height = image.size
    Image.new("RGB", (width + 8, height)).save(controls / "shape_00003.jpg")
    with pytest.raises(ValueError, match=rf"shape_00003\.jpg is {width + 8}x{height} but its image shape_00003\.png "
                                         rf"is {width}x{height}"):
        batches(_config(tmp_path, "run", 1, control=f"dir:{controls}"), Processes())
    with pytest.raises(ValueError, match="lies inside the image folder"):
        batches(_config(tmp_path, "run", 1, control=f"dir:{data}"), Processes())
    with pytest.raises(ValueError, match="needs a folder"):
        preset("tiny-sdxl-base-controlnet", control="dir:")
