"""Training checkpoints: one crash-consistent safetensors file per save, no pickles.

A checkpoint `checkpoints/step_00001000.safetensors` holds every tensor of the training state (trainable weights,
EMA shadows, optimizer moments, RNG states) and, in its header metadata under `xldm.train.state`, a JSON document
with the rest (step, config, data position, optimizer hyper-parameters, Python/numpy RNG scalars).  Loading it
runs no code: `xldm.weights.io.open_checkpoint` + `json.loads` only.  Saves go through `xldm.weights.io.save_file`
(temporary file in the same folder, fsync, `os.replace`, fsync of the folder): a kill at any moment leaves the
earlier checkpoints intact; a leftover temporary file is never mistaken for a checkpoint and is removed by the
next save.  Only the newest `keep` checkpoints are kept."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xldm.errors import CheckpointLoadError
from xldm.weights.io import open_checkpoint, save_file

STATE_KEY = "xldm.train.state"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")

# Called as hook(path_of_temp_file, bytes_written) once the temporary file is complete, before it replaces the
# checkpoint; tests use it to kill a process in the middle of a save.  None in normal runs.
write_hook: Callable[[Path, int], None] | None = None


def trim_metrics(path: str | os.PathLike, last_step: int) -> None:
    """On resume, drop `metrics.jsonl` lines written after the checkpoint resumed from (they will be redone)."""
    path = Path(path)
    if not path.exists():
        return
    lines, kept = path.read_text(errors="replace").splitlines(), []
    for number, line in enumerate(lines, start=1):
        try:
            if line.strip() and json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError) as e:
            if number < len(lines):
                raise CheckpointLoadError(f"{path}:{number}: not a metrics record ({type(e).__name__}: {e})") from None
            warnings.warn(f"{path}:{number}: dropping a partial last line", RuntimeWarning, stacklevel=2)
    path.write_text("".join(line + "\n" for line in kept))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `directory`, oldest first (temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in directory.iterdir() if (match := _NAME.match(path.name)))


def save_checkpoint(directory: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any], *, keep: int) -> Path:
    """Atomically write checkpoint `step` and delete all but the newest `keep` ones; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    path = directory / checkpoint_name(step)
    metadata = {STATE_KEY: json.dumps({"format_version": FORMAT_VERSION, **state}), "format": "pt"}
    hook = write_hook
    save_file(tensors, path, metadata, on_written=None if hook is None else lambda tmp: hook(tmp, tmp.stat().st_size))
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of one checkpoint; any defect is a `CheckpointLoadError` naming the file."""
    try:
        ckpt = open_checkpoint(path)
        tensors, state = ckpt.tensors(), json.loads(ckpt.metadata[STATE_KEY])
    except (OSError, KeyError, ValueError) as e:  # xldm's CheckpointError is a ValueError
        raise CheckpointLoadError(f"{path}: not a loadable training checkpoint ({type(e).__name__}: {e})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointLoadError(f"{path}: checkpoint format {version!r}, expected {FORMAT_VERSION}")
    return tensors, state


def checkpoints_dir(out: str | os.PathLike, resume: bool) -> Path:
    """`out`/checkpoints of a run about to start; a run directory that already holds checkpoints is an error
    unless the run resumes (never train over someone's checkpoints by accident)."""
    directory = Path(out) / "checkpoints"
    if list_checkpoints(directory) and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    return directory


def load_latest(directory: str | os.PathLike, use: Callable[[dict, dict], Any] | None = None
                ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest loadable checkpoint (that `use(tensors, state)` accepts); a corrupt or foreign newer one is skipped
    with a warning.  None if the folder holds none; a `CheckpointLoadError` if none of them loads."""
    found = list_checkpoints(directory)
    for step, path in reversed(found):
        try:
            tensors, state = load_checkpoint(path)
            if use is not None:
                use(tensors, state)
            return path, tensors, state
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # (CheckpointLoadError is a ValueError)
            warnings.warn(f"skipping checkpoint of step {step}: {path.name}: {type(e).__name__}: {e}; falling back "
                          f"to the previous one", RuntimeWarning, stacklevel=2)
    if found:
        raise CheckpointLoadError(f"{directory}: none of the {len(found)} checkpoints can be resumed from (see the "
                                  f"warnings); nothing was changed")
    return None


def load_module_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], head: str) -> None:
    """Load the checkpoint tensors under `head` (e.g. `model.unet.`, `ema.unet.`) into `module`, strictly."""
    module.load_state_dict({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}, strict=True)


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (`prefix.state.<index>.<name>`) and JSON (groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for key, value in tensors.items():
        if key.startswith(head):
            index, name = key[len(head):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def ema_state(ema) -> tuple[dict[str, torch.Tensor], dict | None]:
    """An EMA (or None) as checkpoint tensors `ema.*` (its shadow weights) and JSON metadata (its counters)."""
    if ema is None:
        return {}, None
    state = ema.state_dict()
    return {f"ema.{k}": v for k, v in state.pop("shadow").items()}, state


def load_ema_state(ema, tensors: dict[str, torch.Tensor], meta: dict | None) -> None:
    """Restore what `ema_state` saved; a run that keeps an EMA refuses a checkpoint without one."""
    if ema is None:
        return
    if meta is None:
        raise ValueError("the checkpoint has no EMA, but this run keeps one (ema_decay > 0)")
    ema.load_state_dict({**meta, "shadow": {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG: Python `random`, numpy, torch CPU and each CUDA device."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"python": [version, list(internal), gauss_next],
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy.keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
