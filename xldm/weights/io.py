"""Weight files: open safetensors (single or sharded) and, only when asked, pickles; load strictly; write atomically.

Reading goes through `safetensors.safe_open` with the `pread` backend (safetensors >= 0.8): lazily, each tensor into
a fresh buffer of the file's dtype, cast one at a time, no file mapping, so a model built on the meta device exists
once in memory (benchmarks/load_memory.py).  `mapped=True` maps the file instead (safetensors' default backend, a
private copy-on-write mapping): a tensor read in the file's dtype is then a view of the page cache, read from disk
once however often it is used (low-memory mode on a CPU, `xldm.weights.offload`).  First the header length is bounded (nothing of the size a corrupt
header claims is read) and the JSON header parsed once, to refuse duplicate keys and, when `safe_open` rejects a
file, to say which tensor is wrong and how.  Pickles can run code: refused unless asked for, then read only with
`torch.load(weights_only=True)` on torch >= 2.6 (CVE-2025-32434).  Shards must lie inside their index's folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import reprlib
import secrets
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from xldm.errors import (CheckpointError, CorruptCheckpointError, PickleRefusedError, StateDictMismatchError,
                         UnsafePathError)

MAX_HEADER_BYTES = 100_000_000  # the safetensors crate's MAX_HEADER_SIZE
MAX_DIM = 2**40  # no real tensor has a dimension this long; larger ones (zero-size tensors) overflow when read
MAX_RANK = 32  # dimensions per tensor

_REPR = reprlib.Repr()  # bounded in depth and length: a hostile header's values are quoted safely
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60
_short = _REPR.repr

# safetensors dtype names -> torch dtypes (same table as safetensors.torch._TYPES), those this torch has.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
) if hasattr(torch, attr)}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = b"\x80"  # pickle protocol >= 2 opcode; torch's legacy format starts with one too


def resolve_inside(folder: str | os.PathLike, relative: str) -> Path:
    """`folder / relative`, resolved; refuses empty names, NUL bytes, absolute paths (POSIX or Windows, drive
    letters included), any `..` component and paths that resolve (through symlinks) outside `folder`."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UnsafePathError(f"expected a relative file name inside {folder} (without NUL bytes), got {relative!r}")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith(("/", "\\")):
        raise UnsafePathError(f"{relative!r} is an absolute path; only names inside {folder} are allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(f"{relative!r} contains '..'; only names inside {folder} are allowed")
    root, target = Path(folder).resolve(), (Path(folder) / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{relative!r} resolves to {target}, outside {root} (symlink?); refusing it")
    return target


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: Any  # the open safe_open handle of its file, or (pickles) the loaded tensor itself
    order: tuple[str, int] = ("", 0)  # (file, data offset): `tensors` reads in file order


class Checkpoint:
    """Read-only view of a weight file: names, shapes and dtypes from the header; data read on demand."""

    def __init__(self, path: Path, entries: dict[str, _Entry], metadata: dict[str, str]) -> None:
        self.path, self._entries, self.metadata = path, entries, metadata  # metadata: `__metadata__` ({} for pickles)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    @property
    def nbytes(self) -> int:
        """Total size of the tensor data, in the file's dtypes."""
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self._entries.values())

    def _read(self, key: str, entry: _Entry, dtype: torch.dtype | None, device) -> torch.Tensor:
        """One tensor in the file's dtype, then cast/moved: the file-dtype buffer is dropped once converted."""
        try:
            t = entry.source if isinstance(entry.source, torch.Tensor) else entry.source.get_tensor(key)
        except SafetensorError as e:
            raise CorruptCheckpointError(f"{entry.order[0]}: file ended while reading {key!r}, or it could not be "
                                         f"read ({e}); was it truncated or rewritten after it was opened?") from None
        return t if dtype is None and device is None else t.to(device=device, dtype=dtype)

    def tensor(self, key: str, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Read one tensor, cast to `dtype` (whatever its kind) and moved to `device` when given."""
        return self._read(key, self._entry(key), dtype, device)

    def tensors(self, prefix: str = "", *, strip_prefix: bool = True, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Tensors named `prefix`... (without it if `strip_prefix`), read one at a time in file order; `dtype` casts
        floating-point tensors only (integer/bool ones such as `position_ids` keep theirs)."""
        chosen = sorted(((k, e) for k, e in self._entries.items() if k.startswith(prefix)), key=lambda c: c[1].order)
        return {k[len(prefix):] if strip_prefix else k: self._read(k, e, dtype if e.dtype.is_floating_point else None,
                                                                   device) for k, e in chosen}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    table = dict(pairs)
    if len(table) < len(pairs):
        keys = [k for k, _ in pairs]
        raise CorruptCheckpointError(f"duplicate key {next(k for i, k in enumerate(keys) if k in keys[:i])!r}")
    return table


def _explain(header: dict, data_size: int) -> str | None:
    """The first problem of a header that is a JSON object, with what was expected and what was found; None if
    it is valid.  Types are checked before any value is used, so no header can crash the check itself."""
    metadata = header.get("__metadata__")
    metadata = {} if metadata is None else metadata  # the format allows null
    if not isinstance(metadata, dict):
        return f"__metadata__ must be an object of strings to strings, got a JSON {json_type(metadata)}"
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        return (f"__metadata__ must map strings to strings, but {bad!r:.100} maps to a JSON "
                f"{json_type(metadata[bad])}")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            return f"tensor {key!r:.200} needs 'dtype', 'shape' and 'data_offsets', got {_short(info)}"
        name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(name, str):
            return f"tensor {key!r:.200} has dtype {_short(name)}, expected a string such as 'F32'"
        if name not in SAFETENSORS_DTYPES:
            return f"tensor {key!r:.200} has unknown dtype {name!r:.100} (known: {', '.join(SAFETENSORS_DTYPES)})"
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"tensor {key!r:.200} has an invalid shape {_short(shape)}, expected a list of non-negative integers"
        if len(shape) > MAX_RANK:
            return f"tensor {key!r:.200} has {len(shape)} dimensions, more than the {MAX_RANK} allowed"
        if any(d > MAX_DIM for d in shape):
            return (f"tensor {key!r:.200} has a dimension of {max(shape)}, more than the {MAX_DIM} (2**40) allowed "
                    f"(shape {_short(shape)})")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return (f"tensor {key!r:.200} has invalid data_offsets {_short(offsets)}, expected a list of two "
                    f"integers [begin, end] with 0 <= begin <= end")
        (begin, end), expected = offsets, math.prod(shape) * SAFETENSORS_DTYPES[name].itemsize
        if end - begin != expected:
            return (f"tensor {key!r:.200}: shape {tuple(shape)} of {name} needs {expected} bytes, "
                    f"but data_offsets [{begin}, {end}] hold {end - begin}")
        if end > data_size:
            return (f"tensor {key!r:.200} ends at byte {end} of the data area, but the file holds only {data_size} "
                    f"data bytes (truncated file, or offsets outside the data area)")
        spans.append((begin, end, key))
    cursor, previous = 0, None  # the data area must be tiled exactly: no overlap, no gap, nothing after
    for begin, end, key in sorted(spans):
        if begin < cursor:
            return f"tensor {key!r} at [{begin}, {end}] overlaps tensor {previous!r} (which ends at {cursor})"
        if begin > cursor:
            return f"{begin - cursor} unused bytes before tensor {key!r} (offsets leave a gap at {cursor})"
        cursor, previous = end, key
    if cursor != data_size:
        return f"the data area has {data_size} bytes but the tensors cover {cursor} (trailing bytes)"
    return None


def _open_safetensors(path: Path, mapped: bool = False) -> Checkpoint:
    def corrupt(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: not a valid safetensors file: {reason}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise corrupt(f"the file has {size} bytes, fewer than the 8-byte header length")
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise corrupt(f"header length {length} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
        if 8 + length > size:
            raise corrupt(f"header length {length} is larger than the file ({size} bytes) allows")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except CorruptCheckpointError as e:
        raise corrupt(str(e)) from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
        raise corrupt(f"the header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:
        raise corrupt("the header's JSON is nested too deeply to be a tensor table (expected an object of "
                      "tensor entries)") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is a JSON {type(header).__name__}, expected an object")
    reason = _explain(header, size - 8 - length)  # checked here first: safe_open accepts some bad headers
    if reason is not None:
        raise corrupt(reason)
    try:
        try:
            if mapped:
                raise TypeError
            handle = safe_open(str(path), framework="pt", backend="pread")  # no file mapping (safetensors >= 0.8)
        except TypeError:  # mapped, or older safetensors: memory-mapped only
            handle = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise corrupt(_explain(header, size - 8 - length) or str(e)) from None
    metadata = header.pop("__metadata__", None) or {}
    unknown = sorted({info["dtype"] for info in header.values()} - SAFETENSORS_DTYPES.keys())
    if unknown:
        raise corrupt(f"dtypes {unknown} have no torch dtype here (known: {', '.join(SAFETENSORS_DTYPES)})")
    entries = {key: _Entry(SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), handle,
                           (str(path), info["data_offsets"][0])) for key, info in header.items()}
    return Checkpoint(path, entries, metadata)


def _open_sharded_index(index_path: Path, mapped: bool = False) -> Checkpoint:
    """A diffusers/transformers sharded index: {"weight_map": {tensor name: shard file name}}."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptCheckpointError(f"{index_path}: invalid JSON in shard index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{index_path}: a shard index needs a 'weight_map' of tensor name -> file name")
    entries, owner, metadata = {}, {}, {}
    for name in sorted(set(weight_map.values())):
        shard = _open_safetensors(resolve_inside(index_path.parent, name), mapped)
        metadata.update(shard.metadata)
        for key, entry in shard._entries.items():
            if key in entries:
                raise CorruptCheckpointError(f"{index_path}: tensor {key!r} is in both {owner[key]} and {name}")
            entries[key], owner[key] = entry, name
    wrong = [k for k, name in weight_map.items() if owner.get(k) != name]
    unlisted = [k for k in entries if k not in weight_map]
    if wrong or unlisted:
        raise CorruptCheckpointError(
            f"{index_path}: the index and its shards disagree: {len(wrong)} tensors not found in the shard "
            f"the index names {wrong[:10]}, {len(unlisted)} tensors in shards but not in the index {unlisted[:10]}")
    return Checkpoint(index_path, entries, metadata)


def _torch_version() -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in torch.__version__.split(".")[:2])


def _open_pickle(path: Path, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path}: refusing to load a pickle-based checkpoint: pickle files can run arbitrary code when loaded. "
            f"If its source is one you trust, convert it once: `xldm convert {path.name} "
            f"{path.with_suffix('.safetensors').name} --allow-pickle` (or pass allow_pickle=True: torch.load("
            f"weights_only=True) on torch >= 2.6). Prefer downloading a .safetensors version instead.")
    if _torch_version() < (2, 6):
        raise PickleRefusedError(f"{path}: refusing to load a pickle with torch {torch.__version__}: before 2.6, "
                                 f"torch.load(weights_only=True) can still run code (CVE-2025-32434); upgrade torch")
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    try:  # mmap only works for torch's zip format; the legacy format is read into memory
        obj = torch.load(path, weights_only=True, map_location="cpu", mmap=is_zip)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PickleRefusedError(
            f"{path}: torch.load(weights_only=True) refused the file: it holds objects other than tensors "
            f"and plain containers, which could run code ({first_line[:300]})") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{path}: cannot read this pickle checkpoint ({e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # Lightning / ldm wrapping
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{path}: {len(non_tensors)} entries are not tensors (e.g. {non_tensors[:10]}); expected a flat "
            f"dict of tensors, or one under a top-level 'state_dict'")
    return Checkpoint(path, {str(k): _Entry(v.dtype, tuple(v.shape), v) for k, v in obj.items()}, {})


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False, mapped: bool = False) -> Checkpoint:
    """A weight file, for header-only inspection and on-demand reading: `*.json` is a sharded index, `.ckpt/.pt/
    .pth/.bin` a pickle; other names are safetensors, or pickles (zip/pickle magic) when not valid safetensors (a
    header length's low byte may well be 0x80, the pickle opcode).  `mapped`: safetensors data memory-mapped (see
    the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weight file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _open_sharded_index(path, mapped)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_pickle)
    try:
        return _open_safetensors(path, mapped)
    except CorruptCheckpointError:
        with open(path, "rb") as f:
            start = f.read(4)
        if suffix != ".safetensors" and (start == _ZIP_MAGIC or start[:1] == _PICKLE_PROTO):
            return _open_pickle(path, allow_pickle)
        raise


def tensor_data_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a safetensors file's bytes after its header: A1111's "AutoV3" / addnet hash
    (`modules/hashes.py` `addnet_hash_safetensors`), unchanged by metadata edits; the short form is 12 digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, component: str) -> None:
    """Load `state_dict` into `module`, all or nothing: any missing, unexpected or misshaped key (checked against
    `module.state_dict()`, which works on the meta device) raises `StateDictMismatchError` listing them all, and an
    integer or bool tensor where the module's is floating point a `CheckpointError`, with the module untouched; then tensors are assigned in place (`assign=True`, no second copy).  Callers drop
    ignorable keys (e.g. `position_ids`) themselves."""
    expected = module.state_dict()
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise TypeError(f"{component}: state dict values must be tensors; not for {bad_values[:10]}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(component, missing, unexpected, mismatched)
    # an integer or bool tensor where the module has a floating one (a float64 one is cast by the loaders)
    wrong_kind = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                  if v.is_floating_point() != expected[k].is_floating_point()]
    if wrong_kind:
        raise CheckpointError(f"{component}: {len(wrong_kind)} tensor(s) of the wrong kind, expected floating point "
                              f"like the model's: {', '.join(wrong_kind[:10])}")
    module.load_state_dict(state_dict, strict=True, assign=True)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the block has written it: fsync, `os.replace` onto `path`, fsync
    the folder (a crash leaves the old file or the whole new one); on an exception it is removed.  Its mode is a
    plain `open()`'s (0o666 less the umask, not mkstemp's 0o600), kept even if the writer recreates the file."""
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None, *, on_written: Callable[[Path], None] | None = None) -> None:
    """Write a safetensors file with the library's writer through `atomic_write`.  Tensors are moved to the CPU
    and made contiguous; a tensor sharing memory with an earlier one is cloned (safetensors refuses shared
    storage).  `on_written(temporary path)` runs once the temporary file is complete, before it replaces `path`."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"save_file needs str -> Tensor, got {type(key).__name__} -> {type(value).__name__}")
        if value.is_meta or value.layout != torch.strided:
            raise ValueError(f"tensor {key!r} has no data to save: only dense tensors off the meta device can be "
                             f"saved, it is {value.layout} on {value.device}")
        value = value.detach().cpu()
        pointer = value.untyped_storage().data_ptr() if value.numel() else 0
        shared = pointer and pointer in seen_storages
        seen_storages.add(pointer)
        prepared[key] = value.clone(memory_format=torch.contiguous_format) if shared else value.contiguous()
    with atomic_write(path) as tmp:
        safetensors.torch.save_file(prepared, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        if on_written is not None:
            on_written(tmp)
