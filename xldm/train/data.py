"""Training batches of one aspect-ratio bucket each, from image folders or WebDataset shards (`xldm.train.sources`):
deterministic per (seed, epoch), sharded over ranks, resumable exactly (`TrainingBatches`), bad files skipped and
counted; and the held-out caption split of the bundled model's data (`is_heldout`)."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xldm.buckets import Size, apply_placement, nearest_bucket, place_in_bucket
from xldm.train.sources import (  # noqa: F401  (FolderSource, decode_image, to_rgb, ...: the data API in one place)
    DEFAULT_AESTHETIC_SCORE, IMAGE_EXTENSIONS, FolderSource, ShardSource, SkipSample, Source, _RawSample,
    decode_image, expand_braces, iter_tar_samples, open_source, probe_size, shard_sample, to_rgb,
)


@dataclass
class _Item:
    key: str
    caption: str
    aesthetic_score: float
    original_size: Size  # (h, w)
    crop_top_left: Size  # (top, left)
    target_size: Size  # (h, w)
    pixels: np.ndarray  # uint8 (H, W, 3), bucket-sized
    position: tuple[int, int, int] | None = None  # streams: (shard index, byte offset, epoch read in)
    control: np.ndarray | None = None  # uint8 (H, W, 3): the sample's control image, cropped as `pixels`


def _crop_rng(center_crop: bool, *parts: object) -> random.Random | None:
    # Each crop has its own generator seeded by where the row sits in the data order, so a crop never depends
    # on which rank loads it or on what was loaded before it (exact resume and rank equivalence for free).
    return None if center_crop else random.Random("xldm-crop:" + ":".join(map(str, parts)))


@dataclass(frozen=True)
class Augment:
    """Draws beyond SDXL's random crop (ours, for data lacking what the micro-conditioning describes: the emoji are
    square, centred and mostly full-size).  Each is off by default and drawn only when on, so runs without them see
    exactly the crops they always did; the conditioning still reports what was done.
    * `downscale`: this share of the images is first shrunk to a long side drawn from `downscale_sides` (a genuinely
      low-resolution source, c_size = the shrunken size; SDXL Sec. 2.2, Fig. 3);
    * `zoom_crops`: this share of the crops is taken from the image resized up to `zoom_max` x beyond the cover, so
      the crop can cut into the subject on any side (c_crop; SDXL Sec. 2.2, Fig. 5)."""

    downscale: float = 0.0
    downscale_sides: tuple[int, int] = (8, 24)
    zoom_crops: float = 0.0
    zoom_max: float = 1.5

    def __post_init__(self) -> None:
        low, high = self.downscale_sides
        if not (0.0 <= self.downscale <= 1.0 and 0.0 <= self.zoom_crops <= 1.0 and self.zoom_max >= 1.0
                and 1 <= low <= high):
            raise ValueError(f"need 0 <= downscale, zoom_crops <= 1, zoom_max >= 1 and 1 <= downscale_sides[0] <= "
                             f"downscale_sides[1], got {self}")

    @property
    def active(self) -> bool:
        return self.downscale > 0.0 or self.zoom_crops > 0.0

    def state(self) -> dict:
        # Only a run with augmentation records it, so states saved before it existed still resume.
        return {"augment": [self.downscale, list(self.downscale_sides), self.zoom_crops, self.zoom_max]} \
            if self.active else {}


def _make_item(image: Image.Image, key: str, caption: str, score: float, bucket: Size, rng: random.Random | None,
               augment: Augment = Augment(), control: Image.Image | None = None) -> _Item:
    """`control` (a ControlNet's control image of the same size) goes through exactly what `image` does: the
    same downscale, cover-resize and crop, so the two stay pixel-aligned."""
    zoom = 1.0
    if rng is not None and augment.downscale > 0.0 and rng.random() < augment.downscale:
        side = rng.randint(*augment.downscale_sides)
        longest = max(image.size)
        if side < longest:
            size = (max(1, round(image.width * side / longest)), max(1, round(image.height * side / longest)))
            image = image.resize(size, Image.Resampling.BOX)
            control = None if control is None else control.resize(size, Image.Resampling.BOX)
    if rng is not None and augment.zoom_crops > 0.0 and rng.random() < augment.zoom_crops:
        zoom = rng.uniform(1.0, augment.zoom_max)
    placement = place_in_bucket(*image.size, bucket, rng, zoom)
    pixels = np.asarray(apply_placement(image, placement), dtype=np.uint8)
    return _Item(key, caption, score, placement.original_size, placement.crop_top_left, placement.target_size, pixels,
                 control=None if control is None else np.asarray(apply_placement(control, placement), dtype=np.uint8))


def _collate(items: Sequence[_Item]) -> dict:
    pixels = torch.from_numpy(np.stack([item.pixels for item in items])).permute(0, 3, 1, 2).float()

    def pairs(name: str) -> torch.Tensor:
        return torch.tensor([getattr(item, name) for item in items], dtype=torch.int64)

    return {"pixels": (pixels / 255.0 * 2.0 - 1.0).contiguous(),  # as xldm.images.image_to_tensor: x / 255 * 2 - 1
            "captions": [item.caption for item in items], "original_size": pairs("original_size"),
            "crop_top_left": pairs("crop_top_left"), "target_size": pairs("target_size"),
            "aesthetic_score": torch.tensor([item.aesthetic_score for item in items], dtype=torch.float32),
            "keys": [item.key for item in items],
            **({"control": (torch.from_numpy(np.stack([item.control for item in items])).permute(0, 3, 1, 2).float()
                            / 255.0).contiguous()} if items[0].control is not None else {})}  # [0, 1] as at inference


def control_files(source: FolderSource, folder: str | os.PathLike) -> dict[str, str]:
    """Each sample's control image in `folder`, a folder mirroring the image folder: image `sub/name.jpg` -> control
    `folder/sub/name.EXT` (same relative path and stem, EXT any of IMAGE_EXTENSIONS; kohya sd-scripts'
    `conditioning_data_dir` pairs by stem too), of the image's size.  A missing or misfitting control file is a
    ValueError naming it (checked for every sample before training starts)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"control folder {root} is not a folder")
    if root.resolve().is_relative_to(source.root.resolve()):
        raise ValueError(f"control folder {root} lies inside the image folder {source.root}: its images would be "
                         "trained on as images; keep it beside the image folder")
    found, missing, misfits = {}, [], []
    for sample in source.samples:
        stem = (root / sample.key).with_suffix("")
        path = next((c for c in (stem.with_suffix(e) for e in (*IMAGE_EXTENSIONS,
                                                               *(x.upper() for x in IMAGE_EXTENSIONS))) if c.is_file()),
                    None)
        if path is None:
            missing.append(f"{stem}.png (or .jpg/.jpeg/.webp) for {sample.key}")
            continue
        try:
            size = probe_size(str(path))
        except SkipSample as e:
            misfits.append(f"{path}: {e}")
            continue
        if size != sample.size:
            misfits.append(f"{path} is {size[0]}x{size[1]} but its image {sample.key} is "
                           f"{sample.size[0]}x{sample.size[1]}")
        found[sample.key] = str(path)
    if missing or misfits:
        problems = [f"missing {m}" for m in missing] + misfits
        raise ValueError(f"{len(problems)} of {len(source.samples)} images have no usable control image in {root}; "
                         f"first: " + "; ".join(problems[:3]))
    return found


def _counts(skipped: dict[str, set[str]]) -> dict[str, int]:
    return {reason: len(keys) for reason, keys in sorted(skipped.items()) if keys}


def source_summary(source: Source) -> dict:
    """What indexing found, before any image is decoded: for a folder the images found (image files, or
    metadata.jsonl lines), used and skipped by reason, files ignored (not images), where the captions came from
    and what stood in for the missing ones, kohya repeats; for shards, the shard count (their samples are only
    met as they stream, so their skips are counted while training)."""
    if isinstance(source, ShardSource):
        return {"source": "shards", "shards": len(source.shards), "images_found": None, "images_used": None,
                "captions": {"when_missing": _when_missing(source.missing_caption)}}
    skipped = _counts(source.skipped)
    captions: dict[str, object]
    if source.kohya is not None:
        captions = {"from_files": source.kohya["captions_from_files"],
                    "from_folder_names": source.kohya["captions_from_folder"], "missing": 0}
    else:
        captions = {"from_metadata" if source.layout == "metadata" else "from_files":
                    source.entries_found - source.captions_missing, "missing": source.captions_missing}
    captions["when_missing"] = _when_missing(source.missing_caption) if source.kohya is None else "folder name"
    summary = {"source": f"{source.layout} folder", "root": str(source.root),
               "images_found": len(source.samples) + sum(skipped.values()), "images_used": len(source.samples),
               "skipped": skipped, "skipped_total": sum(skipped.values()), "ignored_files": len(source.ignored),
               "captions": captions}
    if source.kohya is not None:
        summary["kohya"] = {"folders": {name: {"images": images, "repeats": repeats}
                                        for name, (images, repeats) in source.kohya["folders"].items()},
                            "images_per_epoch": source.kohya["images_per_epoch"]}
    return summary


def format_summary(summary: dict, skipped_path: str) -> str:
    """The few lines training prints before step 1 (stderr) about a `summary` (`source_summary`,
    `TrainingBatches.summary`)."""
    def counts(values: dict) -> str:
        return ", ".join(f"{name} {count}" for name, count in values.items())

    if summary.get("images_found") is None:
        lines = [f"dataset: {summary.get('source', 'custom data')}"
                 + (f", {summary['shards']} shards (streamed: skips are counted as they are read, "
                    f"in {skipped_path} at each checkpoint)" if "shards" in summary else "")]
    else:
        skipped = summary.get("skipped_total", 0)
        ignored = summary.get("ignored_files", 0)
        lines = [f"dataset: {summary['images_found']} images found in {summary.get('root', '?')}, "
                 f"{summary['images_used']} used, {skipped} skipped"
                 + (f" ({counts(summary['skipped'])})" if skipped else "")
                 + (f", {ignored} other files ignored" if ignored else "")
                 + (f"; list in {skipped_path}" if skipped or ignored else "")]
    captions = summary.get("captions", {})
    if "missing" in captions:
        found = {k.removeprefix("from_").replace("_", " "): v for k, v in captions.items() if k.startswith("from_")}
        lines.append(f"captions: {counts({f'from {k}': v for k, v in found.items()})}, {captions['missing']} "
                     f"missing ({captions['when_missing']})")
    if "kohya" in summary:
        folders = ", ".join(f"{name}: {folder['images']} x {folder['repeats']}"
                            for name, folder in summary["kohya"]["folders"].items())
        lines.append(f"kohya repeats: {folders} = {summary['kohya']['images_per_epoch']} images per epoch")
    if summary.get("buckets"):
        left = summary["rows_left_out_per_epoch"]
        lines.append(f"buckets (images): {counts(summary['buckets'])}; {summary['batches_per_epoch']} batches of "
                     f"{summary['batch_size']['global']} per epoch"
                     + (f", {left} rows left out of each epoch (a bucket's leftovers, drop_last)" if left else ""))
    return "\n".join(lines)


def _when_missing(missing_caption: str) -> str:
    return "skipped" if missing_caption == "skip" else "empty caption"


def skipped_files(source: Source) -> list[tuple[str, str]]:
    """(path, reason) of the files indexing skipped, and of the ignored ones (reason `unsupported_extension`)."""
    if isinstance(source, ShardSource):
        return []
    found = [(str(source.root / key), reason) for reason, keys in source.skipped.items() for key in keys]
    return found + [(str(source.root / key), "unsupported_extension") for key in source.ignored]


class TrainingBatches:
    """Batches of one bucket each, in an order fixed by (seed, epoch), sharded over ranks, resumable exactly.

    **Folders.**  Epoch e's order comes from `random.Random(f"xldm-batches:{seed}:{e}")`: each bucket's samples (in
    sorted key order; a kohya folder's sample N times for its repeats N) are shuffled, cut into *global* batches of
    `world_size * batch_size` rows, and the list of global batches is shuffled.  Every rank builds the same list and
    takes rows `[r * batch_size, (r + 1) * batch_size)` of each global batch, so the ranks' batches are disjoint, cover
    the epoch, and concatenated in rank order equal the batches of one process with batch `world_size * batch_size` and
    the same seed, crops included: row k of global batch j is cropped with
    `random.Random(f"xldm-crop:{seed}:{e}:{j}:{k}")`.  A bucket's leftover samples (fewer than a global batch) are
    dropped for the epoch (`drop_last=True`) or padded by cycling the bucket's shuffled samples (`drop_last=False`).  A
    row whose image fails to decode is replaced by the next decodable row of its global batch (then of the bucket), a
    rule that depends only on the files, so all ranks and the single process agree.  `state_dict` = (epoch, index of the
    next global batch, bad files seen): resuming gives exactly the batches of the uninterrupted run; the world size may
    change on resume if `world_size * batch_size` does not.

    **Shards.**  Epoch e shuffles the shard list with `random.Random(f"xldm-shards:{seed}:{e}")`; rank r streams
    shards `[r::world_size]` of it (at least `world_size` shards needed), keeping one buffer per bucket (at most
    `batch_size - 1` decoded, bucket-sized images each) and emitting a batch when a buffer is full; buffers carry over
    into the next epoch (`drop_last` matters only with `repeat=False`, at the end of the stream).  A sample's crop is
    seeded by (seed, epoch, shard index, key).  `state_dict` = (epoch, shard position, byte offset of the next
    sample, and each buffered sample's shard, offset, key and epoch); on resume the buffered samples are re-read from
    their offsets, so the batches after a resume are exactly those of the uninterrupted run (same rank and world
    size required).  With shards "W processes x B" matches "1 process x W*B" in distribution only.  `fixed_crops`:
    a random crop seeded by (seed, sample key) only, the same every epoch (the latent cache needs one crop per
    sample, xldm.train.cache); `center_crop` wins over it."""

    def __init__(self, source: Source | str | os.PathLike, *, buckets: Sequence[Size], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, center_crop: bool = False,
                 repeat: bool = True, fixed_crops: bool = False, augment: Augment = Augment()) -> None:
        if not isinstance(source, (FolderSource, ShardSource)):
            source = open_source(source)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if not buckets:
            raise ValueError("no buckets given")
        if center_crop and augment.active:
            raise ValueError(f"{augment} draws at random; it needs random crops (center_crop=False)")
        self.source, self.buckets = source, tuple(tuple(b) for b in buckets)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.center_crop, self.repeat = drop_last, center_crop, repeat
        self.fixed_crops, self.augment = fixed_crops, augment
        self.global_batch_size = batch_size * world_size
        self._folder = isinstance(source, FolderSource)
        self._epoch, self._images_seen, self._batches = 0, 0, 0
        self._skipped: dict[str, set[str]] = {}
        self._controls: dict[str, str] | None = None  # sample key -> control image file (use_control_files)
        if self._folder:
            if not source.samples:
                raise ValueError(f"{source.root}: no usable images (skipped: {_counts(source.skipped)})")
            self._bucket_members: dict[Size, list[int]] = {}  # sample indices per bucket, in key order
            for index, sample in enumerate(source.samples):  # a sample with repeats N (kohya) is N members
                self._bucket_members.setdefault(nearest_bucket(*sample.size, self.buckets), []).extend(
                    [index] * sample.repeats)
            self._next_batch = 0
            self._plan_cache: tuple[int, list[tuple[Size, list[int]]]] | None = None
            if not self._plan(0):
                raise ValueError(f"no bucket holds a full global batch of {self.global_batch_size} images; "
                                 "use a smaller batch, coarser buckets or drop_last=False")
        else:
            if len(source.shards) < world_size:
                raise ValueError(f"{len(source.shards)} shards cannot be split over {world_size} ranks")
            self._shard_position, self._offset = 0, 0
            self._buffers: dict[Size, list[_Item]] = {}
            self._pending: list[dict] | None = None  # buffered samples to re-read after load_state_dict

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per epoch on each rank (folders); None for streamed shards."""
        return len(self._plan(self._epoch)) if self._folder else None

    @property
    def stats(self) -> dict:
        """`images_seen` (rows delivered on this rank), `batches`, `skipped`: distinct samples by reason (found
        while indexing a folder or failed to decode)."""
        skipped = {reason: set(keys) for reason, keys in getattr(self.source, "skipped", {}).items()}
        for reason, keys in self._skipped.items():
            skipped.setdefault(reason, set()).update(keys)
        counts = _counts(skipped)
        kohya = getattr(self.source, "kohya", None)
        return {"images_seen": self._images_seen, "batches": self._batches, "skipped": counts,
                "skipped_total": sum(counts.values()), **({"kohya": kohya} if kohya else {})}

    def _skip(self, reason: str, key: str) -> None:
        self._skipped.setdefault(reason, set()).add(key)

    def summary(self) -> dict:
        """What the run trains on, for RUN/dataset.json (xldm.train.loop): `source_summary` of the source, the
        skips found while reading so far, and for folders the bucket histogram (images per bucket, `WxH`), global
        batches per epoch and the rows left out of each epoch (a bucket's leftovers under `drop_last`)."""
        summary = source_summary(self.source)
        stats = self.stats
        summary.update(skipped=stats["skipped"], skipped_total=stats["skipped_total"])
        if not self._folder:
            return summary
        unusable = set().union(*self._skipped.values()) if self._skipped else set()
        summary["images_used"] = sum(s.key not in unusable for s in self.source.samples)
        histogram: dict[Size, int] = {}
        for bucket, members in self._bucket_members.items():
            histogram[bucket] = len(set(members))  # (a kohya sample is one member per repeat)
        summary["buckets"] = {f"{w}x{h}": histogram[(w, h)] for w, h in sorted(histogram)}
        summary["batch_size"] = {"per_process": self.batch_size, "global": self.global_batch_size}
        summary["batches_per_epoch"] = len(self._plan(self._epoch))
        leftovers = sum(len(members) % self.global_batch_size for members in self._bucket_members.values())
        summary["rows_left_out_per_epoch"] = leftovers if self.drop_last else 0
        return summary

    def skipped_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every file skipped so far, the source's ignored files included, sorted by path."""
        found = skipped_files(self.source)
        named = {os.path.basename(path): path for path in getattr(self.source, "shards", ())}
        for reason, keys in self._skipped.items():
            for key in keys:
                if self._folder:
                    found.append((str(self.source.root / key), reason))
                else:  # shard keys are "name.tar" or "name.tar:sample"
                    name, sep, sample = key.partition(":")
                    found.append((named.get(name, name) + sep + sample, reason))
        return sorted(set(found))

    def use_control_files(self, folder: str | os.PathLike) -> None:
        """Batches carry `control` (B, 3, H, W) in [0, 1]: each image's control file from `folder` (see
        `control_files`), cropped exactly as the image.  Image folders only."""
        if not self._folder:
            raise ValueError("control images read from files need an image folder as --data, not WebDataset shards")
        self._controls = control_files(self.source, folder)

    def __iter__(self) -> Iterator[dict]:
        for batch in self._iter_folder() if self._folder else self._iter_shards():
            self._images_seen += len(batch["keys"])
            self._batches += 1
            yield batch

    def _setup(self) -> dict:
        """What decides the data order: a saved state must match it."""
        setup = {"kind": "folder" if self._folder else "shards", "fingerprint": self.source.fingerprint,
                 "seed": self.seed, "global_batch_size": self.global_batch_size, "drop_last": self.drop_last,
                 "center_crop": self.center_crop, "buckets": [list(b) for b in self.buckets], **self.augment.state()}
        return setup if self._folder else {**setup, "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        # Crops need no generator state: each is seeded by its position in the data order (see _crop_rng).
        state = {**self._setup(), "epoch": self._epoch, "images_seen": self._images_seen, "batches": self._batches,
                 "skipped": {reason: sorted(keys) for reason, keys in self._skipped.items()}}
        if self._folder:
            return {**state, "next_batch": self._next_batch}
        # buffered: bucket by bucket, in insertion order = the order the buckets were first filled
        buffered = ([dict(entry) for entry in self._pending] if self._pending is not None else
                    [{"shard": item.position[0], "offset": item.position[1], "key": item.key, "epoch": item.position[2]}
                     for items in self._buffers.values() for item in items])
        return {**state, "shard_position": self._shard_position, "offset": self._offset, "buffered": buffered}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {name: (state.get(name), value) for name, value in self._setup().items()
                      if state.get(name) != value}
        if mismatched:
            raise ValueError(f"data state does not match this data setup (saved, now): {mismatched}")
        self._epoch = int(state["epoch"])
        self._images_seen, self._batches = int(state["images_seen"]), int(state["batches"])
        self._skipped = {reason: set(keys) for reason, keys in state["skipped"].items()}
        if self._folder:
            self._next_batch = int(state["next_batch"])
        else:
            self._shard_position, self._offset = int(state["shard_position"]), int(state["offset"])
            self._buffers = {}
            self._pending = [dict(entry) for entry in state["buffered"]]

    def _plan(self, epoch: int) -> list[tuple[Size, list[int]]]:
        """The epoch's global batches: (bucket, sample indices), identical on every rank."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = random.Random(f"xldm-batches:{self.seed}:{epoch}")
        size = self.global_batch_size
        plan = []
        for bucket in sorted(self._bucket_members):
            indices = list(self._bucket_members[bucket])
            rng.shuffle(indices)
            full = len(indices) // size * size
            plan += [(bucket, indices[i : i + size]) for i in range(0, full, size)]
            if full < len(indices) and not self.drop_last:  # pad by cycling the bucket's shuffled samples
                rest = indices[full:]
                plan.append((bucket, rest + [indices[i % len(indices)] for i in range(size - len(rest))]))
        rng.shuffle(plan)
        self._plan_cache = (epoch, plan)
        return plan

    def _load_folder_row(self, epoch: int, batch_index: int, row: int, bucket: Size, rows: list[int]) -> _Item:
        # The row itself, then the rest of its global batch, then the whole bucket in key order.
        for index in itertools.chain(rows[row:], rows[:row], self._bucket_members[bucket]):
            sample = self.source.samples[index]
            if any(sample.key in keys for keys in self._skipped.values()):
                continue
            try:
                image = decode_image(sample.path)
            except SkipSample as e:
                self._skip(e.reason, sample.key)
                continue
            control = None
            if self._controls is not None:
                try:
                    control = decode_image(self._controls[sample.key])
                except SkipSample as e:  # a control file that breaks after indexing: the sample is skipped
                    self._skip(f"control_{e.reason}", sample.key)
                    continue
                if control.size != image.size:
                    self._skip("control_size", sample.key)
                    continue
            rng = (_crop_rng(self.center_crop, self.seed, sample.key) if self.fixed_crops
                   else _crop_rng(self.center_crop, self.seed, epoch, batch_index, row))
            return _make_item(image, sample.key, sample.caption, sample.aesthetic_score, bucket, rng, self.augment,
                              control)
        raise RuntimeError(f"no image of bucket {bucket[0]}x{bucket[1]} can be decoded "
                           f"(skipped: {self.stats['skipped']})")

    def _iter_folder(self) -> Iterator[dict]:
        while True:
            epoch = self._epoch
            plan = self._plan(epoch)
            while self._next_batch < len(plan):
                batch_index = self._next_batch
                bucket, rows = plan[batch_index]
                first = self.rank * self.batch_size
                items = [self._load_folder_row(epoch, batch_index, k, bucket, rows)
                         for k in range(first, first + self.batch_size)]
                self._next_batch = batch_index + 1
                yield _collate(items)
            if not self.repeat:
                return
            self._epoch, self._next_batch = epoch + 1, 0

    def _shard_item(self, raw: _RawSample, shard: int, epoch: int) -> tuple[Size, _Item]:
        encoded, caption, score = shard_sample(raw, self.source.missing_caption)
        image = decode_image(encoded)
        bucket = nearest_bucket(*image.size, self.buckets)
        rng = (_crop_rng(self.center_crop, self.seed, raw.key) if self.fixed_crops
               else _crop_rng(self.center_crop, self.seed, epoch, shard, raw.key))
        item = _make_item(image, raw.key, caption, score, bucket, rng, self.augment)
        item.position = (shard, raw.offset, epoch)
        return bucket, item

    def _restore_buffers(self) -> None:
        """Re-read the samples that sat in the bucket buffers when the state was saved."""
        entries, self._pending, self._buffers = self._pending, None, {}
        for entry in entries:  # saved bucket by bucket, in the buffers' order
            path = self.source.shards[entry["shard"]]
            samples = iter_tar_samples(path, entry["offset"])
            try:
                raw = next(samples)
                if raw.key != entry["key"]:
                    raise SkipSample("changed", f"found {raw.key!r}")
                bucket, item = self._shard_item(raw, entry["shard"], entry["epoch"])
            except (StopIteration, SkipSample) as e:
                raise ValueError(f"{path} changed since the state was saved: no usable sample {entry['key']!r} at "
                                 f"byte {entry['offset']} ({e})") from None
            finally:
                samples.close()
            self._buffers.setdefault(bucket, []).append(item)

    def _iter_shards(self) -> Iterator[dict]:
        if self._pending is not None:
            self._restore_buffers()
        while True:
            epoch = self._epoch
            order = list(range(len(self.source.shards)))
            random.Random(f"xldm-shards:{self.seed}:{epoch}").shuffle(order)
            order = order[self.rank :: self.world_size]
            from_start = self._shard_position == 0 and self._offset == 0
            usable = 0
            while self._shard_position < len(order):
                shard = order[self._shard_position]
                name = os.path.basename(self.source.shards[shard])
                samples = iter_tar_samples(self.source.shards[shard], self._offset)
                while True:
                    try:
                        raw = next(samples)
                    except StopIteration:
                        break
                    except SkipSample as e:
                        self._skip(e.reason, name)
                        break
                    self._offset = raw.end
                    try:
                        bucket, item = self._shard_item(raw, shard, epoch)
                    except SkipSample as e:
                        self._skip(e.reason, f"{name}:{raw.key}")
                        continue
                    usable += 1
                    buffer = self._buffers.setdefault(bucket, [])
                    buffer.append(item)
                    if len(buffer) == self.batch_size:
                        del self._buffers[bucket]
                        yield _collate(buffer)
                self._shard_position, self._offset = self._shard_position + 1, 0
            if not self.repeat:
                while not self.drop_last and self._buffers:  # pad each partial bucket by cycling its samples
                    buffer = self._buffers.pop(next(iter(self._buffers)))
                    yield _collate([buffer[i % len(buffer)] for i in range(self.batch_size)])
                return
            if from_start and usable == 0:
                raise RuntimeError(f"a whole epoch of rank {self.rank}'s shards held no usable sample "
                                   f"(skipped: {self.stats['skipped']})")
            self._epoch, self._shard_position, self._offset = epoch + 1, 0, 0


HELDOUT_PER_MILLE = 30  # ~3 % of the emoji names never enter any training stage (our choice)


def caption_group(caption: str) -> str:
    """The name a caption is about (its text before the first comma): all styles, skin tones and placements of one
    emoji name are held out together, so a held-out caption's words were never paired with its picture."""
    return caption.split(",", 1)[0].strip().lower()


def is_heldout(caption: str) -> bool:
    digest = hashlib.sha256(("xldm-heldout:" + caption_group(caption)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE
