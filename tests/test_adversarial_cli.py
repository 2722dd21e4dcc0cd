"""Hostile command-line input to `xldm generate`: each is a one-line error before any work, never a traceback
(bad --out paths, bad --device, out-of-range crops and sizes, flags a --cascade would not use, --from-png images
that are not images or hold mistyped settings, non-finite --lora weights), plus non-finite advice that fits the
dtype and init images whose 16-bit greyscale or transparency must survive the conversion to RGB."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.cli import main as cli_main
from xldm.config import TINY_VAE
from xldm.errors import NonFiniteError
from xldm.models.vae import AutoencoderKL

PROMPT = "a red heart"
pytestmark = pytest.mark.usefixtures("one_thread")


def generate(tmp_path, *flags):
    """`xldm generate` with a model that does not exist: anything that gets as far as loading fails differently."""
    missing = tmp_path / "does-not-exist.safetensors"
    return cli_main(["generate", PROMPT, "--model", str(missing), "--steps", "2", *flags])


def files_in(folder) -> list:
    return sorted(p.name for p in folder.rglob("*"))


@pytest.mark.parametrize("out, message", [
    (".", "is a folder"),
    ("x.gif", "unknown image type '.gif'"),  # (missing folders are made: tests/test_cli_outputs.py)
])
def test_bad_out_path_is_refused_before_any_work(tmp_path, capsys, out, message):
    target = tmp_path / out
    assert generate(tmp_path, "--out", str(target)) == 2
    err = capsys.readouterr().err
    assert err.startswith("xldm: error: --out") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert files_in(tmp_path) == []  # nothing written, not even a temporary file


def test_existing_file_or_a_file_in_the_way_is_refused(tmp_path, capsys):
    (tmp_path / "taken.png").write_bytes(b"keep me")
    assert generate(tmp_path, "--out", str(tmp_path / "taken.png")) == 2
    err = capsys.readouterr().err
    assert err.startswith("xldm: error: --out") and "the file exists; pass --force" in err
    assert (tmp_path / "taken.png").read_bytes() == b"keep me"
    assert generate(tmp_path, "--out", str(tmp_path / "taken.png" / "sub" / "x.png")) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert files_in(tmp_path) == ["taken.png"]


def test_bad_device_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.png"
    assert generate(tmp_path, "--device", "nonsense", "--out", str(out)) == 2
    assert "--device 'nonsense' is not a device" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate(tmp_path, "--device", "cuda", "--out", str(out)) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--crop-top-left=-5,99999"], "crop values must be in [0, 16384]"),
    (["--crop-top-left", "0,20000"], "crop values must be in [0, 16384]"),
    (["--original-size", "0x512"], "size values must be in [1, 16384]"),
    (["--target-size", "512x99999"], "size values must be in [1, 16384]"),
    (["--width", "-64"], "must be in [1, 16384]"),
    (["--height", "99999"], "must be in [1, 16384]"),
])
def test_out_of_range_crops_and_sizes_are_argparse_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        generate(tmp_path, *flags, "--out", str(tmp_path / "x.png"))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_non_finite_decode_in_float32_does_not_advise_fp32():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    from xldm.vae_tiling import decode_checked

    huge = torch.full((1, 4, 8, 8), 1e30)  # finite latents that overflow the decoder, as --cfg 1e30 gives
    with pytest.raises(NonFiniteError) as error:
        decode_checked(vae, huge)
    message = str(error.value)
    assert "float32" in message and "lower --cfg" in message and "--dtype fp32" not in message
    latents = torch.full((1, 4, 8, 8), float("inf"))
    with pytest.raises(NonFiniteError, match="lower --cfg") as error:
        decode_checked(vae, latents)
    assert "--dtype fp32" not in str(error.value)


def test_non_finite_sampling_in_float32_does_not_advise_fp32():
    from tiny_models import random_components
    from xldm.config import TINY_SDXL_BASE
    from xldm.pipeline import Pipeline

    pipe = Pipeline(random_components(TINY_SDXL_BASE), dtype=torch.float32, device="cpu")
    with pytest.raises(NonFiniteError) as error:
        pipe("red heart", steps=2, cfg=1e30, seed=1, width=64, height=64)
    message = str(error.value)
    assert "produced NaN/inf" in message and "lower --cfg" in message and "--dtype fp32" not in message


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_sixteen_bit_greyscale_init_image_is_scaled_not_clipped(mode):
    from xldm.images import image_to_tensor, to_rgb

    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16 if mode != "I" else np.int32)
    image = Image.fromarray(values.astype(np.int32), "I").convert(mode) if mode != "I" else Image.fromarray(values)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255, 4]
    tensor = image_to_tensor(image, 4, 1)
    assert tensor.shape == (1, 3, 1, 4) and float(tensor[0, 0, 0, 1]) == pytest.approx(128 / 255 * 2 - 1, abs=0.05)


def test_transparency_is_composited_onto_white_and_float_images_are_refused():
    from xldm.images import image_to_tensor, to_rgb

    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    assert np.asarray(to_rgb(Image.new("LA", (8, 8), (0, 0)))).min() == 255
    assert np.asarray(to_rgb(Image.new("PA", (8, 8), (0, 0)))).min() == 255
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).min() == 255
    assert float(image_to_tensor(clear, 8, 8).min()) == pytest.approx(1.0)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    assert np.asarray(to_rgb(Image.new("L", (2, 2), 7)))[0, 0].tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="'F'"):
        to_rgb(Image.new("F", (4, 4), 0.5))
    with pytest.raises(ValueError, match="'F'"):
        image_to_tensor(Image.new("F", (4, 4), 0.5), 4, 4)


@pytest.mark.parametrize("flags, named", [
    (["--vae", "/nonexistent.safetensors"], "--vae"),
    (["--lora", "F"], "--lora"),
    (["--refiner", "default"], "--refiner"),
    (["--steps", "7", "--cfg", "9"], "--steps, --cfg"),
    (["--clip-skip", "2"], "--clip-skip"),
    (["--quantize", "int8"], "--quantize"),
    (["--strength", "0.5"], "--strength"),
    (["--tile-vae"], "--tile-vae"),
    (["--deep-cache", "3"], "--deep-cache"),
    (["--original-size", "64x64"], "--original-size"),
    (["--no-weighting"], "--no-weighting"),
])
def test_cascade_refuses_the_flags_it_would_not_use(tmp_path, capsys, flags, named):
    out = tmp_path / "x.png"
    assert cli_main(["generate", PROMPT, "--cascade", str(tmp_path / "no-cascade"), "--seed", "1", "--out",
                     str(out), "-q", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xldm: error: {named}: not used by a --cascade") and "--cascade-steps" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--cascade-steps", "2,1,1"), ("--cascade-cfg", "5,4,4"),
                                         ("--cascade-aug", "0,0.1,0.1")])
def test_cascade_stage_flags_need_a_cascade(tmp_path, capsys, flag, value):
    assert generate(tmp_path, flag, value, "--out", str(tmp_path / "x.png")) == 2
    assert f"xldm: error: {flag} set the stages of a --cascade" in capsys.readouterr().err


def _png_with(path, **chunks):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_cascade_refuses_the_settings_of_a_models_image(tmp_path, capsys):
    image = _png_with(tmp_path / "model.png", xldm=json.dumps({"prompt": "x", "seed": 3, "steps": 7, "clip_skip": 2}))
    assert cli_main(["generate", "--cascade", str(tmp_path / "no-cascade"), "--from-png", str(image), "-q"]) == 2
    assert "its settings (--steps, --clip-skip) are not used by a --cascade" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("root:x:0:0:root:/root:/bin/bash\n") and p, "cannot read this image"),
    (lambda p: p.write_bytes(_png_with(p, xldm='{"prompt": "x"}').read_bytes()[:60]) and p,
     "cannot read this image"),  # truncated
    (lambda p: _png_with(p, xldm="[1,2]"), "must be a JSON object of settings, found a list"),
    (lambda p: _png_with(p, xldm="[1,2"), "text chunk is not JSON"),
    (lambda p: _png_with(p, xldm='{"prompt": "x", "original_size": 5}'),
     "the setting 'original_size' must be two integers, found 5"),
    (lambda p: _png_with(p, xldm='{"prompt": "x", "seed": "12"}'),
     "the setting 'seed' must be an integer, found '12'"),
    (lambda p: _png_with(p, xldm='{"prompt": "x", "steps": "abc"}'), "the setting 'steps' must be an integer"),
    (lambda p: _png_with(p, xldm='{"prompt": "x", "width": 64.5}'), "the setting 'width' must be an integer"),
    (lambda p: _png_with(p, xldm='{"prompt": 5}'), "the setting 'prompt' must be text, found 5"),
    (lambda p: _png_with(p, parameters="a cat\nSteps: 2, CFG scale: x, Size: 64x64"),
     "the setting 'cfg' must be a number, found 'x'"),
])
def test_from_png_with_bad_settings_is_a_clear_error(tmp_path, capsys, make, message):
    image = make(tmp_path / "in.png")
    assert cli_main(["generate", "--model", str(tmp_path / "does-not-exist.safetensors"), "--from-png", str(image),
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xldm: error:") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1:nan"])
def test_non_finite_lora_weight_is_refused_before_loading(tmp_path, capsys, weight):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")  # never read: the weight is refused first
    assert generate(tmp_path, "--width", "64", "--height", "64", "--lora", f"{lora}:{weight}", "--out",
                    str(tmp_path / "x.png")) == 2
    err = capsys.readouterr().err
    assert "xldm: error: LoRA style.safetensors: weights must be finite numbers" in err, err
