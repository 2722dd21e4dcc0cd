"""Where `xldm generate` writes and what it records: numbered outputs/NNNNN-SEED.png without --out, parent folders
made, JPEG and WebP written as such with A1111's EXIF UserComment, `Model` (file stem) and `Model hash` (sha256[:10],
cached), --from-png regenerating an image, messages on stderr (none with --quiet), --version, `convert` inferring
--to, and a plain prompt encoded the same with A1111's prompt semantics on or off."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xldm import __version__
from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE
from xldm.pngmeta import parse_a1111_parameters, read_png_params, read_png_text
from xldm.weights.save import save_single_file

from tiny_models import random_components

PROMPT = "a red heart"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_single_file(random_components(TINY_SDXL_BASE, seed=0), tmp_path_factory.mktemp("m") / "base.safetensors")


def generate(base, *flags) -> int:
    return cli_main(["generate", PROMPT, "--model", str(base), "--steps", "2", "--width", "64", "--height", "64",
                     "--dtype", "fp32", "--device", "cpu", *flags])


def pixels(data) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


def test_without_out_images_are_numbered_under_outputs(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate(base, "--seed", "40", "--batch", "2") == 0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["00000-40.png", "00001-41.png"]
    (tmp_path / "outputs" / "00007-1.png").write_bytes(b"not ours")  # a gap: the next number follows the largest
    assert generate(base, "--seed", "40") == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1].endswith("00008-40.png") and (tmp_path / "outputs" / "00007-1.png").read_bytes() == b"not ours"
    # same seed, same image, never overwritten
    assert np.array_equal(pixels(tmp_path / "outputs" / "00000-40.png"), pixels(tmp_path / "outputs" / "00008-40.png"))


def test_out_makes_folders_and_writes_jpeg_and_webp_with_exif(base, tmp_path):
    png, jpg, webp = (tmp_path / "a" / "b" / f"x.{ext}" for ext in ("png", "jpg", "webp"))
    for out in (png, jpg, webp):
        assert generate(base, "--seed", "3", "--negative", "dull, grey", "--out", str(out)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(jpg).format == "JPEG"
    assert webp.read_bytes()[:4] == b"RIFF" and webp.read_bytes()[8:12] == b"WEBP"
    text = read_png_text(png)["parameters"]
    for path in (jpg, webp):
        # A1111's layout (modules/images.py): EXIF UserComment, "UNICODE" prefix + UTF-16 big-endian
        raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
        assert raw[:8] == b"UNICODE\0" and raw[8:].decode("utf_16_be") == text
        assert read_png_text(path)["parameters"] == text
        params = read_png_params(path)
        assert (params["seed"], params["steps"], params["negative_prompt"]) == (3, 2, "dull, grey")
    # lossy, but the same image
    assert np.abs(pixels(jpg).astype(int) - pixels(png).astype(int)).mean() < 12
    assert generate(base, "--out", str(tmp_path / "y.jpg"), "--force") == 0  # --force on a new file is harmless


def test_infotext_names_the_model_file_and_its_hash(base, tmp_path, hash_cache):
    out = tmp_path / "h.png"
    assert generate(base, "--seed", "1", "--clip-skip", "2", "--out", str(out)) == 0
    fields = parse_a1111_parameters(read_png_text(out)["parameters"])
    assert fields["Model"] == "base"  # the file's stem, as A1111 (not the kind, sdxl-base)
    assert fields["Model hash"] == hashlib.sha256(base.read_bytes()).hexdigest()[:10]
    assert fields["Clip skip"] == "2"
    cache = json.loads((Path(hash_cache) / "hashes.json").read_text())
    assert cache[str(base.resolve())]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()


def test_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from xldm import hashes

    monkeypatch.setenv("XLDM_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    real = hashlib.sha256(b"weights").hexdigest()
    assert hashes.short_hash(model) == real[:10]
    calls, sha256 = [], hashlib.sha256
    other = sha256(b"other weights").hexdigest()
    monkeypatch.setattr(hashes.hashlib, "sha256", lambda: calls.append(1) or sha256())
    assert hashes.short_hash(model) == real[:10] and calls == []  # the second time: from the cache, no hashing
    model.write_bytes(b"other weights")  # new size and mtime: hashed again
    assert hashes.file_sha256(model) == other and calls == [1]
    assert hashes.short_hash(tmp_path) is None  # a folder (diffusers) has no file hash


def test_from_png_regenerates_the_image(base, tmp_path):
    first = tmp_path / "first.png"
    assert generate(base, "--seed", "9", "--sampler", "euler_a", "--cfg", "3", "--negative", "blurry",
                    "--original-size", "128x96", "--out", str(first)) == 0
    again, from_jpeg = tmp_path / "again.png", tmp_path / "from_jpeg.png"
    assert cli_main(["generate", "--from-png", str(first), "--model", str(base), "--dtype", "fp32", "--device", "cpu",
                     "--out", str(again)]) == 0
    assert np.array_equal(pixels(first), pixels(again))
    params = read_png_params(again)
    assert (params["prompt"], params["seed"], params["sampler"], params["cfg"], params["steps"]) == \
        (PROMPT, 9, "euler_a", 3.0, 2)
    # from a JPEG's A1111 infotext (no xldm JSON): prompt, negative, steps, sampler, CFG, seed, size
    jpeg = tmp_path / "j.jpg"
    assert generate(base, "--seed", "9", "--sampler", "euler_a", "--cfg", "3", "--negative", "blurry",
                    "--out", str(jpeg)) == 0
    assert cli_main(["generate", "--from-png", str(jpeg), "--model", str(base), "--dtype", "fp32", "--device", "cpu",
                     "--out", str(from_jpeg)]) == 0
    direct = tmp_path / "direct.png"
    assert generate(base, "--seed", "9", "--sampler", "euler_a", "--cfg", "3", "--negative", "blurry",
                    "--out", str(direct)) == 0
    assert np.array_equal(pixels(from_jpeg), pixels(direct))
    # a flag given too overrides the image's setting
    assert cli_main(["generate", "--from-png", str(first), "--model", str(base), "--seed", "10", "--dtype", "fp32",
                     "--device", "cpu", "--out", str(tmp_path / "s10.png")]) == 0
    assert read_png_params(tmp_path / "s10.png")["seed"] == 10
    assert cli_main(["generate", "--from-png", str(tmp_path / "none.png"), "--out", str(tmp_path / "z.png")]) == 2
    # another tool's PNG with the newer A1111 layout: the schedule apart from the sampler
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a red heart\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, Schedule type: "
                                "Karras, CFG scale: 4, Seed: 8, Size: 64x64, Model hash: 0123456789, Model: other")
    Image.new("RGB", (64, 64)).save(a1111, pnginfo=info)
    assert cli_main(["generate", "--from-png", str(a1111), "--model", str(base), "--dtype", "fp32", "--device", "cpu",
                     "--quiet", "--out", str(tmp_path / "re.png")]) == 0
    params = read_png_params(tmp_path / "re.png")
    assert (params["sampler"], params["cfg"], params["seed"], params["negative_prompt"], params["width"]) == \
        ("dpmpp_2m_karras", 4, 8, "blurry", 64)


def test_messages_on_stderr_and_quiet(base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XLDM_CACHE_DIR", str(tmp_path / "cache"))  # a model never hashed before
    assert generate(base, "--seed", "1", "--out", str(tmp_path / "a.png")) == 0
    captured = capsys.readouterr()
    assert f"loading {base}" in captured.err and "decoding 1 image (64x64)" in captured.err
    assert "hashing base.safetensors" in captured.err
    assert captured.out.strip() == str(tmp_path / "a.png")
    assert generate(base, "--seed", "1", "--out", str(tmp_path / "c.png")) == 0
    assert "hashing" not in capsys.readouterr().err  # cached
    assert generate(base, "--seed", "1", "--quiet", "--out", str(tmp_path / "b.png")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip() == str(tmp_path / "b.png")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"xldm {__version__}"


def test_convert_infers_the_layout_from_the_destination(base, tmp_path, capsys):
    from xldm.weights.info import model_info

    folder, single = tmp_path / "diffusers-copy", tmp_path / "again.safetensors"
    assert cli_main(["convert", str(base), str(folder)]) == 0  # no extension: a diffusers folder
    assert (folder / "model_index.json").is_file()
    assert cli_main(["convert", str(folder), str(single)]) == 0  # .safetensors: a single file
    assert single.is_file() and model_info(single).config.unet == model_info(base).config.unet
    assert cli_main(["convert", str(base), str(tmp_path / "x.ckpt")]) == 2
    assert "cannot tell the layout" in capsys.readouterr().err


def test_plain_prompts_encode_as_before_with_a1111_semantics(base):
    """A prompt without weights, brackets or BREAK, under 75 tokens: chunking and weighting change nothing."""
    from xldm.conditioning import encode_prompts
    from xldm.weights.load import load_model

    model = load_model(base, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        a1111 = encode_prompts(model.text_encoders, None, model.config, ["red heart"], long_prompts="chunk",
                               weighting=True)
        plain = encode_prompts(model.text_encoders, None, model.config, ["red heart"], long_prompts="truncate",
                               weighting=False)
    assert a1111.context.shape == (1, 77, TINY_SDXL_BASE.unet.context_dim)
    assert torch.equal(a1111.context, plain.context) and torch.equal(a1111.pooled, plain.pooled)
