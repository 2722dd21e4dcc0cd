"""PNG metadata: the A1111 `parameters` text and the `xldm` JSON chunk. Every comparison is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xldm import __version__
from xldm.pngmeta import (
    A1111_SAMPLER_NAMES,
    a1111_to_params,
    format_a1111_parameters,
    parse_a1111_parameters,
    read_png_params,
    read_png_text,
    save_png,
)


def make_image(width: int = 24, height: int = 16) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


PARAMS = {
    "prompt": "a red fox in the snow, golden hour",
    "negative_prompt": "blurry, lowres",
    "width": 1024,
    "height": 768,
    "steps": 30,
    "cfg": 5.0,
    "seed": 1234,
    "sampler": "dpmpp_2m_karras",
    "model": "sd_xl_base_1.0",
    "refiner": "sd_xl_refiner_1.0",
    "refiner_start": 0.8,
    "original_size": (1024, 768),
    "crop_top_left": (0, 0),
    "tile_vae": None,
}


def chunk_types(path) -> list[bytes]:
    """The chunk type codes of a PNG file, in order (read from the bytes, independently of Pillow)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        types.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return types


def test_round_trip_keeps_pixels_and_every_setting(tmp_path) -> None:
    image = make_image()
    path = save_png(image, tmp_path / "fox.png", PARAMS)
    assert path == tmp_path / "fox.png"

    found = read_png_params(path)
    assert found == json.loads(json.dumps(PARAMS))  # JSON: tuples come back as lists
    assert found["original_size"] == [1024, 768] and found["tile_vae"] is None and found["cfg"] == 5.0
    with Image.open(path) as reread:
        assert reread.size == (24, 16)
        assert np.array_equal(np.asarray(reread.convert("RGB")), np.asarray(image))  # lossless: max diff 0
    # Only the PNG itself is left in the folder: the temporary file was renamed over it.
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]
    # Text chunks come before the pixel data, so readers that stop at IDAT still see them.
    types = chunk_types(path)
    assert types.count(b"tEXt") == 2 and types.index(b"tEXt") < types.index(b"IDAT")


def test_a1111_text_has_a1111_keys_and_order(tmp_path) -> None:
    path = save_png(make_image(), tmp_path / "fox.png", PARAMS)
    text = read_png_text(path)["parameters"]
    assert text == (
        "a red fox in the snow, golden hour\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 1234, Size: 1024x768, "
        f"Model: sd_xl_base_1.0, Refiner: sd_xl_refiner_1.0, Refiner switch at: 0.8, Version: xldm {__version__}"
    )
    img2img = dict(PARAMS, strength=0.35, schedule="karras", sampler="dpmpp_2m", negative_prompt="",
                   model_hash="31e35c80fc", refiner=None, refiner_start=None)  # None: left out
    assert format_a1111_parameters(img2img).splitlines() == [
        "a red fox in the snow, golden hour",
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 1234, Size: 1024x768, "
        f"Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.35, Version: xldm {__version__}",
    ]


def test_unicode_prompts_use_itxt_and_round_trip(tmp_path) -> None:
    params = dict(PARAMS, prompt="桜の木の下の猫 🐱, «très joli»", negative_prompt="ぼやけた")
    path = save_png(make_image(), tmp_path / "neko.png", params)
    assert b"iTXt" in chunk_types(path)  # not Latin-1: Pillow writes UTF-8 iTXt chunks
    assert read_png_params(path)["prompt"] == "桜の木の下の猫 🐱, «très joli»"
    fields = parse_a1111_parameters(read_png_text(path)["parameters"])
    assert fields["Prompt"] == "桜の木の下の猫 🐱, «très joli»" and fields["Negative prompt"] == "ぼやけた"
    # Latin-1 text stays in plain tEXt chunks.
    latin = save_png(make_image(), tmp_path / "cafe.png", dict(PARAMS, prompt="café crème"))
    assert b"iTXt" not in chunk_types(latin) and read_png_params(latin)["prompt"] == "café crème"


def test_newlines_commas_colons_and_quotes_survive(tmp_path) -> None:
    params = dict(
        PARAMS,
        prompt='line one, with "quotes"\nline two: (detail:1.2)\nline three',
        negative_prompt="bad hands,\nextra fingers",
        model='my "best", model: v2',
        refiner="refiner\nwith newline",
    )
    text = format_a1111_parameters(params)
    settings = text.splitlines()[-1]
    # Values holding ',', ':' or a newline are JSON strings on the settings line (A1111 `quote`).
    assert 'Model: "my \\"best\\", model: v2"' in settings
    assert 'Refiner: "refiner\\nwith newline"' in settings
    fields = parse_a1111_parameters(text)
    assert fields["Prompt"] == params["prompt"]
    assert fields["Negative prompt"] == params["negative_prompt"]
    assert fields["Model"] == params["model"] and fields["Refiner"] == params["refiner"]
    assert fields["Steps"] == "30" and fields["Size"] == "1024x768" and fields["Seed"] == "1234"
    back = a1111_to_params(fields)
    for key in ("prompt", "negative_prompt", "model", "refiner", "steps", "seed", "cfg", "width", "height",
                "sampler", "refiner_start"):
        assert back[key] == params[key], key
    path = save_png(make_image(), tmp_path / "quotes.png", params)
    assert read_png_params(path)["prompt"] == params["prompt"]


REAL_LOOKING = (
    "masterpiece, a castle on a hill, (sunset:1.2), <lora:detail:0.6>\n"
    "dramatic clouds\n"
    "Negative prompt: lowres, blurry, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592653, Size: 832x1216, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, "
    "Denoising strength: 0.35, Clip skip: 2, "
    'Lora hashes: "detail: 1a2b3c4d5e6f, style: 0f1e2d3c4b5a", '
    "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
)


def test_parse_a_real_looking_a1111_infotext() -> None:
    fields = parse_a1111_parameters(REAL_LOOKING)
    assert fields["Prompt"] == "masterpiece, a castle on a hill, (sunset:1.2), <lora:detail:0.6>\ndramatic clouds"
    assert fields["Negative prompt"] == "lowres, blurry, (worst quality:1.4)"
    assert fields["Lora hashes"] == "detail: 1a2b3c4d5e6f, style: 0f1e2d3c4b5a"
    assert fields["Refiner"] == "sd_xl_refiner_1.0 [7440042bbd]"
    assert list(fields)[2:] == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE hash",
        "VAE", "Denoising strength", "Clip skip", "Lora hashes", "Refiner", "Refiner switch at", "Version",
    ]
    params = a1111_to_params(fields)
    assert params == {
        "prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"],
        "steps": 28, "sampler": "dpmpp_2m", "schedule": "karras", "cfg": 7, "seed": 3141592653,
        "model_hash": "31e35c80fc", "model": "sd_xl_base_1.0", "vae_hash": "235745af8d",
            "vae": "sdxl_vae.safetensors",
        "strength": 0.35, "clip_skip": 2, "refiner": "sd_xl_refiner_1.0 [7440042bbd]", "refiner_start": 0.8,
        "width": 832, "height": 1216, "lora_hashes": "detail: 1a2b3c4d5e6f, style: 0f1e2d3c4b5a",
    }


def test_parse_text_without_settings_or_negative_prompt() -> None:
    # Fewer than three pairs on the last line: A1111 reads it as part of the prompt.
    assert parse_a1111_parameters("a cat\nSteps: 20, Seed: 5") == {"Prompt": "a cat\nSteps: 20, Seed: 5",
                                                                   "Negative prompt": ""}
    fields = parse_a1111_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 5, Size: 512x768")
    assert fields["Negative prompt"] == "" and fields["Sampler"] == "Euler a"
    assert a1111_to_params(fields) == {"prompt": "a cat", "steps": 20, "sampler": "euler_a", "cfg": 7.5,
                                       "seed": 5, "width": 512, "height": 768}
    # An empty prompt with a negative prompt: the text starts with the "Negative prompt:" line.
    text = format_a1111_parameters({"prompt": "", "negative_prompt": "ugly", "steps": 4, "seed": 1, "cfg": 1.0})
    assert text.startswith("Negative prompt: ugly\nSteps: 4, CFG scale: 1.0, Seed: 1")
    assert parse_a1111_parameters(text)["Negative prompt"] == "ugly"


def test_sampler_names_both_ways() -> None:
    expected = {
        "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
        "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
        "ddim": "DDIM", "unipc": "UniPC", "dpmpp_sde_karras": "DPM++ SDE Karras", "dpmpp_3m_sde": "DPM++ 3M SDE",
        "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras", "lcm": "LCM",
    }
    assert len(A1111_SAMPLER_NAMES) == 2 * len(expected) == 24
    for ours, theirs in expected.items():
        assert A1111_SAMPLER_NAMES[ours] == theirs and A1111_SAMPLER_NAMES[theirs] == ours
    # An unknown sampler is written as is.
    assert "Sampler: lms," in format_a1111_parameters({"prompt": "x", "sampler": "lms", "steps": 4, "seed": 0})


def test_read_falls_back_to_a1111_text_and_reports_missing_metadata(tmp_path) -> None:
    info = PngInfo()
    info.add_text("parameters", REAL_LOOKING)
    make_image().save(tmp_path / "webui.png", pnginfo=info)
    params = read_png_params(tmp_path / "webui.png")
    assert params["seed"] == 3141592653 and params["width"] == 832 and params["sampler"] == "dpmpp_2m"

    make_image().save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match=r"no generation settings found .* found none"):
        read_png_params(tmp_path / "plain.png")


def test_save_replaces_atomically_and_cleans_up_on_failure(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.png"
    save_png(make_image(), target, dict(PARAMS, seed=1))
    save_png(make_image(32, 32), target, dict(PARAMS, seed=2))  # overwrite in place
    assert read_png_params(target)["seed"] == 2 and Image.open(target).size == (32, 32)
    before = target.read_bytes()

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(make_image(), target, dict(PARAMS, seed=3))
    monkeypatch.undo()
    assert target.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # and no temporary file is left

    with pytest.raises(TypeError, match="cannot be stored in PNG metadata"):
        save_png(make_image(), tmp_path / "bad.png", dict(PARAMS, generator=object()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
