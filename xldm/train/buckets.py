"""Moved to `xldm.buckets` (one bucket module); kept only until xldm/train/loop.py imports from there."""

from xldm.buckets import training_buckets  # noqa: F401
