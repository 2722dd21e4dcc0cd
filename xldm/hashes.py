"""Model file hashes as A1111 writes them in infotext ("Model hash", "VAE hash").

A1111's "AutoV2" short hash (modules/hashes.py `sha256` and `calculate_sha256`; modules/sd_models.py
`CheckpointInfo.calculate_shorthash`) is the first 10 hex digits of the SHA-256 of the whole file.  Hashing a 7 GB
checkpoint takes a while, so, as A1111's cache.json does, each full hash is kept in a cache file keyed by the file's
absolute path and reused while its size and modification time are unchanged.  The cache lives in
`$XLDM_CACHE_DIR/hashes.json` (default: `$XDG_CACHE_HOME/xldm`, else `~/.cache/xldm`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHORT_HASH_LENGTH = 10  # A1111 shorthash = sha256[0:10]
_CHUNK = 1 << 20  # A1111 calculate_sha256 reads 1 MiB blocks


def cache_dir() -> Path:
    if os.environ.get("XLDM_CACHE_DIR"):
        return Path(os.environ["XLDM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xldm"


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict) -> None:
    """Best effort (a read-only home must not stop a generation): written to a temporary file, then renamed."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temp, path)
    except OSError:
        pass


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_sha256(path: str | os.PathLike) -> str | None:
    """The cached SHA-256 of a file if its size and mtime still match the cache entry, else None."""
    path = Path(path).resolve()
    entry = _read_cache().get(str(path))
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and \
            {k: entry.get(k) for k in ("size", "mtime_ns")} == _stamp(path):
        return entry["sha256"]
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The full SHA-256 (hex) of a file, from the cache when its size and mtime match the cached entry."""
    path = Path(path).resolve()
    if (cached := cached_sha256(path)) is not None:
        return cached
    key, stamp = str(path), _stamp(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    sha = digest.hexdigest()
    cache = _read_cache()  # (re-read: another process may have added entries meanwhile)
    cache[key] = {**stamp, "sha256": sha}
    _write_cache(cache)
    return sha


def short_hash(path: str | os.PathLike) -> str | None:
    """A1111's "Model hash" of a checkpoint file (sha256[:10]); None for a folder (a diffusers model has no one
    file to hash)."""
    return file_sha256(path)[:SHORT_HASH_LENGTH] if Path(path).is_file() else None
