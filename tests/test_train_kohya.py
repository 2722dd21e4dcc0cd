"""kohya sd-scripts conventions in training: `N_name` dataset folders (repeats, caption fallback), gradient
accumulation, sample images during training."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from xldm.train import checkpoint as ckpt
from xldm.train.cli import add_train_parser, config_from_args
from xldm.train.config import TrainConfig, preset
from xldm.train.data import TrainingBatches
from xldm.train.loop import build_run, train, training_step
from xldm.train.samples import parse_prompt, read_prompts
from xldm.train.sources import FolderSource

pytestmark = pytest.mark.usefixtures("one_thread")
BUCKETS = [(64, 64)]


def _image(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)


def kohya_folder(root: Path) -> Path:
    """2_cat/: a (.txt), b (.caption), c (no caption), d (both); 1_sks dog/: e (no caption)."""
    for stem in "abcd":
        _image(root / "2_cat" / f"{stem}.png")
    (root / "2_cat" / "a.txt").write_text("a cat from txt\n")
    (root / "2_cat" / "b.caption").write_text("a cat from caption")
    (root / "2_cat" / "d.txt").write_text("txt wins")
    (root / "2_cat" / "d.caption").write_text("caption loses")
    _image(root / "1_sks dog" / "e.png", "blue")
    return root


def test_kohya_folder_repeats_captions_and_stats(tmp_path):
    (tmp_path / "data" / ".cache").mkdir(parents=True)  # hidden folders are not dataset folders
    source = FolderSource(kohya_folder(tmp_path / "data"))
    captions = {s.key: s.caption for s in source.samples}
    assert captions == {"2_cat/a.png": "a cat from txt", "2_cat/b.png": "a cat from caption", "2_cat/c.png": "cat",
                        "2_cat/d.png": "txt wins", "1_sks dog/e.png": "sks dog"}
    assert {s.key: s.repeats for s in source.samples}["1_sks dog/e.png"] == 1
    assert source.kohya == {"folders": {"1_sks dog": (1, 1), "2_cat": (4, 2)}, "captions_from_files": 3,
                            "captions_from_folder": 2, "images": 5, "images_per_epoch": 9}
    data = TrainingBatches(source, buckets=BUCKETS, batch_size=1, seed=3)
    assert data.batches_per_epoch == 9 and data.stats["kohya"]["images_per_epoch"] == 9
    batches = iter(data)
    epoch = Counter(next(batches)["keys"][0] for _ in range(9))
    assert epoch == {"2_cat/a.png": 2, "2_cat/b.png": 2, "2_cat/c.png": 2, "2_cat/d.png": 2, "1_sks dog/e.png": 1}
    assert data.epoch == 0 and next(batches) and data.epoch == 1
    # exact resume mid-epoch: the same remaining order
    first = TrainingBatches(source, buckets=BUCKETS, batch_size=1, seed=3)
    it = iter(first)
    [next(it) for _ in range(4)]
    state = first.state_dict()
    expected = [next(it)["keys"][0] for _ in range(7)]
    resumed = TrainingBatches(FolderSource(tmp_path / "data"), buckets=BUCKETS, batch_size=1, seed=3)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [next(it)["keys"][0] for _ in range(7)] == expected


def test_kohya_layout_needs_every_subfolder_named_n_name(tmp_path):
    root = kohya_folder(tmp_path / "mixed")
    _image(root / "misc" / "f.png")
    (root / "misc" / "f.txt").write_text("plain")
    source = FolderSource(root)
    assert source.kohya is None and all(s.repeats == 1 for s in source.samples)
    assert [s.key for s in source.samples] == ["2_cat/a.png", "2_cat/d.png", "misc/f.png"]  # .txt sidecars only
    top = kohya_folder(tmp_path / "top")
    _image(top / "g.png")
    (top / "g.txt").write_text("top level")
    assert FolderSource(top).kohya is None


def _rows(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _batch(n: int) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"pixels": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, "captions": [f"shape {i}" for i in range(n)],
            "original_size": torch.tensor([[64, 64]] * n), "crop_top_left": torch.zeros(n, 2).long(),
            "target_size": torch.tensor([[64, 64]] * n), "aesthetic_score": torch.full((n,), 6.0),
            "keys": [str(i) for i in range(n)]}


def _record_gradients(run) -> list[list[torch.Tensor]]:
    """The gradients AdamW steps with, per update (after clipping)."""
    seen, params, original = [], [p for _, p in run.named_trainable_parameters()], run.optimizer.step
    run.optimizer.step = lambda: (seen.append([p.grad.clone() for p in params]), original())[1]
    return seen


def test_accumulating_two_micro_batches_equals_one_batch_of_two():
    config = preset("tiny-sdxl-base", out="unused", text_dropout=0.5, min_snr_gamma=5.0, grad_clip=0.05)
    whole, split = build_run(config), build_run(config.replace(grad_accum_steps=2))
    whole_grads, split_grads = _record_gradients(whole), _record_gradients(split)
    batch = _batch(2)
    for step in (1, 2):
        expected = training_step(whole, batch, step)
        split.micro_batch = (0, 2)
        first = training_step(split, _rows(batch, slice(0, 1)), step)
        split.micro_batch = (1, 2)
        result = training_step(split, _rows(batch, slice(1, 2)), step)
        assert not first.applied and result.applied and expected.applied
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        assert result.grad_norm == pytest.approx(expected.grad_norm, rel=1e-4) and result.grad_norm > 0.05
    assert len(whole_grads) == len(split_grads) == 2  # one AdamW step per step, not per micro-batch
    for a, b in zip(whole_grads, split_grads):
        scale = max(float(g.abs().max()) for g in a)
        assert max(float((g - h).abs().max()) for g, h in zip(a, b)) < 1e-4 * scale
    a, b = dict(whole.named_trainable_parameters()), dict(split.named_trainable_parameters())
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) < 0.1 * config.lr  # Adam: lr-sized updates


def test_accumulated_step_with_a_non_finite_micro_batch_is_skipped():
    run = build_run(preset("tiny-sdxl-base", out="unused", grad_accum_steps=2))
    before = {k: p.detach().clone() for k, p in run.named_trainable_parameters()}
    bad = _batch(1)
    bad["pixels"][:] = float("nan")
    run.micro_batch = (0, 2)
    training_step(run, bad, 1)
    run.micro_batch = (1, 2)
    result = training_step(run, _batch(1), 1)
    assert not result.applied and not math.isfinite(result.loss)
    assert all(torch.equal(before[k], p) and p.grad is None for k, p in run.named_trainable_parameters())
    assert run.micro_losses == []


class Stop(Exception):
    pass


def test_resume_with_accumulation_matches_the_straight_run(tmp_path):
    from shapes_dataset import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", 12, size=64)
    config = preset("tiny-sdxl-base", data=str(data), steps=4, batch_size=1, grad_accum_steps=2,
                    checkpoint_every=2, warmup_steps=2, lr_schedule="cosine")
    straight = train(config.replace(out=str(tmp_path / "a")), progress=False)

    def stop(step, run):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(config.replace(out=str(tmp_path / "b")), progress=False, on_step=stop)
    resumed = train(config.replace(out=str(tmp_path / "b")), progress=False, resume=True)
    assert straight.step == resumed.step == 4 and resumed.losses == straight.losses[2:]
    _, a, a_state = ckpt.load_latest(tmp_path / "a" / "checkpoints")
    _, b, b_state = ckpt.load_latest(tmp_path / "b" / "checkpoints")
    assert a_state["data"] == b_state["data"] and a_state["data"][0]["batches"] == 8  # 2 micro-batches a step
    assert a_state["ema"]["num_updates"] == 4
    assert [k for k in a if k.startswith(("model.", "optim.", "ema.")) and not torch.equal(a[k], b[k])] == []


def test_sample_grids_appear_at_their_steps(tmp_path):
    from shapes_dataset import make_shapes_dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya sample prompts\n\na red circle --s 2\n"
                       "a blue square --n red --s 2 --l 1 --d 7 --w 128 --h 64\n")
    data = make_shapes_dataset(tmp_path / "data", 8, size=64)
    config = preset("tiny-sdxl-base", data=str(data), out=str(tmp_path / "run"), steps=4, batch_size=2,
                    sample_every=2, sample_prompts=str(prompts))
    training: list[bool] = []
    train(config, progress=False, on_step=lambda step, run: training.append(run.trainable["unet"].training))
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_000002.png", "step_000002.txt", "step_000004.png",
                                                         "step_000004.txt"]
    with Image.open(samples / "step_000004.png") as grid:
        assert grid.size == (256, 64)  # two cells of the largest image, 128 x 64
    lines = (samples / "step_000002.txt").read_text().splitlines()
    assert lines[0].startswith("a red circle\t") and "seed=0" in lines[0] and "steps=2" in lines[0]
    assert "negative_prompt=red" in lines[1] and "cfg=1.0" in lines[1] and "seed=7" in lines[1]
    assert training == [True] * 4  # train mode restored after sampling


def test_sample_prompt_options_and_errors(tmp_path):
    p = parse_prompt("a cat --n dog, blurry --s 28 --l 7.5 --d 3 --w 96 --h 64")
    assert (p.prompt, p.negative, p.steps, p.cfg, p.seed, p.width, p.height) == ("a cat", "dog, blurry", 28, 7.5,
                                                                                3, 96, 64)
    with pytest.raises(ValueError, match="unknown option --x"):
        parse_prompt("a cat --x 1")
    with pytest.raises(ValueError, match="is not a file"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="holds no prompts"):  # at start, before any step
        train(preset("tiny-sdxl-base", data="unused", out=str(tmp_path / "run"), sample_every=1,
                     sample_prompts=str(tmp_path / "empty.txt")), progress=False)
    for bad in (dict(task="vae"), dict(model="tiny-cascade-base-16")):
        with pytest.raises(ValueError, match="sample_every needs the diffusion task of a latent model"):
            TrainConfig(sample_every=5, sample_prompts="p.txt", **bad)
    with pytest.raises(ValueError, match="grad_accum_steps applies to the diffusion task only"):
        TrainConfig(task="vae", grad_accum_steps=2)
    with pytest.raises(ValueError, match="sample_every needs sample_prompts"):
        TrainConfig(sample_every=5)


def test_cli_flags():
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--preset", "tiny-sdxl-base", "--grad-accum", "3", "--sample-every", "50",
                              "--sample-prompts", "prompts.txt"])
    config = config_from_args(args)
    assert (config.grad_accum_steps, config.sample_every, config.sample_prompts) == (3, 50, "prompts.txt")
    assert TrainConfig().grad_accum_steps == 1 and TrainConfig().sample_every == 0
