"""The exception types of xldm.

Every error is a `ValueError` (through `XldmError`), so existing `except ValueError` code keeps
working, while callers that care can catch one kind precisely.  Messages say what was expected and
what was found, so that the message alone is enough to fix the problem."""

from __future__ import annotations

from collections.abc import Sequence

# How many offending keys a message lists per category before summarising with a count.
_LISTED_PER_CATEGORY = 10


class XldmError(ValueError):
    """Base class of every error raised by xldm."""


class CheckpointError(XldmError):
    """A weight file cannot be used (base class of the weight-file errors)."""


class CorruptCheckpointError(CheckpointError):
    """A weight file is malformed: bad header, offsets outside the file, truncated data, ..."""


class LoraError(CheckpointError):
    """A LoRA / LyCORIS file that does not fit the model, holds NaN/inf, or is no adapter file."""


class ControlNetError(CheckpointError):
    """A ControlNet that does not fit the model (made for another base), or a control image that cannot be used."""


class EmbeddingError(CheckpointError):
    """A textual-inversion embedding cannot be used: unknown layout, bad values, widths no text encoder has, or a
    name that is not attached."""


class CheckpointLoadError(CheckpointError):
    """A training checkpoint cannot be resumed from (unreadable file, no training state, other format)."""


class PickleRefusedError(CheckpointError):
    """A pickle-based weight file (.ckpt/.pt/.pth/.bin) was refused because loading it could run code."""


class UnsafePathError(XldmError):
    """A path taken from a file or a request would leave its folder (`..`, absolute, symlink out)."""


class NonFiniteError(XldmError):
    """Latents or a decoded image hold NaN or infinite values that a float32 retry cannot fix."""


class UnknownModelError(XldmError):
    """The weights do not match any model family xldm knows (raised by weight detection)."""


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + (",)" if len(shape) == 1 else ")")


def _listing(items: Sequence[str]) -> str:
    hidden = len(items) - _LISTED_PER_CATEGORY
    return ", ".join(items[:_LISTED_PER_CATEGORY]) + (f", ... ({hidden} more)" if hidden > 0 else "")


class StateDictMismatchError(CheckpointError):
    """A state dict does not fit a module (`component`: "UNet", "VAE", ...): keys the module has and the dict lacks
    (`missing`), the other way round (`unexpected`), and (key, expected_shape, found_shape) (`mismatched`)."""

    def __init__(self, component: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = ()) -> None:
        self.component = component
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = [(key, tuple(expected), tuple(found)) for key, expected, found in mismatched]
        super().__init__(self._message())

    def _message(self) -> str:
        described = [f"{key} expected {_shape_text(expected)}, found {_shape_text(found)}"
                     for key, expected, found in self.mismatched]
        parts = [f"{len(items)} {one if len(items) == 1 else many}: {_listing(items)}"
                 for items, one, many in ((self.missing, "missing key", "missing keys"),
                                          (self.unexpected, "unexpected key", "unexpected keys"),
                                          (described, "shape mismatch", "shape mismatches")) if items]
        return f"{self.component}: " + ("; ".join(parts) if parts else "state dict does not match")

    def __reduce__(self):  # keep the attributes when the error crosses a process boundary
        return (type(self), (self.component, self.missing, self.unexpected, self.mismatched))
