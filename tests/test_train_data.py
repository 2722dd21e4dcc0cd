"""Training data: folders and WebDataset shards, bucketed batches, determinism, rank sharding, exact resume,
bad files skipped and counted.

Batches are compared exactly (torch.equal on pixels and int64 conditioning: max abs diff 0); pixel values of
converted modes have the tolerance stated next to them (JPEG is lossy).
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.buckets import Placement, apply_placement, nearest_bucket, place_in_bucket, training_buckets
from xldm.train.data import (
    DEFAULT_AESTHETIC_SCORE,
    Augment,
    FolderSource,
    ShardSource,
    SkipSample,
    TrainingBatches,
    decode_image,
    expand_braces,
    iter_tar_samples,
    open_source,
    probe_size,
)
from shapes_dataset import COLOURS, POSITIONS, describe, make_shapes_dataset

BUCKETS = training_buckets(64, 16)  # (128,32) (80,48) (64,64) (48,80) (32,128)
SIZES = [(64, 64), (96, 96), (80, 48), (100, 60), (48, 80), (30, 50), (70, 66)]  # (width, height)


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        width, height = rng.choice(SIZES)
        fmt, ext = rng.choice([("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
        (root / f"img{i:03d}.{ext}").write_bytes(encode(noise_image(width, height, i), fmt))
        (root / f"img{i:03d}.txt").write_text(f"caption {i}\n", encoding="utf-8")
    return root


def take(batches: TrainingBatches, count: int) -> list[dict]:
    iterator = iter(batches)
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        for name in ("pixels", "original_size", "crop_top_left", "target_size", "aesthetic_score"):
            assert torch.equal(x[name], y[name]), name


def concat(parts: list[dict]) -> dict:
    out = {name: torch.cat([p[name] for p in parts]) for name in
           ("pixels", "original_size", "crop_top_left", "target_size", "aesthetic_score")}
    out.update(keys=sum((p["keys"] for p in parts), []), captions=sum((p["captions"] for p in parts), []))
    return out


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG signature + IHDR for a huge image (valid CRC) + IEND: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- folders


def test_batches_are_one_bucket_and_pixels_match_the_conditioning(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 30)
    batches = take(TrainingBatches(str(root), buckets=BUCKETS, batch_size=3, seed=0), 8)
    for batch in batches:
        pixels = batch["pixels"]
        assert pixels.dtype == torch.float32 and pixels.shape[:2] == (3, 3)
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
        for name in ("original_size", "crop_top_left", "target_size"):
            assert batch[name].dtype == torch.int64 and batch[name].shape == (3, 2)
        assert batch["aesthetic_score"].dtype == torch.float32
        assert torch.equal(batch["aesthetic_score"], torch.full((3,), DEFAULT_AESTHETIC_SCORE))
        # One bucket per batch, and target_size (h, w) is the pixels' size.
        assert (batch["target_size"] == torch.tensor(pixels.shape[2:])).all()
        assert (pixels.shape[3], pixels.shape[2]) in BUCKETS
        for row, key in enumerate(batch["keys"]):
            with Image.open(root / key) as image:
                image = image.convert("RGB")
            assert batch["captions"][row] == f"caption {int(key[3:6])}"
            # original_size is the file's size; the pixels are that image resized and cropped at crop_top_left.
            assert tuple(batch["original_size"][row].tolist()) == (image.height, image.width)
            bucket = (pixels.shape[3], pixels.shape[2])
            resized = place_in_bucket(image.width, image.height, bucket, None).resized_size
            placement = Placement(bucket, (image.height, image.width), resized,
                                  tuple(batch["crop_top_left"][row].tolist()))
            expected = torch.from_numpy(np.array(apply_placement(image, placement))).permute(2, 0, 1) / 255.0 * 2 - 1
            assert torch.equal(pixels[row], expected)  # max abs diff 0


def test_order_is_deterministic_per_seed_and_reshuffled_per_epoch(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 40)
    source = open_source(root)
    first = TrainingBatches(source, buckets=BUCKETS, batch_size=2, seed=3)
    per_epoch = first.batches_per_epoch
    run_a = take(first, 2 * per_epoch)
    run_b = take(TrainingBatches(source, buckets=BUCKETS, batch_size=2, seed=3), 2 * per_epoch)
    assert_same_batches(run_a, run_b)
    other_seed = take(TrainingBatches(source, buckets=BUCKETS, batch_size=2, seed=4), per_epoch)
    assert [b["keys"] for b in other_seed] != [b["keys"] for b in run_a[:per_epoch]]
    epoch0, epoch1 = run_a[:per_epoch], run_a[per_epoch:]
    assert [b["keys"] for b in epoch0] != [b["keys"] for b in epoch1]
    # drop_last: no key twice in an epoch, and each bucket leaves out fewer than one batch of its images.
    for epoch in (epoch0, epoch1):
        keys = [k for b in epoch for k in b["keys"]]
        assert len(keys) == len(set(keys))
    epoch0_keys = {k for b in epoch0 for k in b["keys"]}
    members: dict = {}
    for sample in source.samples:
        members.setdefault(nearest_bucket(*sample.size, BUCKETS), []).append(sample.key)
    dropped = [len(keys) - len(epoch0_keys & set(keys)) for keys in members.values()]
    assert all(0 <= n < 2 for n in dropped)  # fewer than one batch (2) per bucket
    # drop_last=False: every image at least once per epoch, every batch still full.
    full = TrainingBatches(source, buckets=BUCKETS, batch_size=3, seed=3, drop_last=False, repeat=False)
    seen = list(full)
    assert all(len(b["keys"]) == 3 for b in seen)
    assert {k for b in seen for k in b["keys"]} == {s.key for s in source.samples}
    assert full.stats["images_seen"] == 3 * len(seen) and full.stats["batches"] == len(seen)


def test_two_ranks_of_batch_b_are_one_process_of_batch_2b(tmp_path: Path) -> None:
    source = open_source(make_folder(tmp_path / "data", 40))
    single = TrainingBatches(source, buckets=BUCKETS, batch_size=4, seed=1)
    count = single.batches_per_epoch + 2  # into the second epoch
    ranks = [TrainingBatches(source, buckets=BUCKETS, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch
    single_batches = take(single, count)
    rank_batches = [take(r, count) for r in ranks]
    assert_same_batches(single_batches, [concat([a, b]) for a, b in zip(*rank_batches)])
    # Disjoint within an epoch, together the single process's epoch.
    epoch = single.batches_per_epoch
    keys0 = {k for b in rank_batches[0][:epoch] for k in b["keys"]}
    keys1 = {k for b in rank_batches[1][:epoch] for k in b["keys"]}
    assert not keys0 & keys1
    assert keys0 | keys1 == {k for b in single_batches[:epoch] for k in b["keys"]}


def test_exact_resume_mid_epoch_and_across_epochs(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 30)
    straight = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=7)
    total = straight.batches_per_epoch + 4
    expected = take(straight, total)
    for stop in (3, straight.batches_per_epoch - 1, straight.batches_per_epoch + 1):
        first = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=7)
        assert_same_batches(take(first, stop), expected[:stop])
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
        resumed = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=7)  # a fresh process
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, total - stop), expected[stop:])
        assert resumed.stats["images_seen"] == 2 * total
    # A single-process state resumes on two ranks with the same global batch (rows split between them).
    first = TrainingBatches(str(root), buckets=BUCKETS, batch_size=4, seed=7)
    single = take(first, 5)
    state = first.state_dict()
    parts = []
    for rank in (0, 1):
        resumed = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=7, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        parts.append(take(resumed, 3))
    continued = take(first, 3)
    assert_same_batches(continued, [concat([a, b]) for a, b in zip(*parts)])
    assert len(single) == 5
    wrong = TrainingBatches(str(root), buckets=BUCKETS, batch_size=4, seed=8)
    with pytest.raises(ValueError, match="seed"):
        wrong.load_state_dict(state)


def test_metadata_jsonl_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(6):
        (root / "images" / f"{i}.png").write_bytes(encode(noise_image(64, 64, i), "PNG"))
        record = {"file_name": f"images/{i}.png", "text": f"text {i}"}
        if i % 2 == 0:
            record["aesthetic_score"] = 4.5 + i
        records.append(json.dumps(record))
    (tmp_path / "outside.png").write_bytes(encode(noise_image(64, 64, 99), "PNG"))
    records += [json.dumps({"file_name": "../outside.png", "text": "escapes"}),
                json.dumps({"file_name": "images/missing.png", "text": "gone"}),
                "{not json", json.dumps({"text": "no file name"})]
    (root / "metadata.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    source = open_source(root)
    assert isinstance(source, FolderSource)
    assert [s.key for s in source.samples] == [f"images/{i}.png" for i in range(6)]
    batches = TrainingBatches(source, buckets=BUCKETS, batch_size=6, seed=0, repeat=False)
    (batch,) = list(batches)
    for key, caption, score in zip(batch["keys"], batch["captions"], batch["aesthetic_score"].tolist()):
        i = int(key.split("/")[1][0])
        assert caption == f"text {i}"
        assert score == (4.5 + i if i % 2 == 0 else 6.0)  # 6.0 = SDXL refiner default when none is given
    assert batches.stats["skipped"] == {"bad_metadata": 3, "missing_image": 1}


def test_missing_captions_skip_or_train_empty(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 6)
    (root / "img002.txt").unlink()
    skipping = TrainingBatches(str(root), buckets=BUCKETS, batch_size=1, seed=0, repeat=False)
    images = {p.name for p in root.iterdir() if p.suffix != ".txt"}
    assert {k for b in skipping for k in b["keys"]} == {name for name in images if not name.startswith("img002")}
    assert skipping.stats["skipped"] == {"missing_caption": 1}
    empty = TrainingBatches(open_source(root, missing_caption="empty"), buckets=BUCKETS, batch_size=1, seed=0,
                            repeat=False)
    captions = {k: c for b in empty for k, c in zip(b["keys"], b["captions"])}
    assert len(captions) == 6 and [c for k, c in captions.items() if k.startswith("img002")] == [""]
    assert empty.stats["skipped_total"] == 0


# ------------------------------------------------------------------------------------------------ bad files


def exif_rotated_jpeg() -> bytes:
    """Stored 48x32 with a red block at the stored top left; EXIF orientation 6 = display rotated 90 deg CW."""
    image = Image.new("RGB", (48, 32), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def test_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    # CMYK (JPEG, lossy: tolerance 8 levels): pure cyan -> (0, 255, 255), no ink -> white.
    cyan = np.asarray(decode_image(encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)))
    assert np.abs(cyan.astype(int) - [0, 255, 255]).max() <= 8
    # 16-bit greyscale PNG: scaled by 255/65535, not clipped (exact).
    grey16 = Image.fromarray(np.array([[0, 65535, 32896, 257, 1000]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    assert np.asarray(decode_image(encode(grey16, "PNG")))[0, :, 0].tolist() == [0, 255, 128, 1, 4]
    # LA: transparency composited onto white (tolerance 1 level): alpha 0 -> white, 255 -> the grey, 128 -> mix.
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [0, 128]]], dtype=np.uint8), "LA")
    assert np.abs(np.asarray(decode_image(encode(la, "PNG")))[0, :, 0].astype(int) - [255, 0, 127]).max() <= 1
    # P with a transparent palette index -> white; the opaque index keeps its colour (exact).
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    rgb = np.asarray(decode_image(encode(palette, "PNG", transparency=0)))
    assert rgb[0].tolist() == [[255, 255, 255], [10, 200, 30]]
    # EXIF orientation applied before anything else: upright 32x48, the red block now at the top right.
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated_jpeg())
    assert probe_size(str(path)) == (32, 48)  # from the header, without decoding
    upright = np.asarray(decode_image(str(path))).astype(int)
    assert upright.shape == (48, 32, 3)
    assert np.abs(upright[2, 29] - [255, 0, 0]).max() <= 8 and np.abs(upright[2, 2] - [255, 255, 255]).max() <= 8
    # Float images have no faithful 8-bit meaning: skipped as unsupported.
    with pytest.raises(SkipSample) as error:
        decode_image(encode(Image.new("F", (4, 4), 0.5), "TIFF"))
    assert error.value.reason == "unsupported_mode"


def test_bad_files_are_skipped_and_counted_and_the_run_finishes(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    root = make_folder(tmp_path / "data", 12)  # 12 good images
    jpeg = encode(noise_image(64, 64, 1), "JPEG")
    png = encode(noise_image(64, 64, 2), "PNG")
    bad = {
        "cut.jpg": jpeg[: len(jpeg) // 2],  # header intact: found at decode time
        "cut.png": png[: len(png) // 2],
        "empty.png": b"",
        "notes.jpg": b"this is not an image\n" * 10,
        "bomb.png": png_claiming_size(100_000, 100_000),  # 10^10 px > 2 x Pillow's default limit
        "cmyk.jpg": encode(noise_image(64, 64, 3, "CMYK"), "JPEG"),
        "grey16.png": encode(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)), "PNG"),
        "alpha.png": encode(noise_image(64, 64, 4, "LA"), "PNG"),
        "palette.png": encode(noise_image(64, 64, 5, "P"), "PNG", transparency=0),
        "rotated.jpg": exif_rotated_jpeg(),
    }
    for name, data in bad.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(name, encoding="utf-8")
    batches = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=0, drop_last=False, repeat=False)
    seen = list(batches)
    keys = {k for b in seen for k in b["keys"]}
    assert all(len(b["keys"]) == 2 for b in seen)  # failed rows were replaced: batches stay full
    assert keys == {p.name for p in root.iterdir() if p.suffix != ".txt"} - {"cut.jpg", "cut.png", "empty.png",
                                                                               "notes.jpg", "bomb.png"}
    assert batches.stats["skipped"] == {"not_an_image": 1, "too_many_pixels": 1, "truncated": 2, "zero_bytes": 1}
    assert batches.stats["skipped_total"] == 5
    rotated = next(b for b in seen if "rotated.jpg" in b["keys"])
    row = rotated["keys"].index("rotated.jpg")
    assert rotated["original_size"][row].tolist() == [48, 32]  # (h, w) after the EXIF transpose
    # The pixel limit is still on, and no warning filter was left changed.
    assert Image.MAX_IMAGE_PIXELS == limit and limit is not None and limit > 0
    assert warnings.filters == filters


def test_decompression_bomb_warning_and_error_both_skip_with_the_limit_on(tmp_path: Path, monkeypatch) -> None:
    root = make_folder(tmp_path / "data", 4)  # 30..100 px sides, at most 9,216 px each
    (root / "big_warn.png").write_bytes(encode(noise_image(110, 110, 9), "PNG"))  # 12,100 px: over the limit
    (root / "big_error.png").write_bytes(encode(noise_image(150, 150, 9), "PNG"))  # 22,500 px: over twice it
    for name in ("big_warn", "big_error"):
        (root / f"{name}.txt").write_text(name, encoding="utf-8")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak a DecompressionBombWarning
        batches = TrainingBatches(str(root), buckets=BUCKETS, batch_size=1, seed=0, repeat=False)
        keys = {k for b in batches for k in b["keys"]}
    assert keys.isdisjoint({"big_warn.png", "big_error.png"}) and len(keys) == 4
    assert batches.stats["skipped"] == {"too_many_pixels": 2}
    assert Image.MAX_IMAGE_PIXELS == 10_000  # untouched by the data code
    # Decoding from bytes (the shard path) applies the same limit.
    with pytest.raises(SkipSample) as error:
        decode_image((root / "big_warn.png").read_bytes())
    assert error.value.reason == "too_many_pixels"


# --------------------------------------------------------------------------------------------------- shards


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, shards: int = 4, per_shard: int = 6) -> dict[str, dict]:
    """Shards data-000.tar ...; returns {key: expected caption/score} for the good samples."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    good = {}
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s}/{i:04d}"
            width, height = rng.choice(SIZES)
            image_ext, fmt = rng.choice([("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
            members = {image_ext: encode(noise_image(width, height, 100 * s + i), fmt)}
            if i % 3 == 0:  # caption and score from the json
                members["json"] = json.dumps({"caption": f"json {key}", "aesthetic_score": 5.25}).encode()
                good[key] = {"caption": f"json {key}", "score": 5.25}
            else:
                members["txt"] = f"txt {key}".encode()
                good[key] = {"caption": f"txt {key}", "score": DEFAULT_AESTHETIC_SCORE}
            samples.append((key, members))
        write_tar(root / f"data-{s:03d}.tar", samples)
    return good


def test_brace_notation_and_shard_discovery(tmp_path: Path) -> None:
    assert expand_braces("a-{000..003}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar", "a-003.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    make_shards(tmp_path / "shards")
    braces = open_source(str(tmp_path / "shards" / "data-{000..003}.tar"))
    folder = open_source(tmp_path / "shards")
    single = open_source(str(tmp_path / "shards" / "data-002.tar"))
    assert isinstance(braces, ShardSource) and braces.shards == folder.shards
    assert [Path(s).name for s in braces.shards] == [f"data-{i:03d}.tar" for i in range(4)]
    assert [Path(s).name for s in single.shards] == ["data-002.tar"]
    with pytest.raises(ValueError, match="not found"):
        open_source(str(tmp_path / "shards" / "data-{000..004}.tar"))


def test_shards_stream_every_good_sample_once_and_split_over_ranks(tmp_path: Path) -> None:
    good = make_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "data-{000..003}.tar")
    one = TrainingBatches(pattern, buckets=BUCKETS, batch_size=2, seed=0, repeat=False, drop_last=False)
    batches = list(one)
    keys = [k for b in batches for k in b["keys"]]
    assert set(keys) == set(good)
    for batch in batches:
        assert len(set(tuple(t) for t in batch["target_size"].tolist())) == 1
        assert (batch["target_size"][0] == torch.tensor(batch["pixels"].shape[2:])).all()
        for key, caption, score in zip(batch["keys"], batch["captions"], batch["aesthetic_score"].tolist()):
            assert caption == good[key]["caption"] and score == good[key]["score"]
    # Two ranks: disjoint shards, together every sample.
    rank_keys = []
    for rank in (0, 1):
        part = TrainingBatches(pattern, buckets=BUCKETS, batch_size=2, seed=0, rank=rank, world_size=2,
                               repeat=False, drop_last=False)
        rank_keys.append({k for b in part for k in b["keys"]})
        assert len({k.split("/")[0] for k in rank_keys[-1]}) == 2  # two of the four shards each
    assert not rank_keys[0] & rank_keys[1] and rank_keys[0] | rank_keys[1] == set(good)
    # Same seed, same stream; another seed, another shard order.
    once = dict(buckets=BUCKETS, batch_size=2, repeat=False, drop_last=False)
    again = [b["keys"] for b in TrainingBatches(pattern, seed=0, **once)]
    other = [b["keys"] for b in TrainingBatches(pattern, seed=5, **once)]
    assert again == [b["keys"] for b in batches] and other != again


def test_shards_with_bad_members_and_a_truncated_tar(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    good = make_shards(root, shards=2, per_shard=4)
    jpeg = encode(noise_image(64, 64, 7), "JPEG")
    write_tar(root / "data-002.tar", [
        ("bad/cut", {"jpg": jpeg[: len(jpeg) // 2], "txt": b"cut"}),
        ("bad/empty", {"png": b"", "txt": b"empty"}),
        ("bad/text", {"jpg": b"not an image", "txt": b"text"}),
        ("bad/nocaption", {"png": encode(noise_image(64, 64, 8), "PNG")}),
        ("bad/noimage", {"txt": b"only a caption"}),
        ("bad/ok", {"png": encode(noise_image(64, 64, 9), "PNG"), "txt": b"fine"}),
    ])
    # A shard cut in the middle of its third sample's image: the first two samples are used.
    write_tar(root / "data-003.tar", [(f"cut/{i}", {"png": encode(noise_image(64, 64, 20 + i), "PNG"),
                                                    "txt": f"cut {i}".encode()}) for i in range(4)])
    data = (root / "data-003.tar").read_bytes()
    with tarfile.open(root / "data-003.tar") as tar:
        third_image = [m for m in tar.getmembers() if m.name == "cut/2.png"][0]
    (root / "data-003.tar").write_bytes(data[: third_image.offset_data + 100])
    batches = TrainingBatches(str(root), buckets=BUCKETS, batch_size=1, seed=0, repeat=False)
    keys = {k for b in batches for k in b["keys"]}
    assert keys == set(good) | {"bad/ok", "cut/0", "cut/1"}
    assert batches.stats["skipped"] == {"missing_caption": 1, "missing_image": 1, "not_an_image": 1,
                                        "truncated": 1, "truncated_shard": 1, "zero_bytes": 1}


def test_shards_resume_exactly_with_buffered_samples(tmp_path: Path) -> None:
    pattern = str(tmp_path / "shards" / "data-{000..003}.tar")
    make_shards(tmp_path / "shards")
    settings = dict(buckets=BUCKETS, batch_size=2, seed=11)
    expected = take(TrainingBatches(pattern, **settings), 20)  # 24 samples per epoch: crosses into epoch 2
    with_buffered = 0
    for stop in range(1, 20, 2):
        first = TrainingBatches(pattern, **settings)
        assert_same_batches(take(first, stop), expected[:stop])
        state = json.loads(json.dumps(first.state_dict()))
        with_buffered += len(state["buffered"]) > 0  # samples waiting in partly filled buckets
        resumed = TrainingBatches(pattern, **settings)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 20 - stop), expected[stop:])
    assert with_buffered >= 3
    assert TrainingBatches(pattern, **settings).state_dict()["epoch"] == 0
    rank_mismatch = TrainingBatches(pattern, **settings, rank=1, world_size=2)
    with pytest.raises(ValueError, match="does not match"):
        rank_mismatch.load_state_dict(state)


def test_tar_offsets_restart_at_a_sample_with_long_names(tmp_path: Path) -> None:
    # Names over 100 characters get a PAX header before the member; the sample's offset must point at it.
    keys = [f"{'deep/' * 30}{i}" for i in range(3)]
    write_tar(tmp_path / "long.tar", [(key, {"txt": f"caption {i}".encode(),
                                              "png": encode(noise_image(8, 8, i), "PNG")})
                                      for i, key in enumerate(keys)])
    samples = list(iter_tar_samples(str(tmp_path / "long.tar")))
    assert [s.key for s in samples] == keys and all(set(s.members) == {"txt", "png"} for s in samples)
    assert samples[0].offset == 0 and samples[0].end == samples[1].offset and samples[1].end == samples[2].offset
    restarted = list(iter_tar_samples(str(tmp_path / "long.tar"), samples[1].offset))
    assert [s.key for s in restarted] == keys[1:] and restarted[0].members == samples[1].members
    assert list(iter_tar_samples(str(tmp_path / "long.tar"), samples[2].end)) == []


# ------------------------------------------------------------------------------------------- shapes dataset


def test_shapes_dataset_captions_describe_the_pixels(tmp_path: Path) -> None:
    import time

    start = time.perf_counter()
    root = make_shapes_dataset(tmp_path / "shapes", 200, size=64, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    captions = sorted(root.glob("*.txt"))
    assert len(captions) == 200 and len(list(root.glob("*.png"))) == 200
    sizes = set()
    combos = set()
    for caption_path in captions:
        caption = caption_path.read_text(encoding="utf-8")
        colour, (cx, cy) = describe(caption)
        combos.add(caption)
        image = np.asarray(Image.open(caption_path.with_suffix(".png")).convert("RGB")).astype(int)
        height, width = image.shape[:2]
        sizes.add((width, height))
        mask = (np.abs(image - colour).max(axis=-1) <= 2)  # the shape's pixels: its colour exactly (tol 2)
        white = (image == 255).all(axis=-1)
        assert (mask | white).mean() > 0.97  # nothing else on the canvas but antialiased edges
        ys, xs = np.nonzero(mask)
        assert abs((xs.mean() + 0.5) / width - cx) < 0.03 and abs((ys.mean() + 0.5) / height - cy) < 0.03
    assert len(combos) == 4 * 2 * 5  # every colour, shape and position appears
    assert sizes == {(64, 64), (80, 48), (48, 80)} and all(s in BUCKETS for s in sizes)
    assert describe("a yellow square in the center") == (COLOURS["yellow"], POSITIONS["center"])
    with pytest.raises(ValueError):
        describe("a purple triangle")
    # Same seed, same files.
    again = make_shapes_dataset(tmp_path / "again", 5, size=64, seed=0)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in sorted(root.iterdir())[:10])


ZOOM = Augment(zoom_crops=1.0, zoom_max=1.5)


def test_zoom_crops_cut_into_square_images_and_resume_exactly(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 30)
    # Off (the default) draws exactly the crops it always did.
    plain = take(TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3), 6)
    assert_same_batches(take(TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3, augment=Augment()), 6),
                        plain)
    # All zoomed: square images in the square bucket now have crop offsets on both axes, within zoom_max.
    zoomed = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3, augment=ZOOM)
    batches = take(zoomed, 2 * zoomed.batches_per_epoch)
    square = [(tuple(b["crop_top_left"][r].tolist()), tuple(b["original_size"][r].tolist()))
              for b in batches for r in range(2) if tuple(b["target_size"][r].tolist()) == (64, 64)]
    assert square and all(0 <= top <= 32 and 0 <= left <= 32 for (top, left), _ in square)
    assert any(top > 0 and left > 0 for (top, left), _ in square)
    # Exact resume with zoom, and a state saved without zoom is refused by a zoomed run (and vice versa).
    stop = 5
    again = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3, augment=ZOOM)
    take(again, stop)
    resumed = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3, augment=ZOOM)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert_same_batches(take(resumed, 4), batches[stop:stop + 4])
    unzoomed = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3)
    take(unzoomed, 1)
    with pytest.raises(ValueError, match="augment"):
        resumed.load_state_dict(unzoomed.state_dict())
    with pytest.raises(ValueError, match="zoom_crops <= 1"):
        Augment(zoom_crops=1.5)
    # Centre crops draw nothing, so augmentation with them would be silently lost: refused instead.
    with pytest.raises(ValueError, match="needs random crops"):
        TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=3, center_crop=True, augment=ZOOM)


def test_downscaled_sources_are_small_originals_upsampled_into_the_bucket(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", 30)
    augment = Augment(downscale=1.0, downscale_sides=(8, 12))
    batches = TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=4, augment=augment)
    for batch in take(batches, batches.batches_per_epoch):
        for row, key in enumerate(batch["keys"]):
            height, width = batch["original_size"][row].tolist()
            with Image.open(root / key) as image:
                full = image.size
            # The long side is the drawn one (8..12), the aspect ratio the file's (to a pixel).
            assert 8 <= max(height, width) <= 12, (key, height, width)
            assert abs(width / height - full[0] / full[1]) <= 1.0 / min(height, width) * max(1, full[0] / full[1])
            # Upsampled from a few pixels: the bucket-sized pixels are smooth (small neighbour differences).
            pixels = batch["pixels"][row]
            assert (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean() < 0.1
    # Noise images at full size are anything but smooth: the check above is not vacuous.
    plain = take(TrainingBatches(str(root), buckets=BUCKETS, batch_size=2, seed=4), 1)[0]["pixels"]
    assert (plain[:, :, :, 1:] - plain[:, :, :, :-1]).abs().mean() > 0.3
