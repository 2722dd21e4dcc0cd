"""Training data sources: image-caption folders and WebDataset shards (`open_source`), and image decoding.

* a **folder**: images (`.png .jpg .jpeg .webp`, searched recursively) with a caption `name.txt` beside `name.png`,
  or a `metadata.jsonl` at the top with one `{"file_name", "text", "aesthetic_score"?}` per line (Hugging Face
  imagefolder layout; `file_name` relative to the folder and never outside it).  Each image's size is read once from
  its header (Pillow's `Image.open` is lazy), so every image's bucket is known without decoding it.
* a **kohya folder** (sd-scripts DreamBooth layout), detected when there is no metadata.jsonl, no image at the top
  and every immediate subfolder is named `N_name` (e.g. `10_mychar/`): each image of a subfolder counts N times per
  epoch (kohya's repeats); its caption is `stem.txt`, else `stem.caption` (`.txt` wins when both exist: sd-scripts'
  current default caption_extension), else the folder's class token `name` (the part after the first underscore).
* **WebDataset shards** (the format sgm trains from): a `.tar` path, a folder of `.tar` files, or brace notation
  `shards/data-{000..009}.tar`.  Members are grouped into samples by key (the name up to the first dot of its
  basename); a sample has an image (`jpg jpeg png webp`) and a caption (`txt`, or `caption`/`text` in its `json`,
  which may also hold `aesthetic_score`).  Shards are streamed member by member with the stdlib `tarfile`.

Without an aesthetic score in the metadata a sample gets 6.0, the default positive score of SDXL's refiner
(diffusers img2img `aesthetic_score=6.0`, sgm `streamlit_helpers.py`).  Bad files never stop a run; they raise
`SkipSample` with a reason, and are skipped and counted by it (`xldm.train.data.TrainingBatches.stats["skipped"]`):
`zero_bytes`, `not_an_image`, `too_many_pixels` (Pillow's decompression-bomb warning or error: the limit
`PIL.Image.MAX_IMAGE_PIXELS` stays on, never changed here), `truncated` (file or tar member cut short), `corrupt`
(other decode errors), `unsupported_mode` (float images), `missing_caption`, `missing_image`, `bad_metadata`,
`unreadable` (cannot be opened), `truncated_shard` (a tar that ends mid-member: the samples before the damage are
used).  Other files of a folder (not an image, not a caption sidecar, not hidden) are listed in
`FolderSource.ignored`, so that the run's skipped.txt names them too (`unsupported_extension`).
A missing caption skips the sample by default; `missing_caption="empty"` trains it with an empty caption.
Images become RGB: EXIF orientation first (so `original_size` is the upright size), transparency (RGBA, LA, PA,
P/L/RGB with a transparent colour) composited onto white, CMYK/YCbCr/LAB/P/L/1 converted by Pillow, 16-bit
greyscale (`I;16*`, `I`) scaled by 255/65535 (Pillow's own `convert` would clip it instead)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from xldm.buckets import Size
from xldm.images import CONVERTIBLE_MODES
from xldm.images import to_rgb as _to_rgb

DEFAULT_AESTHETIC_SCORE = 6.0  # SDXL refiner default (diffusers StableDiffusionXLImg2ImgPipeline)


def _aesthetic_score(meta: dict) -> float:
    """The metadata's `aesthetic_score` (default 6.0); anything but a finite number is a ValueError."""
    score = meta.get("aesthetic_score", DEFAULT_AESTHETIC_SCORE)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ValueError(f"aesthetic_score must be a finite number, got {score!r}")
    return float(score)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSIONS = (".txt", ".caption")  # sidecars of an image: never reported as ignored files
_SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # first present wins


class SkipSample(Exception):
    """A sample that cannot be trained on; `reason` is its key in `stats["skipped"]`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@contextmanager
def _skip_on_decode_errors():
    """Pillow's failures as `SkipSample`, its decompression-bomb warning raised as an error (the limit untouched)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipSample("too_many_pixels", str(e)) from None
    except UnidentifiedImageError as e:
        raise SkipSample("not_an_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        truncated = isinstance(e, EOFError) or "truncat" in str(e).lower()
        raise SkipSample("truncated" if truncated else "corrupt", str(e)) from None


def _check_not_empty(path: str) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SkipSample("unreadable", str(e)) from None
    if size == 0:
        raise SkipSample("zero_bytes")


def _orientation_swaps_sides(image: Image.Image) -> bool:
    """Whether the EXIF orientation (read from the header bytes only, never decoding) is a 90-degree turn."""
    raw = image.info.get("exif")
    if not raw:
        return False
    try:
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1) in (5, 6, 7, 8)  # Orientation: the transposed/rotated-by-90 ones
    except Exception:  # a broken EXIF block: exif_transpose will ignore it too
        return False


def probe_size(path: str) -> Size:
    """(width, height) of an image file as it will be decoded and EXIF-transposed, read from its header."""
    _check_not_empty(path)
    with _skip_on_decode_errors():
        image = Image.open(path)
    with image:
        if image.mode not in CONVERTIBLE_MODES:
            raise SkipSample("unsupported_mode", image.mode)
        width, height = image.size
        return (height, width) if _orientation_swaps_sides(image) else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """`xldm.images.to_rgb` (the one conversion, shared with inference); an unsupported mode is a SkipSample."""
    try:
        return _to_rgb(image)
    except ValueError:
        raise SkipSample("unsupported_mode", image.mode) from None


def decode_image(source: str | bytes) -> Image.Image:
    """A file path or encoded bytes -> an upright RGB image; raises `SkipSample` with the reason otherwise."""
    if isinstance(source, bytes):
        if not source:
            raise SkipSample("zero_bytes")
        fp: str | io.BytesIO = io.BytesIO(source)
    else:
        _check_not_empty(source)
        fp = source
    with _skip_on_decode_errors():
        image = Image.open(fp)
        try:
            image.load()  # Pillow's LOAD_TRUNCATED_IMAGES stays False: a cut-off file raises here
            return to_rgb(ImageOps.exif_transpose(image))
        finally:
            image.close()


def _check_missing_caption(missing_caption: str) -> None:
    if missing_caption not in ("skip", "empty"):
        raise ValueError(f"missing_caption must be 'skip' or 'empty', got {missing_caption!r}")


def _fingerprint(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FolderSample:
    key: str  # path relative to the folder, with extension
    path: str
    caption: str
    aesthetic_score: float
    size: Size  # (width, height) from the header, EXIF-transposed
    repeats: int = 1  # times per epoch (kohya folders: the N of `N_name/`)


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def kohya_folders(root: Path) -> dict[str, tuple[int, str]] | None:
    """subfolder name -> (repeats, class token) when `root` has the kohya layout, else None."""
    if (root / "metadata.jsonl").is_file():
        return None
    children = list(root.iterdir())
    folders = [c for c in children if c.is_dir() and not c.name.startswith(".")]  # (.ipynb_checkpoints, ...)
    if not folders or any(c.suffix.lower() in IMAGE_EXTENSIONS and c.is_file() for c in children):
        return None
    matches = {f.name: KOHYA_FOLDER.match(f.name) for f in folders}
    if not all(matches.values()):
        return None
    return {name: (int(m.group(1)), m.group(2)) for name, m in sorted(matches.items())}


class FolderSource:
    """A folder of captioned images, indexed once: keys, captions and header sizes, in sorted key order."""

    def __init__(self, root: str | os.PathLike, *, missing_caption: str = "skip") -> None:
        _check_missing_caption(missing_caption)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder")
        self.skipped: dict[str, set[str]] = {}
        # files of the folder that are no image and no caption (`notes.md`, `a.gif`): never candidates, but listed in
        # the run's skipped.txt (reason unsupported_extension) so that nothing vanishes unnoticed; hidden files aside
        self.ignored: set[str] = set()
        self.kohya: dict | None = None  # kohya folders: what was found (see _from_kohya)
        folders = kohya_folders(self.root)
        self.layout = "metadata" if (self.root / "metadata.jsonl").is_file() else "kohya" if folders else "sidecars"
        entries = (self._from_metadata() if (self.root / "metadata.jsonl").is_file() else
                   self._from_kohya(folders) if folders else self._from_sidecars())
        self.entries_found = len(entries)  # image files (metadata: lines naming an existing file)
        repeats = {name: n for name, (n, _) in (folders or {}).items()}
        samples = []
        self.missing_caption = missing_caption
        self.captions_missing = 0  # entries without a caption: skipped, or trained with "" (missing_caption)
        for key, path, caption, score in sorted(entries):
            if caption is None:
                self.captions_missing += 1
                if missing_caption == "skip":
                    self._skip("missing_caption", key)
                    continue
                caption = ""
            try:
                samples.append(FolderSample(key, path, caption, score, probe_size(path),
                                            repeats.get(key.split("/", 1)[0], 1)))
            except SkipSample as e:
                self._skip(e.reason, key)
        self.samples: tuple[FolderSample, ...] = tuple(samples)
        if self.kohya is not None:
            for name in self.kohya["folders"]:
                self.kohya["folders"][name] = (sum(s.key.startswith(name + "/") for s in samples), repeats[name])
            self.kohya.update(images=len(samples), images_per_epoch=sum(s.repeats for s in samples))
        self.fingerprint = _fingerprint([s.key for s in samples])

    def _skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, set()).add(key)

    def _from_sidecars(self) -> list[tuple[str, str, str | None, float]]:
        entries = []
        for path in self.root.rglob("*"):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                caption_path = path.with_suffix(".txt")
                caption = caption_path.read_text(encoding="utf-8", errors="replace").strip() \
                    if caption_path.is_file() else None
                entries.append((path.relative_to(self.root).as_posix(), str(path), caption, DEFAULT_AESTHETIC_SCORE))
            else:
                self._note_ignored(path)
        return entries

    def _note_ignored(self, path: Path) -> None:
        relative = path.relative_to(self.root)
        if (path.suffix.lower() not in (*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS) and path.is_file()
                and not any(part.startswith(".") for part in relative.parts)):
            self.ignored.add(relative.as_posix())

    def _from_kohya(self, folders: dict[str, tuple[int, str]]) -> list[tuple[str, str, str | None, float]]:
        """Images of each `N_name/` (searched recursively); `kohya` records folder -> (images, repeats) and
        how many captions came from files and from folder names."""
        entries, from_files = [], 0
        for name, (_, token) in folders.items():
            for path in (self.root / name).rglob("*"):
                if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                    self._note_ignored(path)
                    continue
                sidecar = next((c for c in (path.with_suffix(".txt"), path.with_suffix(".caption")) if c.is_file()),
                               None)
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar else token
                from_files += sidecar is not None
                entries.append((path.relative_to(self.root).as_posix(), str(path), caption, DEFAULT_AESTHETIC_SCORE))
        self.kohya = {"folders": dict.fromkeys(folders), "captions_from_files": from_files,
                      "captions_from_folder": len(entries) - from_files}
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
                score = _aesthetic_score(record)
                if not isinstance(name, str):
                    raise TypeError("file_name is not a string")
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                self._skip("bad_metadata", f"metadata.jsonl:{number} ({_nested(e)})")
                continue
            path = (root / name).resolve()
            if not path.is_relative_to(root):  # no `..`, absolute paths or symlinks out of the folder
                self._skip("bad_metadata", f"metadata.jsonl:{number} ({name} is outside the folder)")
            elif not path.is_file():
                self._skip("missing_image", name)
            else:
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
        _check_missing_caption(missing_caption)
        if not shards:
            raise ValueError("no tar shards given")
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) not found, first: {missing[0]}")
        self.shards = tuple(str(s) for s in shards)
        self.missing_caption = missing_caption
        self.fingerprint = _fingerprint([os.path.basename(s) for s in self.shards])


Source = FolderSource | ShardSource


def open_source(path: str | os.PathLike, *, missing_caption: str = "skip") -> Source:
    """A folder of images, or WebDataset shards (a .tar, a folder holding only .tar files, or brace notation)."""
    text = os.fspath(path)
    if "{" in text:
        return ShardSource(expand_braces(text), missing_caption=missing_caption)
    if text.endswith(".tar"):
        return ShardSource([text], missing_caption=missing_caption)
    folder = Path(text)
    if not folder.is_dir():
        raise ValueError(f"{text}: not a folder, a .tar file or a brace pattern of shards")
    tars = sorted(str(p) for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())
    has_images = (folder / "metadata.jsonl").is_file() or any(
        p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*"))
    if tars and not has_images:
        return ShardSource(tars, missing_caption=missing_caption)
    return FolderSource(folder, missing_caption=missing_caption)


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
                    # WebDataset's rule: key = directories + basename up to its first dot; extension = the rest
                    directory, _, base = member.name.removeprefix("./").rpartition("/")
                    stem, _, extension = base.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    extracted = tar.extractfile(member)
                    data = extracted.read() if extracted is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is cut short")
                    if current is not None and key != current.key:
                        yield current
                        current = None
                    if current is None:
                        current = _RawSample(key, start + member.offset, end, {})
                    current.members[extension.lower()] = data
                    current.end = end
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if current is not None:
                yield current  # its members were read completely
            raise SkipSample("truncated_shard", f"{path}: {e}") from None
        if current is not None:
            yield current


def _nested(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def shard_sample(raw: _RawSample, missing_caption: str) -> tuple[bytes, str, float]:
    """(encoded image, caption, aesthetic score) of a WebDataset sample: the first image member of
    `jpg jpeg png webp`, the caption of `txt` or else of the `json`'s `caption`/`text`."""
    members = raw.members
    image_key = next((name for name in _SHARD_IMAGE_KEYS if name in members), None)
    if image_key is None:
        raise SkipSample("missing_image")
    meta, score = {}, DEFAULT_AESTHETIC_SCORE
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            score = _aesthetic_score(meta)
        except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise SkipSample("bad_metadata", _nested(e)) from None
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = meta.get("caption", meta.get("text"))
        if not isinstance(caption, str):
            if missing_caption == "skip":
                raise SkipSample("missing_caption")
            caption = ""
    return members[image_key], caption, score
