"""Datasets that xldm builds itself: `emoji` (the default model's training set)."""

from xldm.datasets.emoji import BuildOptions, BuildSummary, EmojiDatasetError, SOURCES, build_emoji_dataset

__all__ = ["BuildOptions", "BuildSummary", "EmojiDatasetError", "SOURCES", "build_emoji_dataset"]
