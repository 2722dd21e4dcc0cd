"""Weight file I/O: safetensors round trips, header validation, pickle refusal, strict loading, atomic save.

Oracle: the `safetensors` library must read what xldm writes and xldm must read what the library writes, bit for
bit (exact equality, tolerance 0).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from xldm.errors import (
    CheckpointError,
    CorruptCheckpointError,
    PickleRefusedError,
    StateDictMismatchError,
    UnsafePathError,
    XldmError,
)
from xldm.weights import io
from xldm.weights.io import load_strict, open_checkpoint, resolve_inside, save_file

FAST = 1.0  # seconds: every corrupt file must be rejected well within this


def example_tensors() -> dict[str, torch.Tensor]:
    """One small tensor of every dtype the format and torch share, plus edge shapes."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, dtype in io.SAFETENSORS_DTYPES.items():
        if dtype.is_floating_point or dtype.is_complex:
            out[f"t.{name}"] = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            out[f"t.{name}"] = torch.rand(3, 5, generator=g) > 0.5
        else:
            out[f"t.{name}"] = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
    out["edge.scalar"] = torch.tensor(1.5)
    out["edge.empty"] = torch.empty(0, 7)
    out["edge.big"] = torch.randn(64, 33, generator=g)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of dtype, shape and bytes (works for every dtype, NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-shaped file written byte by byte, so that any part can be wrong."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# --- round trips ------------------------------------------------------------------------------------


def test_round_trip_every_dtype_both_directions(tmp_path):
    tensors = example_tensors()
    assert {"BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"} <= set(
        io.SAFETENSORS_DTYPES
    )
    mine = tmp_path / "mine.safetensors"
    save_file(tensors, mine, metadata={"format": "pt", "note": "x"})
    # xldm writes, the safetensors library reads.
    theirs_read = safetensors.torch.load_file(mine)
    assert set(theirs_read) == set(tensors)
    assert all(same_bits(theirs_read[k], v) for k, v in tensors.items())
    # The library writes, xldm reads.
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs, metadata={"a": "b"})
    ckpt = open_checkpoint(theirs)
    assert ckpt.metadata == {"a": "b"}
    assert open_checkpoint(mine).metadata == {"format": "pt", "note": "x"}
    assert len(ckpt) == len(tensors) and set(ckpt.keys()) == set(tensors) and "t.BF16" in ckpt
    assert ckpt.nbytes == sum(v.numel() * v.element_size() for v in tensors.values())
    for key, value in tensors.items():
        assert same_bits(ckpt.tensor(key), value), key
    loaded = ckpt.tensors()
    assert all(same_bits(loaded[k], v) for k, v in tensors.items())


def test_tensors_prefix_and_dtype_cast(tmp_path):
    tensors = {
        "a.w": torch.randn(4, 3, dtype=torch.float32),
        "a.ids": torch.arange(5),
        "a.f8": torch.randn(6).to(torch.float8_e4m3fn),
        "b.w": torch.randn(2, dtype=torch.float16),
    }
    path = tmp_path / "p.safetensors"
    save_file(tensors, path)
    ckpt = open_checkpoint(path)
    got = ckpt.tensors("a.", dtype=torch.bfloat16)
    assert set(got) == {"w", "ids", "f8"}
    # Floating tensors are cast (exactly as torch casts), integer tensors keep their dtype.
    assert same_bits(got["w"], tensors["a.w"].to(torch.bfloat16))
    assert same_bits(got["f8"], tensors["a.f8"].to(torch.bfloat16))
    assert same_bits(got["ids"], tensors["a.ids"])
    assert set(ckpt.tensors("a.", strip_prefix=False)) == {"a.w", "a.ids", "a.f8"}
    # tensor() casts whatever it is asked to, and moves to the asked device.
    t = ckpt.tensor("a.ids", dtype=torch.float32, device="cpu")
    assert same_bits(t, torch.arange(5, dtype=torch.float32))
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        ckpt.tensor("nope")


def test_header_only_access_reads_no_tensor_data(tmp_path, monkeypatch):
    # A 4 GiB sparse file: opening it and asking shapes/dtypes must not read (or allocate) its data.
    path = tmp_path / "big.safetensors"
    n = 2**30  # F32 elements -> 4 GiB
    header = json.dumps({
        "big": f32([1024, n // 1024], 0, 4 * n),
        "ids": {"dtype": "I64", "shape": [1, 77], "data_offsets": [4 * n, 4 * n + 8 * 77]},
    }).encode()
    write_raw(path, header)
    with open(path, "r+b") as f:
        f.truncate(8 + len(header) + 4 * n + 8 * 77)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(io.Checkpoint, "_read", no_reading)
    start = time.perf_counter()
    ckpt = open_checkpoint(path)
    assert ckpt.shape("big") == (1024, n // 1024) and ckpt.dtype("big") == torch.float32
    assert ckpt.shape("ids") == (1, 77) and ckpt.dtype("ids") == torch.int64
    assert ckpt.nbytes == 4 * n + 8 * 77
    assert time.perf_counter() - start < FAST


# --- pickles are code -------------------------------------------------------------------------------


class WritesMarker:
    """Unpickling this calls open(marker, "w"), i.e. creates a file: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_files(folder: Path, marker: Path) -> list[Path]:
    payload = {"model.weight": torch.ones(2), "evil": WritesMarker(marker)}
    zip_ckpt = folder / "zip.ckpt"
    torch.save(payload, zip_ckpt)
    legacy = folder / "legacy.pt"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    raw = folder / "raw.pth"
    raw.write_bytes(pickle.dumps(payload))
    return [zip_ckpt, legacy, raw]


def test_malicious_pickle_payload_is_live(tmp_path):
    # Guard for the tests below: an unsafe load of the same payload really does create the marker.
    marker = tmp_path / "unsafe_marker"
    zip_ckpt = _malicious_files(tmp_path, marker)[0]
    torch.load(zip_ckpt, weights_only=False)
    assert marker.exists()


def test_pickle_refused_by_default_and_no_code_runs(tmp_path):
    marker = tmp_path / "marker"
    for path in _malicious_files(tmp_path, marker):
        with pytest.raises(PickleRefusedError) as caught:
            open_checkpoint(path)
        message = str(caught.value)
        assert "run arbitrary code" in message and "trust" in message
        assert f"xldm convert {path.name} {path.stem}.safetensors --allow-pickle" in message
        assert not marker.exists()
    # Unknown extensions are sniffed: a torch zip named .model is still a pickle.
    disguised = tmp_path / "weights.model"
    disguised.write_bytes((tmp_path / "zip.ckpt").read_bytes())
    with pytest.raises(PickleRefusedError):
        open_checkpoint(disguised)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle.dumps file
def test_allow_pickle_still_blocks_code_with_weights_only(tmp_path):
    marker = tmp_path / "marker"
    for path in _malicious_files(tmp_path, marker):
        with pytest.raises(PickleRefusedError, match="weights_only=True"):
            open_checkpoint(path, allow_pickle=True)
        assert not marker.exists()


def test_allow_pickle_refused_on_old_torch(tmp_path, monkeypatch):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, path)
    monkeypatch.setattr(io, "_torch_version", lambda: (2, 5))
    with pytest.raises(PickleRefusedError, match="CVE-2025-32434"):
        open_checkpoint(path, allow_pickle=True)


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_tensor_pickle_loads_when_allowed(tmp_path, zip_format):
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).to(torch.bfloat16), "n": torch.arange(4)}
    flat, wrapped = tmp_path / "flat.pt", tmp_path / "wrapped.ckpt"
    torch.save(tensors, flat, _use_new_zipfile_serialization=zip_format)
    torch.save({"state_dict": tensors, "global_step": 7}, wrapped, _use_new_zipfile_serialization=zip_format)
    for path in (flat, wrapped):
        ckpt = open_checkpoint(path, allow_pickle=True)
        assert set(ckpt.keys()) == set(tensors) and ckpt.metadata == {}
        assert ckpt.shape("w") == (4, 3) and ckpt.dtype("b") == torch.bfloat16
        assert all(same_bits(ckpt.tensor(k), v) for k, v in tensors.items())
        assert same_bits(ckpt.tensors(dtype=torch.float16)["w"], tensors["w"].to(torch.float16))


def test_pickle_with_non_tensor_entries_is_an_error(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"1 entries are not tensors .*'step'"):
        open_checkpoint(path, allow_pickle=True)


# --- corrupt safetensors are rejected fast ----------------------------------------------------------

HUGE = 50_000_000_000  # BF16 elements: a 100 GB tensor

CORRUPT_CASES = {
    "zero_byte": (lambda p: p.write_bytes(b""), r"0 bytes, fewer than the 8-byte header length"),
    "header_len_beyond_file": (
        lambda p: write_raw(p, {"a": f32([1], 0, 4)}, b"\0" * 4, header_len=10_000),
        r"header length 10000 is larger than the file \(\d+ bytes\) allows",
    ),
    "header_len_absurd": (
        lambda p: write_raw(p, b"{}", header_len=2**63),
        r"header length 9223372036854775808 exceeds the format's limit",
    ),
    "garbage_json": (lambda p: write_raw(p, b"{not json at all"), r"not valid UTF-8 JSON"),
    "not_utf8": (lambda p: write_raw(p, b"{\"\xff\xfe\": 1}"), r"not valid UTF-8 JSON"),
    "json_not_object": (lambda p: write_raw(p, b"[1, 2]"), r"header is a JSON list, expected an object"),
    "duplicate_key": (
        lambda p: write_raw(
            p, b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": '
               b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
        r"duplicate key 'a'",
    ),
    "unknown_dtype": (
        lambda p: write_raw(p, {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        r"tensor 'a' has unknown dtype 'F7'",
    ),
    "shape_size_mismatch": (
        lambda p: write_raw(p, {"a": f32([3], 0, 16)}, b"\0" * 16),
        r"tensor 'a': shape \(3,\) of F32 needs 12 bytes, but data_offsets \[0, 16\] hold 16",
    ),
    "negative_dim": (lambda p: write_raw(p, {"a": f32([-1], 0, 4)}, b"\0" * 4), r"invalid shape \[-1\]"),
    "reversed_offsets": (lambda p: write_raw(p, {"a": f32([0], 4, 0)}, b"\0" * 4), r"invalid data_offsets \[4, 0\]"),
    "missing_field": (lambda p: write_raw(p, {"a": {"dtype": "F32"}}), r"tensor 'a' needs 'dtype', 'shape'"),
    "truncated_data": (
        lambda p: write_raw(p, {"a": f32([4], 0, 16), "b": f32([4], 16, 32)}, b"\0" * 20),
        r"tensor 'b' ends at byte 32 of the data area, but the file holds only 20 data bytes",
    ),
    "overlapping_offsets": (
        lambda p: write_raw(p, {"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, b"\0" * 24),
        r"tensor 'b' at \[8, 24\] overlaps tensor 'a' \(which ends at 16\)",
    ),
    "gap_between_tensors": (
        lambda p: write_raw(p, {"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, b"\0" * 20),
        r"4 unused bytes before tensor 'b'",
    ),
    "trailing_bytes": (
        lambda p: write_raw(p, {"a": f32([2], 0, 8)}, b"\0" * 12),
        r"data area has 12 bytes but the tensors cover 8",
    ),
    "bad_metadata": (
        lambda p: write_raw(p, {"__metadata__": {"n": 3}, "a": f32([1], 0, 4)}, b"\0" * 4),
        r"__metadata__ must map strings to strings",
    ),
    "claims_100GB_tensor": (
        lambda p: write_raw(
            p, {"a": {"dtype": "BF16", "shape": [HUGE], "data_offsets": [0, 2 * HUGE]}}, b"\0" * 64),
        r"tensor 'a' ends at byte 100000000000 of the data area, but the file holds only 64 data bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_safetensors_rejected_fast(tmp_path, case):
    make, message = CORRUPT_CASES[case]
    path = tmp_path / f"{case}.safetensors"
    make(path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError, match=message) as caught:
        open_checkpoint(path)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST, f"{case}: took {elapsed:.3f} s"
    assert str(path) in str(caught.value)
    # Nothing of the claimed size was allocated (ru_maxrss is KiB on Linux; allow 64 MiB of noise).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, XldmError)
    # Oracle: the safetensors library rejects the same files (xldm is stricter only on duplicate keys,
    # where JSON parsers silently keep one of the two entries).
    if case != "duplicate_key":
        with pytest.raises(Exception):
            with safe_open(path, "pt"):
                pass


def test_file_truncated_after_opening_is_reported(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, path)
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(CorruptCheckpointError, match="file ended while reading"):
        ckpt.tensors()


# --- strict loading ---------------------------------------------------------------------------------


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 16)
        self.register_buffer("scale", torch.ones(16))


def test_load_strict_assigns_in_place_on_meta():
    with torch.device("meta"):
        module = Small()
    state = {k: torch.randn(v.shape) for k, v in Small().state_dict().items()}
    load_strict(module, state, component="Small")
    loaded = module.state_dict()
    assert all(not v.is_meta for v in loaded.values())
    # assign=True: the module holds the very tensors given (no second copy), values exact.
    assert all(loaded[k].data_ptr() == v.data_ptr() and torch.equal(loaded[k], v) for k, v in state.items())
    assert isinstance(module.conv.weight, nn.Parameter) and module.conv.weight.requires_grad


def test_load_strict_lists_every_problem_and_changes_nothing():
    with torch.device("meta"):
        meta_module = Small()
    real_module = Small()
    before = {k: v.clone() for k, v in real_module.state_dict().items()}
    state = {k: torch.randn(v.shape) for k, v in before.items()}
    del state["norm.bias"], state["scale"]  # 2 missing
    state["extra.weight"] = torch.zeros(1)  # 1 unexpected
    state["conv.weight"] = torch.zeros(8, 9, 3, 3)  # 1 misshaped
    for module in (meta_module, real_module):
        with pytest.raises(StateDictMismatchError) as caught:
            load_strict(module, state, component="UNet")
        error = caught.value
        assert error.component == "UNet"
        assert error.missing == ["scale", "norm.bias"]  # in the module's state_dict order
        assert error.unexpected == ["extra.weight"]
        assert error.mismatched == [("conv.weight", (8, 4, 3, 3), (8, 9, 3, 3))]
        assert str(error) == (
            "UNet: 2 missing keys: scale, norm.bias; 1 unexpected key: extra.weight; "
            "1 shape mismatch: conv.weight expected (8, 4, 3, 3), found (8, 9, 3, 3)"
        )
    # Nothing was assigned: the meta module is still all meta, the real one holds its old values.
    assert all(v.is_meta for v in meta_module.state_dict().values())
    assert all(torch.equal(real_module.state_dict()[k], v) for k, v in before.items())
    # The error keeps its attributes across processes (pickled by multiprocessing / torch.distributed).
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.missing, copy.unexpected, copy.mismatched, str(copy)) == (
        error.missing, error.unexpected, error.mismatched, str(error))


def test_mismatch_message_lists_first_ten_with_counts():
    error = StateDictMismatchError("VAE", missing=[f"k{i}" for i in range(15)])
    assert str(error) == "VAE: 15 missing keys: " + ", ".join(f"k{i}" for i in range(10)) + ", ... (5 more)"
    assert error.unexpected == [] and error.mismatched == []


# --- sharded indexes and paths ----------------------------------------------------------------------


def _sharded(folder: Path, weight_map_override: dict | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    folder.mkdir(parents=True, exist_ok=True)
    part1 = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    part2 = {"b.weight": torch.randn(5).to(torch.float16)}
    save_file(part1, folder / "model-00001-of-00002.safetensors")
    save_file(part2, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in part1}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in part2}
    weight_map |= weight_map_override or {}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index, part1 | part2


def test_sharded_index_opens_all_shards(tmp_path):
    index, tensors = _sharded(tmp_path / "model")
    ckpt = open_checkpoint(index)
    assert set(ckpt.keys()) == set(tensors) and ckpt.metadata == {"format": "pt"}
    assert ckpt.shape("b.weight") == (5,) and ckpt.dtype("b.weight") == torch.float16
    loaded = ckpt.tensors()
    assert all(same_bits(loaded[k], v) for k, v in tensors.items())


def test_sharded_index_must_agree_with_shards(tmp_path):
    index, _ = _sharded(tmp_path / "model", {"a.bias": "model-00002-of-00002.safetensors"})
    with pytest.raises(CorruptCheckpointError, match=r"1 tensors not found in the shard the index names \['a.bias'\]"):
        open_checkpoint(index)


def test_sharded_index_refuses_paths_outside_its_folder(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a.bias": torch.zeros(3)}, outside)
    folder = tmp_path / "model"
    (folder).mkdir()
    (folder / "link.safetensors").symlink_to(outside)
    for name, reason in [
        ("../outside.safetensors", "contains '..'"),
        ("sub/../../outside.safetensors", "contains '..'"),
        (str(outside), "is an absolute path"),
        ("C:\\outside.safetensors", "is an absolute path"),
        ("link.safetensors", "outside"),
    ]:
        index, _ = _sharded(folder, {"a.bias": name})
        with pytest.raises(UnsafePathError, match=reason):
            open_checkpoint(index)


def test_resolve_inside_accepts_plain_names(tmp_path):
    (tmp_path / "sub").mkdir()
    assert resolve_inside(tmp_path, "sub/w.safetensors") == (tmp_path / "sub" / "w.safetensors").resolve()
    for bad in ("", "a\x00b", "..", "/etc/passwd", "\\\\server\\share\\x"):
        with pytest.raises(UnsafePathError):
            resolve_inside(tmp_path, bad)


def test_unknown_extension_is_sniffed(tmp_path):
    path = tmp_path / "weights.bin2"
    safetensors.torch.save_file({"x": torch.arange(6).reshape(2, 3)}, path)
    assert same_bits(open_checkpoint(path).tensor("x"), torch.arange(6).reshape(2, 3))
    # A safetensors header whose length starts with byte 0x80 (the pickle opcode) is still safetensors.
    header = json.dumps({"y": f32([1], 0, 4)}).encode()
    header += b" " * (0x80 - len(header))
    tricky = write_raw(tmp_path / "tricky.weights", header, b"\0" * 4)
    assert tricky.read_bytes()[0] == 0x80
    assert same_bits(open_checkpoint(tricky).tensor("y"), torch.zeros(1))
    # Neither safetensors nor pickle: the safetensors diagnosis is reported.
    junk = tmp_path / "junk.weights"
    junk.write_bytes(b"hello world, not weights")
    with pytest.raises(CorruptCheckpointError, match="header length"):
        open_checkpoint(junk)
    # A pickled tensor dict under an unknown name loads when allowed.
    pt = tmp_path / "plain.model"
    torch.save({"z": torch.ones(2)}, pt)
    assert same_bits(open_checkpoint(pt, allow_pickle=True).tensor("z"), torch.ones(2))


# --- atomic save ------------------------------------------------------------------------------------


def test_atomic_save_replaces_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, path)
    save_file({"a": torch.ones(3), "b": torch.ones(2)}, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert same_bits(open_checkpoint(path).tensor("a"), torch.ones(3))

    # A failure while writing keeps the previous file and removes the half-written temp file.
    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_file({"a": torch.full((3,), 5.0)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert same_bits(open_checkpoint(path).tensor("a"), torch.ones(3))


def test_atomic_write_helper(tmp_path):
    path = tmp_path / "out.bin"
    with io.atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would create it
    with pytest.raises(RuntimeError, match="interrupted"), io.atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_save_handles_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"full": base, "row": base[1], "transposed": base.t(), "same": base}
    path = tmp_path / "shared.safetensors"
    save_file(tensors, path)
    loaded = safetensors.torch.load_file(path)
    assert all(same_bits(loaded[k], v.contiguous()) for k, v in tensors.items())
    with pytest.raises(ValueError, match="meta device"):
        save_file({"m": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="strings to strings"):
        save_file({"a": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"n": 1})
    assert sorted(os.listdir(tmp_path)) == ["shared.safetensors"]


# --- memory (slow) ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_load_peak_rss_within_1_3x_file_size(tmp_path):
    """A ~1.2 GB bf16 file loaded onto meta modules: loader peak RSS <= 1.3 x file size."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    done = subprocess.run(
        [sys.executable, str(script), "--model", "synthetic", "--params", "6e8", "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, check=True, timeout=600,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert math.isclose(result["file_bytes"], 1.2e9, rel_tol=0.05)
    assert result["ratio"] <= 1.3, result
