"""The table of hostile inputs: one row per input that once broke xldm (or could), with the error it must get.

Each row is (name, build, error type, message pattern): `build(tmp_path)` returns a thunk that feeds the input to
the boundary that validates it.  Grow the table with each bug found; the detailed tests of each area are in
test_adversarial_{weights,serve,cli}.py.  The whole table runs in a few seconds."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xldm.errors import CheckpointError, CorruptCheckpointError
from xldm.images import to_rgb
from xldm.serve.guard import _json_problem
from xldm.serve.schemas import decode_image
from xldm.weights.detect import METADATA_KEY, model_config_to_dict
from xldm.weights.io import open_checkpoint, save_file
from xldm.weights.load import load_model

ONE_F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def raw_file(header: dict | bytes, data: bytes = b"\0" * 4):
    def build(tmp_path: Path):
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        path = tmp_path / "hostile.safetensors"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
        return lambda: open_checkpoint(path)
    return build


def config_file(edit):
    def build(tmp_path: Path):
        import torch

        from xldm.config import TINY_SDXL_BASE

        config = json.loads(json.dumps(model_config_to_dict(TINY_SDXL_BASE)))
        edit(config)
        path = tmp_path / "config.safetensors"
        save_file({"model.diffusion_model.x": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps(config)})
        return lambda: load_model(path)
    return build


def image_text(text: str):
    return lambda tmp_path: (lambda: decode_image(text, "init_images[0]"))


def json_body(text: str):
    def check():
        problem = _json_problem(json.loads(text))
        if problem is not None:
            raise ValueError(problem)
    return lambda tmp_path: check


def pil_image(image: Image.Image):
    return lambda tmp_path: (lambda: to_rgb(image))


def request(**fields):
    from xldm.pipeline import resolve_request
    from xldm.request import GenerationRequest

    return lambda tmp_path: (lambda: resolve_request(GenerationRequest(**{"prompt": "x", **fields}), default_size=64,
                                                     has_refiner=False))


def lora_tag(tag: str):
    def build(tmp_path: Path):
        from xldm.request import GenerationRequest, request_loras

        (tmp_path / "style.safetensors").write_bytes(b"")  # never read: the tag is refused first
        return lambda: request_loras(GenerationRequest(f"a cat {tag}"), tmp_path)
    return build


NESTED = "[" * 200_000 + "]" * 200_000
HOSTILE = [
    # weight-file headers
    ("dtype is a list", raw_file({"w": dict(ONE_F32, dtype=["F32"])}), CorruptCheckpointError, "expected a string"),
    ("header nested 200,000 deep", raw_file(NESTED.encode()), CorruptCheckpointError, "nested too deeply"),
    ("zero-size tensor with a 2**70 dimension", raw_file({"w": dict(ONE_F32, shape=[0, 2**70], data_offsets=[0, 0])},
                                                        b""), CorruptCheckpointError, "dimension"),
    ("__metadata__ is a list", raw_file({"__metadata__": [1], "w": ONE_F32}), CorruptCheckpointError, "__metadata__"),
    ("__metadata__ is a number", raw_file({"__metadata__": 5, "w": ONE_F32}), CorruptCheckpointError, "__metadata__"),
    ("data past the end of the file", raw_file({"w": dict(ONE_F32, shape=[100], data_offsets=[0, 400])}),
     CorruptCheckpointError, "ends at byte"),
    # model configs in a header
    ("config without unet", config_file(lambda d: d.pop("unet")), CheckpointError, r"lacks required field\(s\)"),
    ("config with an unknown field", config_file(lambda d: d["unet"].update(bogus=1)), CheckpointError,
     r"unknown field\(s\) \['bogus'\]"),
    ("config width as a string", config_file(lambda d: d["unet"].update(num_res_blocks="2")), CheckpointError,
     "must be an integer"),
    # images sent to the server
    ("a path", image_text("/etc/passwd"), ValueError, "URLs and paths are not accepted"),
    ("a URL", image_text("http://example.com/cat.png"), ValueError, "URLs and paths are not accepted"),
    ("a home path", image_text("~/cat.png"), ValueError, "URLs and paths are not accepted"),
    ("base64 of no image", image_text(base64.b64encode(b"hello world!").decode()), ValueError, "not a PNG"),
    ("a float image", pil_image(Image.new("F", (4, 4))), ValueError, "mode 'F' is not supported"),
    # request bodies
    ("JSON nested 200 deep", json_body('{"comments": ' + "[" * 200 + "]" * 200 + "}"), ValueError,
     "nested deeper than"),
    ("a lone surrogate", json_body('{"comments": {"a": "\\ud800"}}'), ValueError, "lone surrogate"),
    # generation requests (the Python API, the CLI and the server resolve them alike)
    ("seed as a string", request(seed="12"), ValueError, "seed must be an int, got str '12'"),
    ("seed as a bool", request(seed=True), ValueError, "seed must be an int, got bool True"),
    ("steps as a bool", request(steps=True), ValueError, "steps must be an integer >= 1, got True"),
    ("batch as a bool", request(batch=True), ValueError, "batch must be an integer >= 1, got True"),
    ("a prompt weight of 400 nines", request(prompt="a (red:" + "9" * 400 + ") heart"), ValueError,
     r"prompt: prompt weight '9{20}\.\.\.' is not a finite number"),
    ("a prompt weight beyond float32", request(negative_prompt="(red:1" + "0" * 39 + ")"), ValueError,
     "negative_prompt: prompt weight of 'red' is 1e\\+39, beyond float32"),
    ("nested prompt weights multiplying past float32", request(prompt="((red:" + "9" * 30 + "):" + "9" * 30 + ")"),
     ValueError, "beyond float32"),
    # <lora:...> prompt tags (A1111 extra networks syntax)
    ("a LoRA tag's dyn_dim", lora_tag("<lora:style:1:1:8>"), ValueError, "dyn_dim .* is not supported"),
    ("a LoRA tag's dyn=", lora_tag("<lora:style:1:dyn=8>"), ValueError, "dyn_dim .* is not supported"),
    ("a LoRA tag's unknown field", lora_tag("<lora:style:1:bogus=2>"), ValueError, "unknown field\\(s\\) bogus"),
    ("a LoRA tag weight of nan", lora_tag("<lora:style:nan>"), ValueError,
     "<lora:style>: weights must be finite numbers, got nan"),
    ("a LoRA tag text weight of inf", lora_tag("<lora:style:inf:1>"), ValueError, "weights must be finite numbers"),
]


@pytest.mark.parametrize("name, build, error, pattern", HOSTILE, ids=[row[0] for row in HOSTILE])
def test_hostile_input_is_refused_clearly(tmp_path, name, build, error, pattern):
    with pytest.raises(error, match=pattern):
        build(tmp_path)()


def _jpeg_base64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buffer, "JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_what_looks_hostile_but_is_fine():
    text = _jpeg_base64()
    assert text.startswith("/9j/")  # a raw base64 JPEG starts like a path
    assert decode_image(text).size == (16, 16)
    assert _json_problem(json.loads('{"comments": {"a": "\\ud83d\\ude00", "b": [[[1]]]}}')) is None
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert to_rgb(half).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)  # transparency onto white, not black
