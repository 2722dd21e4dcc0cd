"""Hostile inputs to training: mistyped settings, bad sample metadata, non-finite weights, damaged run folders."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from xldm.train.cli import add_train_parser, config_from_args
from xldm.train.config import TrainConfig, preset
from xldm.train.data import TrainingBatches
from xldm.buckets import training_buckets

BUCKETS = training_buckets(64, 16)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (seed * 40 % 256, 80, 160)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("field, value, expected", [
    ("lr", "1e-3", "lr must be int or float (finite), got '1e-3'"), ("steps", 1.5, "steps must be int, got 1.5"),
    ("data", 5, "data must be str, got 5"), ("center_crop", "false", "center_crop must be bool, got 'false'"),
    ("steps", True, "steps must be int, got True"), ("lr", float("inf"), "lr must be int or float (finite), got inf"),
    ("downscale_sides", ["8", "24"], "downscale_sides must be tuple or list of int")])
def test_mistyped_settings_are_refused_naming_field_type_and_value(field, value, expected) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict({**preset("tiny-sdxl-base").to_dict(), field: value})
    assert expected in str(info.value)
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    with pytest.raises(ValueError, match="steps: expected int, got 'true'"):
        config_from_args(parser.parse_args(["train", "--preset", "tiny-sdxl-base", "--set", "steps=true"]))
    assert config_from_args(parser.parse_args(["train", "--set", "downscale_sides=8,24"])).downscale_sides == (8, 24)


@pytest.mark.parametrize("text, expected", [
    (None, "is a folder; expected a TOML file"),
    ('preset = ["a"]', "preset must be a preset name (a string), got ['a']"),
    ("preset = 5", "preset must be a preset name (a string), got 5"),
    ("steps = ", "not valid TOML"),
])
def test_bad_config_files_are_clear_errors(tmp_path: Path, text, expected) -> None:
    config = tmp_path / "run.toml"
    if text is None:
        config.mkdir()
    else:
        config.write_text(text)
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    with pytest.raises(ValueError, match="run.toml: ") as info:
        config_from_args(parser.parse_args(["train", str(config)]))
    assert expected in str(info.value)


def write_shard(path: Path, metas: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate([*metas, json.dumps({"caption": "fine", "aesthetic_score": 5}).encode()]):
            for ext, data in (("png", png(i)), ("json", meta)):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_non_finite_aesthetic_scores_are_bad_metadata(tmp_path: Path) -> None:
    write_shard(tmp_path / "data-000.tar", [b'{"caption": "a", "aesthetic_score": NaN}',
                                            b'{"caption": "b", "aesthetic_score": "inf"}',
                                            b'{"caption": "c", "aesthetic_score": Infinity}'])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1))
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a", "aesthetic_score": NaN}\n'
                                           '{"file_name": "a.png", "text": "b", "aesthetic_score": 7}\n')
    for source, kept in ((str(tmp_path / "data-000.tar"), 1), (folder, 1)):
        batches = TrainingBatches(source, buckets=BUCKETS, batch_size=1, seed=0, repeat=False)
        scores = [float(b["aesthetic_score"][0]) for b in batches]
        assert len(scores) == kept and all(s in (5.0, 7.0) for s in scores)
        assert batches.stats["skipped"] == {"bad_metadata": 3 if kept == 1 and source != folder else 1}


def test_deeply_nested_sidecar_is_bad_metadata_not_a_crash(tmp_path: Path) -> None:
    write_shard(tmp_path / "data-000.tar", [b"[" * 5000 + b"]" * 5000, b'{"a":' * 5000 + b"1" + b"}" * 5000])
    batches = TrainingBatches(str(tmp_path / "data-000.tar"), buckets=BUCKETS, batch_size=1, seed=0, repeat=False)
    assert [b["captions"] for b in batches] == [["fine"]]
    assert batches.stats["skipped"] == {"bad_metadata": 2}


def test_non_finite_weights_are_not_exported(tmp_path: Path) -> None:
    from xldm.errors import NonFiniteError
    from xldm.train.loop import train
    from test_train_loop import ListBatches, fixed_batch

    def corrupt(step, run):
        if step == 2:
            with torch.no_grad():
                next(run.trainable["unet"].parameters()).fill_(float("inf"))
                for shadow in run.ema.shadow.values():
                    shadow.fill_(float("nan"))

    config = preset("tiny-sdxl-base", out=str(tmp_path / "run"), steps=2, checkpoint_every=100)
    with pytest.raises(NonFiniteError, match=r"not exporting step 2: \d+ weight tensors hold NaN/inf, first unet\."):
        train(config, progress=False, data=ListBatches([fixed_batch()]), on_step=corrupt)
    assert not (tmp_path / "run" / "final").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def _run(tmp_path: Path, name: str = "run", model: str = "tiny-sdxl-base", steps: int = 2, **kwargs):
    from xldm.train.loop import train
    from test_train_loop import ListBatches, fixed_batch

    config = preset(model, out=str(tmp_path / name), steps=steps, checkpoint_every=1, keep_checkpoints=3)
    return train(config, progress=False, data=ListBatches([fixed_batch()]), **kwargs)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_damaged_metrics_partial_last_line_is_dropped_a_bad_middle_line_is_refused(tmp_path: Path) -> None:
    from xldm.errors import CheckpointLoadError

    _run(tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good.replace("\n", "\nnot json\n", 1))
    before = _snapshot(tmp_path / "run")
    with pytest.raises(CheckpointLoadError, match=r"metrics\.jsonl:2: not a metrics record"):
        _run(tmp_path, steps=3, resume=True)
    assert _snapshot(tmp_path / "run") == before
    metrics.write_text(good + '{"step": 3, "lo')
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl:3: dropping a partial last line"):
        _run(tmp_path, steps=3, resume=True)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_resume_with_no_loadable_checkpoint_is_an_error_and_deletes_nothing(tmp_path: Path) -> None:
    from xldm.errors import CheckpointLoadError

    _run(tmp_path)
    for path in (tmp_path / "run" / "checkpoints").iterdir():
        path.write_bytes(path.read_bytes()[:100])
    before = _snapshot(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        with pytest.raises(CheckpointLoadError, match="none of the 2 checkpoints can be resumed from"):
            _run(tmp_path, steps=3, resume=True)
    assert _snapshot(tmp_path / "run") == before


def test_newest_checkpoint_of_another_model_falls_back_to_this_runs(tmp_path: Path) -> None:
    _run(tmp_path)
    _run(tmp_path, "vae", "tiny-vae", steps=1)
    foreign = tmp_path / "run" / "checkpoints" / "step_00000003.safetensors"
    foreign.write_bytes((tmp_path / "vae" / "checkpoints" / "step_00000001.safetensors").read_bytes())
    with pytest.warns(RuntimeWarning, match="skipping checkpoint of step 3: step_00000003.safetensors"):
        result = _run(tmp_path, steps=3, resume=True)
    assert result.step == 3 and len(result.losses) == 1  # resumed from step 2
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]
