"""Training data: image-caption folders and WebDataset shards, batched one aspect-ratio bucket at a time.

Sources (`open_source`):

* a **folder**: images (`.png .jpg .jpeg .webp`, searched recursively) with a caption `name.txt` beside
  `name.png`; or a `metadata.jsonl` at the top with one `{"file_name", "text", "aesthetic_score"?}` per line
  (Hugging Face imagefolder layout; `file_name` relative to the folder and never outside it).  Each image's
  size is read once from its header (Pillow's `Image.open` is lazy) and kept in memory, so the bucket of
  every image is known without decoding it.
* **WebDataset shards** (the format sgm trains from): a `.tar` path, a folder of `.tar` files, or brace
  notation `shards/data-{000..009}.tar`.  Members are grouped into samples by key (the name up to the first
  dot of its basename); a sample has an image (`jpg jpeg png webp`) and a caption (`txt`, or `caption`/`text`
  in its `json`, which may also hold `aesthetic_score`).  Shards are streamed member by member with the
  stdlib `tarfile`, so a dataset bigger than the disk cache can train.

Batches (`TrainingBatches`) are dicts of torch tensors, every row from one bucket (see `TrainingBatches`).
Without an aesthetic score in the metadata a sample gets 6.0, the default positive score of SDXL's refiner
(diffusers img2img `aesthetic_score=6.0`, sgm `streamlit_helpers.py`).

Bad files never stop a run; they are skipped and counted (`TrainingBatches.stats["skipped"]`, by reason):
`zero_bytes`, `not_an_image`, `too_many_pixels` (Pillow's decompression-bomb warning or error: the limit
`PIL.Image.MAX_IMAGE_PIXELS` stays on and is never changed here), `truncated` (file or tar member cut short),
`corrupt` (other decode errors), `unsupported_mode` (float images), `missing_caption`, `missing_image`,
`bad_metadata`, `unreadable` (the file cannot be opened), `truncated_shard` (a tar that ends mid-member: the
samples before the damage are used).  A missing caption skips the sample by default; `missing_caption="empty"`
trains it with an empty caption instead.  Images are converted to RGB: EXIF orientation is applied first (so
`original_size` is the upright size), transparency (RGBA, LA, PA, P/L/RGB with a transparent colour) is
composited onto white, CMYK/YCbCr/LAB/P/L/1 are converted by Pillow, and 16-bit greyscale (`I;16*`, `I`) is
scaled by 255/65535 (Pillow's own `convert` would clip it instead).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from xldm.train.buckets import Size, apply_placement, choose_bucket, place_in_bucket

DEFAULT_AESTHETIC_SCORE = 6.0  # SDXL refiner default (diffusers StableDiffusionXLImg2ImgPipeline)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # first present wins
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", *_ALPHA_MODES, *_SIXTEEN_BIT_MODES)


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is its key in `stats["skipped"]`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------- images


def _open_checked(fp: str | io.BytesIO) -> Image.Image:
    """Image.open with Pillow's decompression-bomb warning raised as an error (the limit itself untouched)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_many_pixels", str(e)) from None
    except UnidentifiedImageError as e:
        raise SkipSample("not_an_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipSample(_decode_failure_reason(e), str(e)) from None


def _decode_failure_reason(error: Exception) -> str:
    return "truncated" if isinstance(error, EOFError) or "truncat" in str(error).lower() else "corrupt"


def _orientation_swaps_sides(image: Image.Image) -> bool:
    """Whether the EXIF orientation (read from the header bytes only, never decoding) is a 90-degree turn."""
    raw = image.info.get("exif")
    if not raw:
        return False
    try:
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # the transposed/rotated-by-90 orientations
    except Exception:  # a broken EXIF block: exif_transpose will ignore it too
        return False


def probe_size(path: str) -> Size:
    """(width, height) of an image file as it will be decoded and EXIF-transposed, read from its header."""
    try:
        if os.path.getsize(path) == 0:
            raise SkipSample("zero_bytes")
    except OSError as e:
        raise SkipSample("unreadable", str(e)) from None
    image = _open_checked(path)
    with image:
        if image.mode not in _CONVERTIBLE_MODES:
            raise SkipSample("unsupported_mode", image.mode)
        width, height = image.size
        return (height, width) if _orientation_swaps_sides(image) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white and 16-bit greyscale scaled down; SkipSample otherwise."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:  # 16-bit greyscale: scale 0..65535 -> 0..255 (Pillow's convert would clip)
        array = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode not in _CONVERTIBLE_MODES:
        raise SkipSample("unsupported_mode", mode)
    if mode in _ALPHA_MODES or "transparency" in image.info:  # composite transparency onto white
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source: str | bytes) -> Image.Image:
    """A file path or encoded bytes -> an upright RGB image; raises `SkipSample` with the reason otherwise."""
    if isinstance(source, bytes):
        if not source:
            raise SkipSample("zero_bytes")
        fp: str | io.BytesIO = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise SkipSample("zero_bytes")
        except OSError as e:
            raise SkipSample("unreadable", str(e)) from None
        fp = source
    image = _open_checked(fp)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # Pillow's LOAD_TRUNCATED_IMAGES stays False: a cut-off file raises here
            upright = ImageOps.exif_transpose(image)
        return to_rgb(upright)
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise SkipSample(_decode_failure_reason(e), str(e)) from None
    finally:
        image.close()


# --------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class FolderSample:
    key: str  # path relative to the folder, with extension
    path: str
    caption: str
    aesthetic_score: float
    size: Size  # (width, height) from the header, EXIF-transposed


class FolderSource:
    """A folder of captioned images, indexed once: keys, captions and header sizes, in sorted key order."""

    def __init__(self, root: str | os.PathLike, *, missing_caption: str = "skip") -> None:
        if missing_caption not in ("skip", "empty"):
            raise ValueError(f"missing_caption must be 'skip' or 'empty', got {missing_caption!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder")
        self.skipped: dict[str, set[str]] = {}
        entries = self._from_metadata() if (self.root / "metadata.jsonl").is_file() else self._from_sidecars()
        samples = []
        for key, path, caption, score in sorted(entries):
            if caption is None:
                if missing_caption == "skip":
                    self._skip("missing_caption", key)
                    continue
                caption = ""
            try:
                size = probe_size(path)
            except SkipSample as e:
                self._skip(e.reason, key)
                continue
            samples.append(FolderSample(key, path, caption, score, size))
        self.samples: tuple[FolderSample, ...] = tuple(samples)
        self.fingerprint = hashlib.sha256("\n".join(s.key for s in samples).encode()).hexdigest()[:16]

    def _skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, set()).add(key)

    def _from_sidecars(self) -> list[tuple[str, str, str | None, float]]:
        entries = []
        for path in self.root.rglob("*"):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                caption_path = path.with_suffix(".txt")
                caption = None
                if caption_path.is_file():
                    caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
                key = path.relative_to(self.root).as_posix()
                entries.append((key, str(path), caption, DEFAULT_AESTHETIC_SCORE))
        return entries

    def _from_metadata(self) -> list[tuple[str, str, str | None, float]]:
        entries = []
        root = self.root.resolve()
        lines = (self.root / "metadata.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name = record["file_name"]
                score = float(record.get("aesthetic_score", DEFAULT_AESTHETIC_SCORE))
                if not isinstance(name, str):
                    raise TypeError("file_name is not a string")
            except (ValueError, KeyError, TypeError) as e:
                self._skip("bad_metadata", f"metadata.jsonl:{number} ({e})")
                continue
            path = (root / name).resolve()
            if not path.is_relative_to(root):  # no `..`, absolute paths or symlinks out of the folder
                self._skip("bad_metadata", f"metadata.jsonl:{number} ({name} is outside the folder)")
                continue
            if not path.is_file():
                self._skip("missing_image", name)
                continue
            caption = record.get("text")
            entries.append((name, str(path), caption if isinstance(caption, str) else None, score))
        return entries


def expand_braces(pattern: str) -> list[str]:
    """WebDataset brace notation: `a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept);
    `{x,y}` lists alternatives; several groups expand left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        start, stop = numeric.groups()
        width = len(start) if start.startswith("0") or len(start) == len(stop) else 0
        if int(stop) < int(start):
            raise ValueError(f"empty range in {pattern!r}")
        options = [str(i).zfill(width) for i in range(int(start), int(stop) + 1)]
    else:
        options = body.split(",")
    return [head + option + rest for option in options for rest in expand_braces(tail)]


class ShardSource:
    """WebDataset tar shards, read sequentially; `shards` is the fixed, ordered list of paths."""

    def __init__(self, shards: Sequence[str], *, missing_caption: str = "skip") -> None:
        if missing_caption not in ("skip", "empty"):
            raise ValueError(f"missing_caption must be 'skip' or 'empty', got {missing_caption!r}")
        if not shards:
            raise ValueError("no tar shards given")
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) not found, first: {missing[0]}")
        self.shards = tuple(str(s) for s in shards)
        self.missing_caption = missing_caption
        self.fingerprint = hashlib.sha256("\n".join(os.path.basename(s) for s in self.shards).encode()).hexdigest()[:16]


Source = FolderSource | ShardSource


def open_source(path: str | os.PathLike, *, missing_caption: str = "skip") -> Source:
    """A folder of images, or WebDataset shards (a .tar, a folder holding only .tar files, or brace notation)."""
    text = os.fspath(path)
    if "{" in text:
        return ShardSource(expand_braces(text), missing_caption=missing_caption)
    if text.endswith(".tar"):
        return ShardSource([text], missing_caption=missing_caption)
    folder = Path(text)
    if folder.is_dir():
        tars = sorted(str(p) for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())
        has_images = (folder / "metadata.jsonl").is_file() or any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")
        )
        if tars and not has_images:
            return ShardSource(tars, missing_caption=missing_caption)
        return FolderSource(folder, missing_caption=missing_caption)
    raise ValueError(f"{text}: not a folder, a .tar file or a brace pattern of shards")


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = directories + basename up to its first dot; extension = the rest, lowercased."""
    name = name.removeprefix("./")
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


@dataclass
class _RawSample:
    key: str
    offset: int  # byte offset of the sample's first tar header in its shard
    end: int  # byte offset just past its last member: where the next sample starts
    members: dict[str, bytes]


def iter_tar_samples(path: str, start: int = 0) -> Iterator[_RawSample]:
    """Stream the samples of one tar shard from byte `start` (a header boundary), grouping consecutive members
    by key.  A shard cut short raises `SkipSample("truncated_shard")` after the complete samples before it."""
    with open(path, "rb") as file:
        file.seek(start)
        current: _RawSample | None = None
        try:
            with tarfile.open(fileobj=file, mode="r|") as tar:
                for member in tar:
                    end = start + member.offset_data + (-(-member.size // tarfile.BLOCKSIZE)) * tarfile.BLOCKSIZE
                    if not member.isfile():
                        if current is not None:
                            current.end = end
                        continue
                    key, extension = _split_member_name(member.name)
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                    if current is not None and key != current.key:
                        yield current
                        current = None
                    if current is None:
                        current = _RawSample(key, start + member.offset, end, {})
                    current.members[extension] = data
                    current.end = end
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if current is not None:
                yield current  # its members were read completely
            raise SkipSample("truncated_shard", f"{path}: {e}") from None
        if current is not None:
            yield current


# ------------------------------------------------------------------------------------------------- batching


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


def _crop_rng(center_crop: bool, *parts: object) -> random.Random | None:
    # Each crop has its own generator seeded by where the row sits in the data order, so a crop never depends
    # on which rank loads it or on what was loaded before it (exact resume and rank equivalence for free).
    return None if center_crop else random.Random("xldm-crop:" + ":".join(map(str, parts)))


@dataclass(frozen=True)
class Augment:
    """Draws beyond SDXL's random crop (ours, for data that lacks what the micro-conditioning describes: the
    emoji are square, centred and mostly full-size).  Each is off by default and drawn only when on, so runs
    without them see exactly the crops they always did.  The conditioning still reports what was done.

    * `downscale`: this share of the images is first shrunk to a long side drawn from `downscale_sides` (a
      genuinely low-resolution source, c_size = the shrunken size; SDXL Sec. 2.2, Fig. 3);
    * `zoom_crops`: this share of the crops is taken from the image resized up to `zoom_max` x beyond the cover,
      so the crop can cut into the subject on any side (c_crop; SDXL Sec. 2.2, Fig. 5).
    """

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


def _make_item(
    image: Image.Image, key: str, caption: str, score: float, bucket: Size, rng: random.Random | None,
    augment: Augment = Augment(),
) -> _Item:
    zoom = 1.0
    if rng is not None and augment.downscale > 0.0 and rng.random() < augment.downscale:
        side = rng.randint(*augment.downscale_sides)
        longest = max(image.size)
        if side < longest:
            image = image.resize((max(1, round(image.width * side / longest)),
                                  max(1, round(image.height * side / longest))), Image.Resampling.BOX)
    if rng is not None and augment.zoom_crops > 0.0 and rng.random() < augment.zoom_crops:
        zoom = rng.uniform(1.0, augment.zoom_max)
    width, height = image.size
    placement = place_in_bucket(width, height, bucket, rng, zoom)
    pixels = np.asarray(apply_placement(image, placement), dtype=np.uint8)
    return _Item(key, caption, score, placement.original_size, placement.crop_top_left, placement.target_size, pixels)


def _collate(items: Sequence[_Item]) -> dict:
    pixels = torch.from_numpy(np.stack([item.pixels for item in items])).permute(0, 3, 1, 2).float()
    return {
        "pixels": (pixels / 255.0 * 2.0 - 1.0).contiguous(),  # as xldm.images.image_to_tensor: x / 255 * 2 - 1
        "captions": [item.caption for item in items],
        "original_size": torch.tensor([item.original_size for item in items], dtype=torch.int64),
        "crop_top_left": torch.tensor([item.crop_top_left for item in items], dtype=torch.int64),
        "target_size": torch.tensor([item.target_size for item in items], dtype=torch.int64),
        "aesthetic_score": torch.tensor([item.aesthetic_score for item in items], dtype=torch.float32),
        "keys": [item.key for item in items],
    }


class TrainingBatches:
    """Batches of one bucket each, in an order fixed by (seed, epoch), sharded over ranks, resumable exactly.

    **Folders.**  Epoch e's order comes from `random.Random(f"xldm-batches:{seed}:{e}")`: each bucket's samples
    (in sorted key order) are shuffled, cut into *global* batches of `world_size * batch_size` rows, and the
    list of global batches is shuffled.  Every rank builds the same list; rank r takes rows
    `[r * batch_size, (r + 1) * batch_size)` of each global batch.  So the ranks' batches are disjoint, cover
    the epoch, and concatenated in rank order equal the batches of one process with batch `world_size *
    batch_size` and the same seed, crops included: row k of global batch j is cropped with
    `random.Random(f"xldm-crop:{seed}:{e}:{j}:{k}")`.  A bucket's leftover samples (fewer than a global batch)
    are dropped for the epoch (`drop_last=True`, reshuffled next epoch) or padded by cycling the bucket's
    shuffled samples (`drop_last=False`), so every batch has exactly `batch_size` rows.  A row whose image
    fails to decode is replaced by the next decodable row of the same global batch (then of the bucket),
    a rule that depends only on the files, so all ranks and the single process agree.
    `state_dict` = (epoch, index of the next global batch, bad files seen): resuming gives exactly the batches
    of the uninterrupted run, and the world size may change on resume as long as `world_size * batch_size` does
    not.

    **Shards.**  Epoch e shuffles the shard list with `random.Random(f"xldm-shards:{seed}:{e}")`; rank r
    streams shards `[r::world_size]` of it (at least `world_size` shards are needed), member by member,
    keeping one buffer per bucket and emitting a batch when a buffer holds `batch_size` samples; buffers carry
    over into the next epoch (`drop_last` matters only with `repeat=False`, at the end of the stream).  A buffer
    holds decoded, bucket-sized uint8 images: at most `batch_size - 1` per bucket.  A sample's crop is seeded
    by (seed, epoch, shard index, key).  `state_dict` = (epoch, shard position, byte offset of the next sample,
    and each buffered sample's shard, offset, key and epoch); on resume the buffered samples are re-read from
    their offsets, so the batches after a resume are exactly those of the uninterrupted run (same rank and
    world size required).  Rank r's stream is not the rows of a single process's batch: with shards,
    "W processes x B" matches "1 process x W*B" in distribution only.
    """

    def __init__(
        self,
        source: Source | str | os.PathLike,
        *,
        buckets: Sequence[Size],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        center_crop: bool = False,
        repeat: bool = True,
        fixed_crops: bool = False,
        augment: Augment = Augment(),
    ) -> None:
        if not isinstance(source, (FolderSource, ShardSource)):
            source = open_source(source)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        if not buckets:
            raise ValueError("no buckets given")
        self.source = source
        self.buckets = tuple(tuple(b) for b in buckets)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.center_crop, self.repeat = drop_last, center_crop, repeat
        # fixed_crops: a random crop seeded by (seed, sample key) only, the same every epoch (the latent cache
        # needs one crop per sample, xldm.train.cache); center_crop wins over it.
        self.fixed_crops = fixed_crops
        if center_crop and augment.active:
            raise ValueError(f"{augment} draws at random; it needs random crops (center_crop=False)")
        self.augment = augment
        self.global_batch_size = batch_size * world_size
        self._epoch = 0
        self._skipped: dict[str, set[str]] = {}
        self._images_seen = 0
        self._batches = 0
        if isinstance(source, FolderSource):
            if not source.samples:
                raise ValueError(f"{source.root}: no usable images (skipped: {_counts(source.skipped)})")
            self._bucket_of = [choose_bucket(*s.size, self.buckets) for s in source.samples]
            self._bucket_members: dict[Size, list[int]] = {}  # sample indices per bucket, in key order
            for index, bucket in enumerate(self._bucket_of):
                self._bucket_members.setdefault(bucket, []).append(index)
            self._next_batch = 0
            self._plan_cache: tuple[int, list[tuple[Size, list[int]]]] | None = None
            if not self._plan(0):
                raise ValueError(
                    f"no bucket holds a full global batch of {self.global_batch_size} images; "
                    "use a smaller batch, coarser buckets or drop_last=False"
                )
        else:
            if len(source.shards) < world_size:
                raise ValueError(f"{len(source.shards)} shards cannot be split over {world_size} ranks")
            self._shard_position = 0
            self._offset = 0
            self._buffers: dict[Size, list[_Item]] = {}
            self._pending: list[dict] | None = None  # buffered samples to re-read after load_state_dict

    # ---- common ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int | None:
        """Batches per epoch on each rank (folders); None for streamed shards."""
        return len(self._plan(self._epoch)) if isinstance(self.source, FolderSource) else None

    @property
    def stats(self) -> dict:
        """`images_seen` (rows delivered on this rank), `batches`, and `skipped`: distinct samples by reason,
        both those found while indexing a folder and those that failed to decode."""
        skipped = {reason: set(keys) for reason, keys in getattr(self.source, "skipped", {}).items()}
        for reason, keys in self._skipped.items():
            skipped.setdefault(reason, set()).update(keys)
        counts = _counts(skipped)
        return {"images_seen": self._images_seen, "batches": self._batches, "skipped": counts,
                "skipped_total": sum(counts.values())}

    def _skip(self, reason: str, key: str) -> None:
        self._skipped.setdefault(reason, set()).add(key)

    def __iter__(self) -> Iterator[dict]:
        batches = self._iter_folder() if isinstance(self.source, FolderSource) else self._iter_shards()
        for batch in batches:
            self._images_seen += len(batch["keys"])
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        state = {
            "kind": "folder" if isinstance(self.source, FolderSource) else "shards",
            "fingerprint": self.source.fingerprint,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "drop_last": self.drop_last,
            "center_crop": self.center_crop,
            "buckets": [list(b) for b in self.buckets],
            **self.augment.state(),
            "epoch": self._epoch,
            "images_seen": self._images_seen,
            "batches": self._batches,
            "skipped": {reason: sorted(keys) for reason, keys in self._skipped.items()},
            # Crops need no generator state: each is seeded by its position in the data order (see _crop_rng).
        }
        if isinstance(self.source, FolderSource):
            state["next_batch"] = self._next_batch
        else:
            state.update(rank=self.rank, world_size=self.world_size, shard_position=self._shard_position,
                         offset=self._offset, buffered=self._buffered_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        kind = "folder" if isinstance(self.source, FolderSource) else "shards"
        expected = {"kind": kind, "fingerprint": self.source.fingerprint, "seed": self.seed,
                    "global_batch_size": self.global_batch_size, "drop_last": self.drop_last,
                    "center_crop": self.center_crop, "buckets": [list(b) for b in self.buckets],
                    **self.augment.state()}
        if kind == "shards":
            expected.update(rank=self.rank, world_size=self.world_size)
        mismatched = {name: (state.get(name), value) for name, value in expected.items() if state.get(name) != value}
        if mismatched:
            raise ValueError(f"data state does not match this data setup (saved, now): {mismatched}")
        self._epoch = int(state["epoch"])
        self._images_seen, self._batches = int(state["images_seen"]), int(state["batches"])
        self._skipped = {reason: set(keys) for reason, keys in state["skipped"].items()}
        if kind == "folder":
            self._next_batch = int(state["next_batch"])
        else:
            self._shard_position, self._offset = int(state["shard_position"]), int(state["offset"])
            self._buffers = {}
            self._pending = [dict(entry) for entry in state["buffered"]]

    # ---- folders ---------------------------------------------------------------------------------------
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
        samples = self.source.samples
        bad = self._skipped
        # The row itself, then the rest of its global batch, then the whole bucket in key order.
        candidates = itertools.chain(rows[row:], rows[:row], self._bucket_members[bucket])
        for index in candidates:
            sample = samples[index]
            if any(sample.key in keys for keys in bad.values()):
                continue
            try:
                image = decode_image(sample.path)
            except SkipSample as e:
                self._skip(e.reason, sample.key)
                continue
            rng = (_crop_rng(self.center_crop, self.seed, sample.key) if self.fixed_crops
                   else _crop_rng(self.center_crop, self.seed, epoch, batch_index, row))
            return _make_item(image, sample.key, sample.caption, sample.aesthetic_score, bucket, rng,
                              self.augment)
        raise RuntimeError(
            f"no image of bucket {bucket[0]}x{bucket[1]} can be decoded (skipped: {self.stats['skipped']})"
        )

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

    # ---- shards ----------------------------------------------------------------------------------------
    def _rank_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.source.shards)))
        random.Random(f"xldm-shards:{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size]

    def _shard_item(self, raw: _RawSample, shard: int, epoch: int) -> tuple[Size, _Item]:
        members = raw.members
        image_key = next((name for name in _SHARD_IMAGE_KEYS if name in members), None)
        if image_key is None:
            raise SkipSample("missing_image")
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
                score = float(meta.get("aesthetic_score", DEFAULT_AESTHETIC_SCORE))
            except (ValueError, TypeError, UnicodeDecodeError) as e:
                raise SkipSample("bad_metadata", str(e)) from None
        else:
            score = DEFAULT_AESTHETIC_SCORE
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace").strip()
        else:
            caption = meta.get("caption", meta.get("text"))
            if not isinstance(caption, str):
                if self.source.missing_caption == "skip":
                    raise SkipSample("missing_caption")
                caption = ""
        image = decode_image(members[image_key])
        bucket = choose_bucket(*image.size, self.buckets)
        rng = (_crop_rng(self.center_crop, self.seed, raw.key) if self.fixed_crops
               else _crop_rng(self.center_crop, self.seed, epoch, shard, raw.key))
        item = _make_item(image, raw.key, caption, score, bucket, rng, self.augment)
        item.position = (shard, raw.offset, epoch)
        return bucket, item

    def _buffered_state(self) -> list[dict]:
        if self._pending is not None:
            return [dict(entry) for entry in self._pending]
        entries = []
        for bucket in self._buffers:  # insertion order = the order the buckets were first filled
            for item in self._buffers[bucket]:
                shard, offset, epoch = item.position
                entries.append({"shard": shard, "offset": offset, "key": item.key, "epoch": epoch})
        return entries

    def _restore_buffers(self) -> None:
        """Re-read the samples that sat in the bucket buffers when the state was saved."""
        entries, self._pending = self._pending, None
        self._buffers = {}
        for entry in entries:  # saved bucket by bucket, in the buffers' order
            path = self.source.shards[entry["shard"]]
            samples = iter_tar_samples(path, entry["offset"])
            try:
                raw = next(samples)
                if raw.key != entry["key"]:
                    raise SkipSample("changed", f"found {raw.key!r}")
                bucket, item = self._shard_item(raw, entry["shard"], entry["epoch"])
            except (StopIteration, SkipSample) as e:
                raise ValueError(
                    f"{path} changed since the state was saved: no usable sample {entry['key']!r} at byte "
                    f"{entry['offset']} ({e})"
                ) from None
            finally:
                samples.close()
            self._buffers.setdefault(bucket, []).append(item)

    def _iter_shards(self) -> Iterator[dict]:
        if self._pending is not None:
            self._restore_buffers()
        while True:
            epoch = self._epoch
            order = self._rank_shards(epoch)
            from_start = self._shard_position == 0 and self._offset == 0
            usable = 0
            while self._shard_position < len(order):
                shard = order[self._shard_position]
                samples = iter_tar_samples(self.source.shards[shard], self._offset)
                while True:
                    try:
                        raw = next(samples)
                    except StopIteration:
                        break
                    except SkipSample as e:
                        self._skip(e.reason, os.path.basename(self.source.shards[shard]))
                        break
                    self._offset = raw.end
                    try:
                        bucket, item = self._shard_item(raw, shard, epoch)
                    except SkipSample as e:
                        self._skip(e.reason, f"{os.path.basename(self.source.shards[shard])}:{raw.key}")
                        continue
                    usable += 1
                    buffer = self._buffers.setdefault(bucket, [])
                    buffer.append(item)
                    if len(buffer) == self.batch_size:
                        del self._buffers[bucket]
                        yield _collate(buffer)
                self._shard_position, self._offset = self._shard_position + 1, 0
            if not self.repeat:
                if not self.drop_last:  # pad each partial bucket by cycling its samples
                    while self._buffers:
                        bucket = next(iter(self._buffers))
                        buffer = self._buffers.pop(bucket)
                        yield _collate([buffer[i % len(buffer)] for i in range(self.batch_size)])
                return
            if from_start and usable == 0:
                raise RuntimeError(
                    f"a whole epoch of rank {self.rank}'s shards held no usable sample "
                    f"(skipped: {self.stats['skipped']})"
                )
            self._epoch, self._shard_position, self._offset = epoch + 1, 0, 0


def _counts(skipped: dict[str, set[str]]) -> dict[str, int]:
    return {reason: len(keys) for reason, keys in sorted(skipped.items()) if keys}


__all__ = [
    "Augment", "DEFAULT_AESTHETIC_SCORE", "FolderSource", "IMAGE_EXTENSIONS", "ShardSource", "SkipSample", "Source",
    "TrainingBatches", "decode_image", "expand_braces", "iter_tar_samples", "open_source", "probe_size", "to_rgb",
    "caption_group", "is_heldout",
]


# --- the held-out caption split of the bundled model's data ----------------------------------------------------

HELDOUT_PER_MILLE = 30  # ~3 % of the emoji names never enter any training stage (our choice)


def caption_group(caption: str) -> str:
    """The name a caption is about (its text before the first comma): all styles, skin tones and placements of one
    emoji name are held out together, so a held-out caption's words were never paired with its picture."""
    return caption.split(",", 1)[0].strip().lower()


def is_heldout(caption: str) -> bool:
    digest = hashlib.sha256(("xldm-heldout:" + caption_group(caption)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE

