"""Hostile safetensors headers: each must be refused with a CheckpointError naming the file and the problem,
never crash with TypeError / RecursionError / OverflowError / KeyError, and never allocate what it claims.

Files are crafted byte by byte: 8-byte little-endian header length, JSON header, data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tiny_models import random_components

from xldm.config import TINY_SDXL_BASE
from xldm.errors import CheckpointError, CorruptCheckpointError
from xldm.weights.detect import METADATA_KEY, model_config_to_dict
from xldm.weights.io import open_checkpoint, save_file
from xldm.weights.load import load_model, load_single_file
from xldm.weights.save import single_file_state_dict

ONE_F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def refused(path: Path, pattern: str, opener=open_checkpoint) -> CheckpointError:
    with pytest.raises(CheckpointError, match=pattern) as e:
        opener(path)
    assert str(path) in str(e.value) or opener is not open_checkpoint
    return e.value


def test_dtype_that_is_a_list(tmp_path):
    path = write_raw(tmp_path / "a.safetensors", {"w": dict(ONE_F32, dtype=["F32"])}, b"\0" * 4)
    err = refused(path, r"tensor 'w' has dtype \['F32'\], expected a string")
    assert isinstance(err, CorruptCheckpointError)


@pytest.mark.parametrize("field, value, pattern", [
    ("shape", {"0": 1}, r"invalid shape .*expected a list of non-negative integers"),
    ("shape", [1.0], r"invalid shape .*expected a list of non-negative integers"),
    ("data_offsets", [0, 4, 8], r"invalid data_offsets .*expected a list of two integers"),
    ("data_offsets", [[0], 4], r"invalid data_offsets .*expected a list of two integers"),
])
def test_shape_and_offsets_types(tmp_path, field, value, pattern):
    path = write_raw(tmp_path / "t.safetensors", {"w": dict(ONE_F32, **{field: value})}, b"\0" * 4)
    assert isinstance(refused(path, pattern), CorruptCheckpointError)


def test_header_nested_too_deep(tmp_path):
    path = write_raw(tmp_path / "b.safetensors", b"[" * 200_000 + b"]" * 200_000)
    assert isinstance(refused(path, r"nested too deeply"), CorruptCheckpointError)
    path = write_raw(tmp_path / "b2.safetensors", b'{"w": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert isinstance(refused(path, r"nested too deeply"), CorruptCheckpointError)


@pytest.mark.parametrize("dim", [2**70, 2**63, 2**41])
def test_zero_size_tensor_with_huge_dimension(tmp_path, dim):
    path = write_raw(tmp_path / "c.safetensors", {"w": {"dtype": "F32", "shape": [0, dim], "data_offsets": [0, 0]}})
    err = refused(path, rf"tensor 'w' has a dimension of {dim}, more than the \d+ \(2\*\*40\) allowed")
    assert isinstance(err, CorruptCheckpointError)


@pytest.mark.parametrize("metadata, found", [([1, 2], "array"), (5, "number"), ("x", "string"),
                                             ({"a": 1}, "'a' maps to a JSON number")])
def test_metadata_not_a_dict_of_strings(tmp_path, metadata, found):
    path = write_raw(tmp_path / "d.safetensors", {"__metadata__": metadata, "w": ONE_F32}, b"\0" * 4)
    err = refused(path, r"__metadata__ must .*strings.*" + found)
    assert isinstance(err, CorruptCheckpointError)


def test_metadata_null_is_allowed(tmp_path):
    path = write_raw(tmp_path / "n.safetensors", {"__metadata__": None, "w": ONE_F32}, b"\0" * 4)
    assert open_checkpoint(path).metadata == {}


# --- xldm's own `xldm.config` metadata -----------------------------------------------------------------------


def _with_config(path: Path, config_dict) -> Path:
    save_file({"model.diffusion_model.x": torch.zeros(1)}, path, metadata={METADATA_KEY: json.dumps(config_dict)})
    return path


def _edited(edit) -> dict:
    d = json.loads(json.dumps(model_config_to_dict(TINY_SDXL_BASE)))
    edit(d)
    return d


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("unet"), r"config lacks required field\(s\) \['unet'\]"),
    (lambda d: d["unet"].update(bogus=1), r"config.unet has unknown field\(s\) \['bogus'\]"),
    (lambda d: d.update(bogus=1), r"config has unknown field\(s\) \['bogus'\]"),
    (lambda d: d.update(unet=[1]), r"config.unet must be a JSON object, got a JSON array"),
    (lambda d: d.update(text_encoders=5), r"config.text_encoders must be a JSON array, got a JSON number"),
    (lambda d: d["unet"].update(num_res_blocks="2"), r"config.unet.num_res_blocks must be an integer"),
    (lambda d: d["text_encoders"][1].update(width=[48]), r"config.text_encoders\[1\].width must be an integer"),
    (lambda d: d.update(kind="sd99"), r"model kind 'sd99'"),
])
def test_xldm_config_metadata_fields(tmp_path, edit, pattern):
    path = _with_config(tmp_path / "e.safetensors", _edited(edit))
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("value", [[1], None, "x"])
def test_xldm_config_metadata_not_an_object(tmp_path, value):
    path = _with_config(tmp_path / "e.safetensors", value)
    with pytest.raises(CheckpointError, match=r"config must be a JSON object") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_xldm_config_metadata_nested_too_deep(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1)}, path,
              metadata={METADATA_KEY: "[" * 200_000 + "]" * 200_000})
    with pytest.raises(CheckpointError, match=r"nested too deeply") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_config_claiming_a_huge_unet_refused_before_allocating(tmp_path):
    """A tiny real file whose metadata claims an 8192-wide UNet: refused by comparing with the header's shapes,
    the network built on the meta device only (a real one would need tens of GB)."""
    model = random_components(TINY_SDXL_BASE)
    path = tmp_path / "huge.safetensors"
    huge = _edited(lambda d: d["unet"].update(block_out_channels=[8192, 8192, 8192]))
    unet_only = {k: v for k, v in single_file_state_dict(model).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, path, metadata={METADATA_KEY: json.dumps(huge)})
    assert path.stat().st_size < 64_000_000  # an 8192-wide UNet would need hundreds of GB
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"UNet") as e:
        load_single_file(path, components=["unet"])
    assert time.perf_counter() - start < 5.0
    assert "8192" in str(e.value)
