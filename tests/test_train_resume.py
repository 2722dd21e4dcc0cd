"""Crash-consistent checkpoints and exact resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from xldm.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(64, 64, generator=g), "model.b": torch.randn(64, generator=g).bfloat16(),
            "count": torch.tensor([seed], dtype=torch.int64), "flags": torch.tensor([True, False]),
            "rng.torch": torch.get_rng_state()}


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, _tensors(step), {"step": step, "data": {"i": step}}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    path, tensors, state = ckpt.load_latest(tmp_path)
    assert path.name == "step_00000005.safetensors" and state["step"] == 5 and state["data"] == {"i": 5}
    expected = _tensors(5)
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in expected.items())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _tensors(1), {"step": 1}, keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 2, _tensors(2), {"step": 2}, keep=3)
    with open(newest, "r+b") as f:  # a torn file, as a crash without the atomic rename would leave
        f.truncate(newest.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint of step 2"):
        path, _, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001.safetensors"


def test_optimizer_and_rng_state_round_trip():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_state(opt, "optim")
    other = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=5.0, foreach=False)
    ckpt.load_optimizer_state(other, "optim", tensors, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i])
    rng_tensors, rng_meta = ckpt.rng_state()
    import random

    import numpy as np

    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng_state(rng_tensors, rng_meta)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, time, torch
    from xldm.train import checkpoint as ckpt
    out = sys.argv[1]
    ckpt.save_checkpoint(out, 1, {"w": torch.ones(1000), "v": torch.ones(1000)}, {"step": 1}, keep=3)
    def hook(path, written):
        print("WRITING", path, flush=True)
        time.sleep(60)
    ckpt.write_hook = hook
    ckpt.save_checkpoint(out, 2, {"w": torch.zeros(1000), "v": torch.zeros(1000)}, {"step": 2}, keep=3)
""")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING"), line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert list(tmp_path.glob(".step_00000002*.tmp"))  # killed half-way through the temporary file
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    _, tensors, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.ones(1000))
    ckpt.save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, {"step": 3}, keep=3)
    assert not list(tmp_path.glob(".*.tmp"))  # the next save clears the leftover


# --- exact resume ---------------------------------------------------------------------------------------

STOP_AFTER = textwrap.dedent("""
    import sys, time
    from xldm.train import cli, loop
    stop_at = int(sys.argv[1])
    original = loop.train
    def train(config, **kwargs):
        def on_step(step, run):
            if step == stop_at:
                print("READY", flush=True)
                time.sleep(600)
        return original(config, on_step=on_step, **kwargs)
    loop.train = train
    sys.exit(cli.main(sys.argv[2:]))
""")


def _args(data: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*extra, "--preset", "tiny-sdxl-base", "--data", str(data), "--steps", str(steps), "--batch-size", "2",
            "--out", str(out), "--checkpoint-every", "2", "--deterministic", "--no-progress",
            "--set", "offset_noise=0.05", "--set", "min_snr_gamma=5", "--set", "warmup_steps=3",
            "--set", "lr_schedule=cosine"]


LORA = ("--lora-rank", "4", "--lora-conv", "--lora-text-encoders")


# the LoRA variant (~30 s) runs with -m slow; the full one covers the resume path, test_lora_train the LoRA files
@pytest.mark.parametrize("extra", [(), pytest.param(LORA, marks=pytest.mark.slow)], ids=["full", "lora"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, extra):
    from shapes_dataset import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", 12, size=64)
    steps = 6
    straight = subprocess.Popen([sys.executable, "-m", "xldm.train.cli", *_args(data, tmp_path / "a", steps, extra)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen([sys.executable, "-c", STOP_AFTER, "3", *_args(data, tmp_path / "b", steps, extra)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "READY"  # step 3 done, checkpoint of step 2 on disk
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b" / "checkpoints")] == [2]
    resumed = subprocess.run([sys.executable, "-m", "xldm.train.cli", *_args(data, tmp_path / "b", steps, extra),
                              "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 2)" in resumed.stderr
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err[-3000:]

    _, a_tensors, a_state = ckpt.load_latest(tmp_path / "a" / "checkpoints")
    _, b_tensors, b_state = ckpt.load_latest(tmp_path / "b" / "checkpoints")
    assert a_state["step"] == b_state["step"] == steps
    assert a_state["lr"] == b_state["lr"] and a_state["ema"] == b_state["ema"]
    assert a_state["ema"]["num_updates"] == steps
    assert a_state["data"] == b_state["data"]
    trained = [k for k in a_tensors if k.startswith(("model.", "ema.", "optim."))]
    assert len(trained) > (3 * 600 if not extra else 3 * 800) and set(a_tensors) == set(b_tensors)
    mismatched = [k for k in trained if not torch.equal(a_tensors[k], b_tensors[k])]
    assert mismatched == []  # bit-identical weights, EMA and AdamW moments
    from safetensors.torch import load_file

    name = "lora.safetensors" if extra else "model.safetensors"
    final_a, final_b = (load_file(tmp_path / run / "final" / name) for run in "ab")
    assert set(final_a) == set(final_b) and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # metrics: the resumed run rewrote steps 3.. after trimming, so each step appears once
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, steps + 1))


def test_existing_run_needs_resume(tmp_path):
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"w": torch.ones(1)}, {"step": 1}, keep=1)
    from xldm.train.config import preset
    from xldm.train.loop import train

    with pytest.raises(ValueError, match="pass --resume"):
        train(preset("tiny-sdxl-base", out=str(tmp_path / "run"), data="unused"), progress=False)


@pytest.mark.parametrize("entry", ["diffusion", "clip", "cascade"])
def test_a_run_directory_with_checkpoints_is_refused_unless_resuming(tmp_path: Path, entry: str) -> None:
    out = tmp_path / "run"
    assert ckpt.checkpoints_dir(out, resume=False) == out / "checkpoints"  # nothing there yet: fine
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ckpt.checkpoint_name(3)).write_bytes(b"")
    assert ckpt.checkpoints_dir(out, resume=True) == out / "checkpoints"
    # Every training entry point refuses before it builds anything (no data is even needed).
    if entry == "diffusion":
        from xldm.train.config import TrainConfig
        from xldm.train.loop import train
        run = lambda: train(TrainConfig(out=str(out), data=str(tmp_path / "none")))  # noqa: E731
    elif entry == "clip":
        from xldm.train.config import TRAIN_PRESETS
        from xldm.train.loop import train
        from dataclasses import replace
        run = lambda: train(replace(TRAIN_PRESETS["default-clip"], out=str(out), data=str(tmp_path)))  # noqa: E731
    else:
        from dataclasses import replace
        from xldm.train.config import TRAIN_PRESETS
        from xldm.train.loop import train
        run = lambda: train(replace(TRAIN_PRESETS["cascade-base-32"], out=str(out),  # noqa: E731
                                    data=str(tmp_path)))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        run()
