"""Weight files: open safetensors (single or sharded) and, only when asked, pickles; load strictly; save atomically.

Safety (design/RELIABILITY.md 1-3):
- A safetensors header is parsed and validated here, before any tensor data is touched: every offset,
  dtype and size is checked against the file, so a corrupt or hostile file fails fast with a specific
  `CorruptCheckpointError` and nothing of the size it claims is ever allocated.
- Pickle files (.ckpt/.pt/.pth/.bin) can run code when loaded; they are refused unless the caller
  opts in, and even then only through `torch.load(weights_only=True)` on torch >= 2.6
  (CVE-2025-32434: `weights_only=True` could be bypassed before 2.6).
- Sharded indexes may only name shards inside their own folder.

Memory: tensors are read one at a time with plain `readinto` calls into freshly allocated tensors of
the file's dtype, then cast / moved as asked.  Nothing maps the whole file, so together with modules
built on the meta device and `load_state_dict(assign=True)` a model exists once in memory.

Byte order: safetensors stores little-endian data and tensors are read byte for byte, so this module
assumes a little-endian host; big-endian hosts are out of scope.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from torch import nn

from xldm.errors import (
    CheckpointError,
    CorruptCheckpointError,
    PickleRefusedError,
    StateDictMismatchError,
    UnsafePathError,
)

# The safetensors format's own limit on the JSON header (safetensors crate, MAX_HEADER_SIZE = 100 MB).
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names -> torch dtypes (safetensors format spec; same table as safetensors.torch._TYPES).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),  # torch >= 2.3
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = b"\x80"  # pickle protocol >= 2 opcode; torch's legacy format starts with one too


# --- paths ----------------------------------------------------------------------------------------


def resolve_inside(folder: str | os.PathLike, relative: str) -> Path:
    """`folder / relative`, resolved, refusing anything that would leave `folder`.

    Refused (RELIABILITY 3): empty names, absolute paths (POSIX or Windows, drive letters included),
    any `..` component, NUL bytes, and paths that resolve (through symlinks) outside `folder`.
    """
    if not isinstance(relative, str) or not relative:
        raise UnsafePathError(f"expected a relative file name inside {folder}, got {relative!r}")
    if "\x00" in relative:
        raise UnsafePathError(f"{relative!r} contains a NUL byte; refusing it")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith(("/", "\\")):
        raise UnsafePathError(f"{relative!r} is an absolute path; only names inside {folder} are allowed")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafePathError(f"{relative!r} contains '..'; only names inside {folder} are allowed")
    root = Path(folder).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise UnsafePathError(f"{relative!r} resolves to {target}, outside {root} (symlink?); refusing it")
    return target


# --- the checkpoint object ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: a byte range of a file, or (pickles) an already loaded tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None
    offset: int = 0  # absolute position of the first byte in `file`
    tensor: torch.Tensor | None = None


class Checkpoint:
    """Read-only view of a weight file: names, shapes and dtypes from the header; data read on demand.

    `shape()` and `dtype()` never read tensor data, so detection code can inspect a 7 GB file instantly.
    """

    def __init__(self, path: Path, entries: dict[str, _Entry], metadata: dict[str, str]) -> None:
        self.path = path
        self._entries = entries
        self.metadata: dict[str, str] = metadata  # the safetensors `__metadata__` ({} for pickles)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {self.nbytes / 2**30:.2f} GiB)"

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    @property
    def nbytes(self) -> int:
        """Total size of the tensor data, in the file's dtypes."""
        return sum(e.nbytes for e in self._entries.values())

    def tensor(
        self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Read one tensor, cast to `dtype` (whatever its kind) and moved to `device` when given."""
        entry = self._entry(key)
        with _Reader() as reader:
            return _convert(reader.read(key, entry), dtype, device)

    def tensors(
        self,
        prefix: str = "",
        *,
        strip_prefix: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix`, read one at a time in file order.

        `dtype` casts floating-point tensors only; integer and bool tensors (e.g. `position_ids`) keep
        their dtype.  Keys lose `prefix` when `strip_prefix` is true.
        """
        keys = [k for k in self._entries if k.startswith(prefix)]
        keys.sort(key=lambda k: (str(self._entries[k].file), self._entries[k].offset))  # sequential reads
        out: dict[str, torch.Tensor] = {}
        with _Reader() as reader:
            for key in keys:
                entry = self._entries[key]
                cast = dtype if dtype is not None and entry.dtype.is_floating_point else None
                out[key[len(prefix):] if strip_prefix else key] = _convert(reader.read(key, entry), cast, device)
        return out


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    # The file-dtype buffer is dropped as soon as the converted copy exists (one tensor at a time).
    if dtype is None and device is None:
        return t
    return t.to(device=device, dtype=dtype)


class _Reader:
    """Open file handles for a batch of reads (unbuffered: `readinto` fills the tensor directly)."""

    def __init__(self) -> None:
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def read(self, key: str, entry: _Entry) -> torch.Tensor:
        if entry.tensor is not None:
            return entry.tensor
        assert entry.file is not None
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if entry.nbytes == 0:
            return out
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = self._handles[entry.file] = open(entry.file, "rb", buffering=0)
        # A flat byte view of the new tensor's memory; `readinto` writes straight into it.
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        handle.seek(entry.offset)
        done = 0
        while done < entry.nbytes:  # read() may return less than asked (e.g. > 2 GiB on Linux)
            n = handle.readinto(view[done:])
            if not n:
                raise CorruptCheckpointError(
                    f"{entry.file}: file ended while reading {key!r} (got {done} of {entry.nbytes} bytes "
                    f"at offset {entry.offset}); was it truncated after it was opened?"
                )
            done += n
        return out


# --- safetensors header ---------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise CorruptCheckpointError(f"duplicate key {key!r} in the JSON header")
        result[key] = value
    return result


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate a safetensors header (format: 8-byte little-endian length N, N bytes of JSON,
    then the data area).  Returns the tensor entries and `__metadata__`; reads no tensor data."""
    path = Path(path)

    def corrupt(reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: not a valid safetensors file: {reason}")

    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 8:
            raise corrupt(f"the file has {file_size} bytes, fewer than the 8-byte header length")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES:
            raise corrupt(f"header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > file_size:
            raise corrupt(f"header length {header_len} is larger than the file ({file_size} bytes) allows")
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise corrupt(f"could read only {len(raw)} of the {header_len} header bytes")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except CorruptCheckpointError as e:
        raise corrupt(str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"the header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_size = file_size - data_start
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, _Entry] = {}
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise corrupt(f"tensor {key!r} needs 'dtype', 'shape' and 'data_offsets', got {info!r:.200}")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise corrupt(
                f"tensor {key!r} has unknown dtype {dtype_name!r} (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise corrupt(f"tensor {key!r} has an invalid shape {shape!r:.200}")
        if (
            not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise corrupt(f"tensor {key!r} has invalid data_offsets {offsets!r:.200}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow however large
        if end - begin != expected:
            raise corrupt(
                f"tensor {key!r}: shape {tuple(shape)} of {dtype_name} needs {expected} bytes, "
                f"but data_offsets [{begin}, {end}] hold {end - begin}"
            )
        if end > data_size:
            raise corrupt(
                f"tensor {key!r} ends at byte {end} of the data area, but the file holds only {data_size} "
                f"data bytes (truncated file, or offsets outside the data area)"
            )
        spans.append((begin, end, key))
        entries[key] = _Entry(dtype=dtype, shape=tuple(shape), nbytes=expected, file=path, offset=data_start + begin)

    # The data area must be tiled exactly: no overlap, no gap, nothing after the last tensor.
    spans.sort()
    cursor, previous = 0, None
    for begin, end, key in spans:
        if begin < cursor:
            raise corrupt(f"tensor {key!r} at [{begin}, {end}] overlaps tensor {previous!r} (which ends at {cursor})")
        if begin > cursor:
            raise corrupt(f"{begin - cursor} unused bytes before tensor {key!r} (offsets leave a gap at {cursor})")
        cursor, previous = end, key
    if cursor != data_size:
        raise corrupt(f"the data area has {data_size} bytes but the tensors cover {cursor} (trailing bytes)")
    return entries, metadata


def _open_safetensors(path: Path) -> Checkpoint:
    entries, metadata = read_safetensors_header(path)
    return Checkpoint(path, entries, metadata)


def _open_sharded_index(index_path: Path) -> Checkpoint:
    """A diffusers/transformers sharded index: {"weight_map": {tensor name: shard file name}}."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{index_path}: invalid JSON in shard index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(f"{index_path}: a shard index needs a 'weight_map' of tensor name -> file name")

    folder = index_path.parent
    shard_paths = {name: resolve_inside(folder, name) for name in sorted(set(weight_map.values()))}
    entries: dict[str, _Entry] = {}
    owner: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, shard in shard_paths.items():
        shard_entries, shard_metadata = read_safetensors_header(shard)
        metadata.update(shard_metadata)
        for key, entry in shard_entries.items():
            if key in entries:
                raise CorruptCheckpointError(f"{index_path}: tensor {key!r} is in both {owner[key]} and {name}")
            entries[key], owner[key] = entry, name
    wrong = [k for k, name in weight_map.items() if owner.get(k) != name]
    unlisted = [k for k in entries if k not in weight_map]
    if wrong or unlisted:
        raise CorruptCheckpointError(
            f"{index_path}: the index and its shards disagree: {len(wrong)} tensors not found in the shard "
            f"the index names {wrong[:10]}, {len(unlisted)} tensors in shards but not in the index {unlisted[:10]}"
        )
    return Checkpoint(index_path, entries, metadata)


# --- pickles --------------------------------------------------------------------------------------


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _pickle_refusal(path: Path) -> PickleRefusedError:
    target = path.with_suffix(".safetensors").name
    return PickleRefusedError(
        f"{path}: refusing to load a pickle-based checkpoint: pickle files can run arbitrary code when they "
        f"are loaded. If the file comes from a source you trust, convert it once to safetensors: "
        f"`xldm convert {path.name} {target} --allow-pickle` (or pass allow_pickle=True, which loads it with "
        f"torch.load(weights_only=True) on torch >= 2.6). Prefer downloading a .safetensors version instead."
    )


def _open_pickle(path: Path, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise _pickle_refusal(path)
    version = _torch_version()
    if version < (2, 6):
        raise PickleRefusedError(
            f"{path}: refusing to load a pickle with torch {torch.__version__}: before torch 2.6, "
            f"torch.load(weights_only=True) can still run code (CVE-2025-32434). Upgrade torch to >= 2.6, "
            f"or convert the file to safetensors on a machine that has it."
        )
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    try:
        # mmap only works for torch's zip format; the legacy format is read into memory.
        obj = torch.load(path, weights_only=True, map_location="cpu", mmap=is_zip)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PickleRefusedError(
            f"{path}: torch.load(weights_only=True) refused the file: it holds objects other than tensors "
            f"and plain containers, which could run code ({first_line[:300]})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(f"{path}: cannot read this pickle checkpoint ({e})") from e

    # Lightning / ldm checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"{path}: {len(non_tensors)} entries are not tensors (e.g. {non_tensors[:10]}); expected a flat "
            f"dict of tensors, or one under a top-level 'state_dict'"
        )
    entries = {
        str(k): _Entry(dtype=v.dtype, shape=tuple(v.shape), nbytes=v.numel() * v.element_size(), tensor=v)
        for k, v in obj.items()
    }
    return Checkpoint(path, entries, {})


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        start = f.read(4)
    return start == _ZIP_MAGIC or start[:1] == _PICKLE_PROTO


# --- public API -----------------------------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a weight file for header-only inspection and on-demand reading.

    `.safetensors`: header validated (else `CorruptCheckpointError`).  `*.json`: a sharded safetensors
    index (`weight_map`), whose shards must lie inside its folder (else `UnsafePathError`).
    `.ckpt/.pt/.pth/.bin`: refused with `PickleRefusedError` unless `allow_pickle` (then torch >= 2.6 and
    `weights_only=True` only).  Other names are sniffed: zip/pickle magic -> pickle, else safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weight file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _open_safetensors(path)
    if suffix == ".json":
        return _open_sharded_index(path)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_pickle)
    # Unknown name: a valid safetensors header wins (its length's low byte may well be 0x80, the pickle
    # opcode); otherwise zip/pickle magic means a pickle; otherwise report why it is not safetensors.
    try:
        return _open_safetensors(path)
    except CorruptCheckpointError:
        if _looks_like_pickle(path):
            return _open_pickle(path, allow_pickle)
        raise


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, component: str) -> None:
    """Load `state_dict` into `module`, all or nothing.

    Every key and shape is checked against `module.state_dict()` (which works on the meta device)
    first; any missing, unexpected or misshaped key raises `StateDictMismatchError` listing them all,
    with the module untouched.  Then tensors are assigned in place (`assign=True`), so parameters built
    on the meta device are replaced without a second copy.  Nothing is ignored: callers drop known
    ignorable keys (e.g. `position_ids`) themselves, before calling.
    """
    expected = module.state_dict()
    bad_values = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise TypeError(f"{component}: state dict values must be tensors; not for {bad_values[:10]}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(component, missing, unexpected, mismatched)
    module.load_state_dict(state_dict, strict=True, assign=True)


def save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: temp file in the same folder, fsync, `os.replace`, fsync the folder.

    A crash at any point leaves either the previous file or the complete new one (RELIABILITY 7).
    Tensors are made contiguous; tensors sharing memory with an earlier one are cloned (safetensors
    refuses shared storage), so the file holds independent copies.
    """
    from safetensors.torch import save_file as _safetensors_save

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map strings to strings")
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"save_file needs str -> Tensor, got {type(key).__name__} -> {type(value).__name__}")
        if value.is_meta:
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to save")
        if value.layout != torch.strided:
            raise ValueError(f"tensor {key!r} has layout {value.layout}; only dense tensors can be saved")
        value = value.detach().cpu()
        pointer = value.untyped_storage().data_ptr() if value.numel() else 0
        if pointer and pointer in seen_storages:
            value = value.clone(memory_format=torch.contiguous_format)
        else:
            seen_storages.add(pointer)
            value = value.contiguous()
        prepared[key] = value

    folder = path.parent if str(path.parent) else Path(".")
    # Created exclusively with mode 0o666 less the umask, as a plain open() would (mkstemp forces 0o600).
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = tmp.stat().st_mode & 0o777
        _safetensors_save(prepared, str(tmp), metadata=dict(metadata) if metadata is not None else None)
        os.chmod(tmp, mode)  # the safetensors writer may recreate the file with 0o600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "load_strict",
    "save_file",
    "read_safetensors_header",
    "resolve_inside",
    "SAFETENSORS_DTYPES",
    "MAX_HEADER_BYTES",
]
