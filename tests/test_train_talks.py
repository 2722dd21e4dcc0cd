"""Training that talks: the dataset summary (RUN/dataset.json, RUN/skipped.txt, the lines printed before step 1),
`xldm train --help` listing every TrainConfig field, TensorBoard events (`--tensorboard`) and `xldm plot RUN`."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import struct
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from xldm.cli import build_parser
from xldm.cli import main as cli_main
from xldm.train.config import TrainConfig, preset
from xldm.train.data import FolderSource, ShardSource, TrainingBatches, format_summary
from xldm.train.events import MissingExtraError
from xldm.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path, size=(64, 64), colour="red") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def messy_folder(root: Path, tall: bool = True) -> Path:
    """5 good 64x64 images and (`tall`) 1 of 64x128, captioned; one without a caption, one not an image, one empty
    file, one cut short (its header reads, its pixels do not), a notes file and a hidden file."""
    for i in range(5):
        _png(root / f"good{i}.png", colour=(40 * i, 0, 0))
    if tall:
        _png(root / "sub" / "tall.png", (64, 128))
    encoded = _png(root / "cut.png", colour="blue")
    (root / "cut.png").write_bytes(encoded[: len(encoded) // 2])
    (root / "bad.png").write_bytes(b"plain text, no picture")
    (root / "empty.jpg").write_bytes(b"")
    for stem in ("good0", "good1", "good2", "good3", "good4", "cut", "bad", "empty", *(("sub/tall",) if tall else ())):
        (root / f"{stem}.txt").write_text(f"a picture called {stem}")
    _png(root / "uncaptioned.png")
    (root / "notes.md").write_text("not data")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def test_folder_summary_counts_every_skip_and_bucket(tmp_path):
    root = messy_folder(tmp_path / "data")
    data = TrainingBatches(FolderSource(root), buckets=[(64, 64), (32, 128), (128, 32)], batch_size=2, seed=0)
    summary = data.summary()
    assert summary["images_found"] == 10 and summary["images_used"] == 7  # cut.png reads until decoded
    assert summary["skipped"] == {"missing_caption": 1, "not_an_image": 1, "zero_bytes": 1}
    assert summary["ignored_files"] == 1  # notes.md; .DS_Store is hidden
    assert summary["captions"] == {"from_files": 9, "missing": 1, "when_missing": "skipped"}
    assert summary["buckets"] == {"32x128": 1, "64x64": 6}
    # 64x64: 6 images = 3 batches of 2; 32x128: 1 image, less than a batch: left out (drop_last)
    assert summary["batches_per_epoch"] == 3 and summary["rows_left_out_per_epoch"] == 1
    assert data.skipped_files() == [(str(root / "bad.png"), "not_an_image"), (str(root / "empty.jpg"), "zero_bytes"),
                                    (str(root / "notes.md"), "unsupported_extension"),
                                    (str(root / "uncaptioned.png"), "missing_caption")]
    batches = iter(data)
    for _ in range(3):  # one epoch: every row decoded, cut.png among them
        next(batches)
    after = data.summary()
    assert after["skipped"]["truncated"] == 1 and after["images_used"] == 6
    assert (str(root / "cut.png"), "truncated") in data.skipped_files()
    text = format_summary(after, "RUN/skipped.txt")
    assert "10 images found" in text and "6 used, 4 skipped" in text and "1 other files ignored" in text
    assert "1 missing (skipped)" in text and "64x64 6" in text and "1 rows left out of each epoch" in text


def test_metadata_and_kohya_summaries_say_where_captions_came_from(tmp_path):
    meta = tmp_path / "meta"
    for name in ("a.png", "b.png"):
        _png(meta / name)
    (meta / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red square"}\n'
                                         '{"file_name": "b.png"}\n{"file_name": "gone.png", "text": "x"}\nnot json\n')
    summary = TrainingBatches(FolderSource(meta, missing_caption="empty"), buckets=[(64, 64)], batch_size=1,
                              seed=0).summary()
    assert summary["source"] == "metadata folder" and summary["captions"] == {
        "from_metadata": 1, "missing": 1, "when_missing": "empty caption"}
    assert summary["skipped"] == {"bad_metadata": 1, "missing_image": 1} and summary["images_used"] == 2
    kohya = tmp_path / "kohya"
    for stem in "ab":
        _png(kohya / "3_cat" / f"{stem}.png")
    (kohya / "3_cat" / "a.txt").write_text("a cat from its file")
    _png(kohya / "1_dog" / "c.png")
    summary = TrainingBatches(FolderSource(kohya), buckets=[(64, 64)], batch_size=1, seed=0).summary()
    assert summary["captions"] == {"from_files": 1, "from_folder_names": 2, "missing": 0,
                                   "when_missing": "folder name"}
    assert summary["kohya"] == {"folders": {"1_dog": {"images": 1, "repeats": 1}, "3_cat": {"images": 2, "repeats": 3}},
                                "images_per_epoch": 7}
    assert summary["batches_per_epoch"] == 7
    assert "kohya repeats: 1_dog: 1 x 1, 3_cat: 2 x 3 = 7 images per epoch" in format_summary(summary, "s.txt")


def test_shard_skips_are_recorded_as_they_stream(tmp_path):
    shard = tmp_path / "data-000.tar"
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(good, "PNG")
    with tarfile.open(shard, "w") as tar:
        for key, members in (("ok1", {"png": good.getvalue(), "txt": b"fine"}),
                             ("broken", {"png": b"nope", "txt": b"x"}),
                             ("ok2", {"png": good.getvalue(), "txt": b"fine too"})):
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = TrainingBatches(ShardSource([str(shard)]), buckets=[(64, 64)], batch_size=2, seed=0)
    before = data.summary()
    assert before["source"] == "shards" and before["shards"] == 1 and before["images_found"] is None
    assert "1 shards (streamed" in format_summary(before, "s.txt")
    next(iter(data))
    assert data.summary()["skipped"] == {"not_an_image": 1}
    assert data.skipped_files() == [(f"{shard}:broken", "not_an_image")]


def _stderr_of_run(capsys, config: TrainConfig):
    train(config, progress=False)
    return capsys.readouterr().err


def test_training_prints_and_writes_the_dataset_report(tmp_path, capsys):
    root = messy_folder(tmp_path / "data", tall=False)
    run = tmp_path / "run"
    # one 64x64 bucket: 6 images, batch 2 -> 3 steps read every row once, cut.png included
    err = _stderr_of_run(capsys, preset("tiny-sdxl-base", data=str(root), out=str(run), steps=3, batch_size=2,
                                        ema_decay=0.0))
    assert "dataset: 9 images found" in err and "6 used, 3 skipped" in err and str(run / "skipped.txt") in err
    assert err.index("dataset:") < err.index("captions:")
    summary = json.loads((run / "dataset.json").read_text())  # brought up to date at the last step's checkpoint
    assert summary["skipped"] == {"missing_caption": 1, "not_an_image": 1, "truncated": 1, "zero_bytes": 1}
    lines = (run / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == ["missing_caption", "not_an_image", "truncated",
                                                            "unsupported_extension", "zero_bytes"]
    assert all(Path(line.split("\t")[0]).parent == root for line in lines)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_images"] == 4 and not (run / "tensorboard").exists()


def _read_events(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in `folder`: TFRecord framing (u64 length, u32 crc, data, u32 crc) around
    tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = Event.FromString(data[position + 12 : position + 12 + length])
            position += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_events_hold_each_steps_metrics(tmp_path, images):
    pytest.importorskip("tensorboardX")
    run = tmp_path / "run"
    config = preset("tiny-sdxl-base", data=str(images), out=str(run), steps=2, batch_size=2, tensorboard=True,
                    checkpoint_every=1)
    train(config, progress=False)
    scalars = _read_events(run / "tensorboard")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "grad_norm", "it_per_s"):
        assert scalars[f"train/{name}"] == pytest.approx({m["step"]: m[name] for m in metrics}, rel=1e-6)
    # a resumed run carries on in a new event file from its next step
    train(config.replace(steps=3), resume=True, progress=False)
    assert sorted(_read_events(run / "tensorboard")["train/loss"]) == [1, 2, 3]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_missing_extras_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'xldm[tensorboard]'")):
        train(preset("tiny-sdxl-base", data="unused", out=str(tmp_path / "run"), tensorboard=True), progress=False)
    with pytest.raises(SystemExit, match=re.escape("xldm train: error: --tensorboard needs the tensorboardX")):
        cli_main(["train", "--preset", "tiny-sdxl-base", "--data", "unused", "--out", str(tmp_path / "run2"),
                  "--tensorboard"])
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n')
    with pytest.raises(SystemExit, match=re.escape("pip install 'xldm[plot]'")):
        cli_main(["plot", str(tmp_path)])


def test_train_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) = (.+?)(?: \[--[\w-]+\])?(?::|$)", text, re.M)}
    fields = dataclasses.fields(TrainConfig)
    assert set(listed) == {f.name for f in fields}
    assert all(listed[f.name] == repr(f.default) for f in fields)
    assert "  steps = 1000 [--steps]: total optimisation steps" in text  # a flag's help for a field without comment
    assert "  tensorboard = False [--tensorboard]: also write the metrics as TensorBoard events" in text
    assert "  # LoRA (Hu et al. 2022)" in text  # a group's note, once
    assert text.count("# LoRA (Hu et al. 2022)") == 1


def _write_metrics(path: Path, steps: int, *, last_line_cut: bool = False) -> None:
    records = [{"step": s, "loss": 1.0 / s if s != 4 else math.nan, "lr": 1e-3 * min(1, s / 3),
                "grad_norm": 2.0 / s, "it_per_s": 3.0, "skipped_step": s == 4} for s in range(1, steps + 1)]
    records[4]["val_loss"] = 0.4
    text = "".join(json.dumps(r) + "\n" for r in records)  # (NaN is written as NaN, as the loop's json.dumps does)
    path.write_text(text + ('{"step": 99, "lo' if last_line_cut else ""))


def test_plot_writes_a_png_of_the_loss_and_lr(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from xldm.train.plot import read_metrics, smoothed

    run = tmp_path / "run"
    run.mkdir()
    _write_metrics(run / "metrics.jsonl", 12, last_line_cut=True)
    assert len(read_metrics(run / "metrics.jsonl")) == 12  # the line being written is left out
    assert cli_main(["plot", str(run)]) == 0
    assert str(run / "metrics.png") in capsys.readouterr().out
    with Image.open(run / "metrics.png") as png:
        assert png.format == "PNG" and png.size == (1000, 900)
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "out" / "curves.png")]) == 0
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    values = smoothed([1.0, 1.0, math.nan, 3.0])
    assert values[:3] == pytest.approx([1.0, 1.0, 1.0]) and values[3] == pytest.approx((0.09 + 0.081 + 0.3) / 0.271)


def test_plot_refuses_missing_empty_or_bad_metrics(tmp_path, capsys):
    from xldm.train.plot import read_metrics

    assert cli_main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "holds no metrics records" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"loss": 2}\n{"step": 3, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_data_without_a_summary_is_described_from_its_folder(tmp_path):
    from xldm.train.loop import write_dataset_report

    root = messy_folder(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    summary = write_dataset_report(TrainConfig(data=str(root)), object(), out)  # e.g. the contrastive task's data
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert summary["images_found"] == 10 and summary["skipped_total"] == 3 and "buckets" not in summary
    assert len((out / "skipped.txt").read_text().splitlines()) == 4
    assert write_dataset_report(TrainConfig(data="not/a/path"), object(), out) == {"source": "object"}
    assert (out / "skipped.txt").read_text() == ""


@pytest.mark.parametrize("device, expected", [("gpu0", "is not a device"), ("cuda:7", "CUDA|CUDA device")])
def test_train_refuses_a_device_it_cannot_use_before_reading_anything(tmp_path, capsys, device, expected):
    if device.startswith("cuda") and torch_cuda_count() > 7:
        pytest.skip("this machine has a cuda:7")
    rc = cli_main(["train", "--preset", "tiny-sdxl-base", "--data", str(tmp_path / "absent"),
                   "--out", str(tmp_path / "run"), "--device", device])
    assert rc == 2
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
