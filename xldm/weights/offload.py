"""Networks kept near the device between uses (low-memory mode) instead of being read from their files again.

On a GPU (`DeviceSwap`) each network's tensors stay in host RAM, page-locked where CUDA is available so that the
host-to-device copies run asynchronously (CUDA C++ Programming Guide, "Page-Locked Host Memory"); a use points every
parameter and buffer at a device copy, and the end of the use points them back at the host tensors, copying back
first any tensor that was written on the device (a fused LoRA).  On a CPU (`MappedPages`) tensors of the file's
dtype are views of the memory-mapped file (`xldm.weights.io`, `mapped=True`); after a use their pages are handed
back to the page cache (Linux `madvise(MADV_DONTNEED)` on the private mapping), so the process keeps only what the
next network needs while a later use faults the same pages in from the page cache, not from the disk.  Pages of a
tensor written in place (copy-on-write copies: a fused LoRA) are kept, so no write is lost.

`file_signature` names a source's state (size, modification time, inode of each file) so that a kept network is
dropped and read again when its file changed, and a removed file is a clear error."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch
from torch import nn

MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def file_signature(path: Path) -> tuple:
    """(name, size, mtime_ns, inode) of the file, or of every file in the folder, in name order; FileNotFoundError
    when it is gone."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino) for p in files for s in [p.stat()])


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner module, name, is a parameter) of every parameter and buffer, each owner's once."""
    slots = []
    for owner in module.modules():
        slots += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
        slots += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return slots


def _get(owner: nn.Module, name: str, param: bool) -> torch.Tensor:
    return owner._parameters[name] if param else owner._buffers[name]


def _set(owner: nn.Module, name: str, param: bool, tensor: torch.Tensor) -> None:
    if param:
        owner._parameters[name].data = tensor  # the Parameter object stays (hooks, LoRA patches keep it)
    else:
        owner._buffers[name] = tensor


class DeviceSwap:
    """One network's tensors in host RAM (pinned when `pin`), moved to a device for each use and back after."""

    def __init__(self, module: nn.Module, pin: bool) -> None:
        self.module = module
        self.slots = _slots(module)
        self.moved: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None  # (host, device, version) per slot
        if pin:
            for owner, name, param in self.slots:  # one tensor at a time: at most one extra tensor in memory
                _set(owner, name, param, _get(owner, name, param).pin_memory())

    def to_device(self, device: torch.device) -> None:
        if self.moved is not None:
            return
        moved = []
        for owner, name, param in self.slots:
            host = _get(owner, name, param)
            _set(owner, name, param, host.to(device, non_blocking=host.is_pinned()))
            now = _get(owner, name, param)
            moved.append((host, now.data if param else now, now._version))
        self.moved = moved

    def to_host(self) -> None:
        """Back to the host tensors; a tensor replaced or written during the use is copied back into its host
        tensor first (blocking, so the host copy is complete)."""
        if self.moved is None:
            return
        for (owner, name, param), (host, device_tensor, version) in zip(self.slots, self.moved):
            now = _get(owner, name, param)
            if now.data_ptr() != device_tensor.data_ptr() or now._version != version:
                if now.shape == host.shape:
                    host.copy_(now.detach())
                else:
                    host = now.detach().to("cpu")
            _set(owner, name, param, host)
        self.moved = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _mapped_ranges(inodes: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Address ranges this process maps from files of these (device, inode)s (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0":
                continue
            major, minor = (int(v, 16) for v in fields[3].split(":"))
            if (os.makedev(major, minor), int(fields[4])) in inodes:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc `malloc_trim`), so a network's activations, freed, do not
    stay in the process's resident memory for the next network."""
    if _LIBC is not None:
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            pass


class MappedPages:
    """The tensors of one network (loaded with `mapped=True`) that are views of its files, recorded as loaded;
    `release()` hands their pages back to the page cache.  Without Linux' madvise it does nothing (the pages
    then stay counted in this process, as any mapped file's)."""

    def __init__(self, modules: list[nn.Module], files: list[Path]) -> None:
        self.inodes = {(s.st_dev, s.st_ino) for s in (Path(f).stat() for f in files)}
        self.slots = [slot for m in modules for slot in _slots(m)]
        self.recorded = []
        ranges = _mapped_ranges(self.inodes) if _LIBC is not None else []
        for owner, name, param in self.slots:
            storage = _get(owner, name, param).untyped_storage()
            start, size = storage.data_ptr(), storage.nbytes()
            if size and any(lo <= start and start + size <= hi for lo, hi in ranges):
                self.recorded.append((owner, name, param, start, size, _get(owner, name, param)._version))

    @property
    def nbytes(self) -> int:
        return sum(r[4] for r in self.recorded)

    def release(self) -> int:
        """madvise(MADV_DONTNEED) the whole pages of each recorded tensor that is still in place (so its mapping is
        alive) and not written since it was recorded; returns the bytes released."""
        if _LIBC is None or not self.recorded:
            return 0
        ranges = _mapped_ranges(self.inodes)
        released = 0
        for owner, name, param, start, size, version in self.recorded:
            now = _get(owner, name, param)
            if now.untyped_storage().data_ptr() != start or now._version != version:
                continue  # replaced (its pages went with it) or written in place (copy-on-write pages to keep)
            lo = -(-start // _PAGE) * _PAGE  # whole pages inside the tensor only: a page shared with a
            hi = (start + size) // _PAGE * _PAGE  # neighbour (perhaps written) is kept
            if hi > lo and any(a <= lo and hi <= b for a, b in ranges):
                if _LIBC.madvise(ctypes.c_void_p(lo), hi - lo, MADV_DONTNEED) == 0:
                    released += hi - lo
        return released
