"""Hostile safetensors headers: each must be refused with a CheckpointError naming the file and the problem,
never crash with TypeError / RecursionError / OverflowError / KeyError, and never allocate what it claims.

Files are crafted byte by byte: 8-byte little-endian header length, JSON header, data."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.errors import CheckpointError, CorruptCheckpointError
from xldm.weights.detect import METADATA_KEY, model_config_to_dict
from xldm.weights.io import open_checkpoint, save_file
from xldm.weights.load import load_model, load_single_file
from xldm.weights.save import single_file_state_dict

from tiny_models import random_components

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
