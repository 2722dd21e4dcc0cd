"""2 processes under torchrun (gloo, CPU) with batch B each == 1 process with batch 2B."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xldm.train import checkpoint as ckpt

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
pytestmark = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The runs differ only in the order gradients are summed (DDP's all-reduce of two half-batch means vs one
# full-batch mean): measured ~4e-9 absolute on AdamW's first moments.  Adam's first steps are ~lr * sign(grad), so
# with the default eps 1e-8 an element whose gradient is ~1e-9 can move by +-lr either way; eps 1e-4 (set below)
# damps those elements, and the weights then agree within 1e-6 after 3 steps at lr 1e-3.
TOLERANCE = 1e-6
MOMENT_TOLERANCE = 1e-7


def _args(data: Path, out: Path, batch: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*extra, "--preset", "tiny-sdxl-base", "--data", str(data), "--steps", "3", "--batch-size", str(batch),
            "--out", str(out), "--checkpoint-every", "3", "--no-progress", "--device", "cpu",
            "--set", "text_dropout=0.5", "--set", "offset_noise=0.05", "--set", "adam_eps=1e-4"]


# the LoRA variant (~25 s) runs with -m slow; the full one covers the all-reduce and the per-rank data state
@pytest.mark.parametrize("extra", [(), pytest.param(("--lora-rank", "4", "--lora-text-encoders"), marks=pytest.mark.slow)],
                         ids=["full", "lora"])
def test_two_processes_equal_one_with_double_batch(tmp_path, extra):
    from shapes_dataset import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", 12, size=64)
    ddp = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "xldm.train.cli",
                            *_args(data, tmp_path / "ddp", 1, extra)], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    single = subprocess.run([sys.executable, "-m", "xldm.train.cli", *_args(data, tmp_path / "single", 2, extra)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    out, err = ddp.communicate(timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ddp.returncode == 0, err[-3000:]
    _, a, a_state = ckpt.load_latest(tmp_path / "single" / "checkpoints")
    _, b, b_state = ckpt.load_latest(tmp_path / "ddp" / "checkpoints")
    assert a_state["step"] == b_state["step"] == 3 and b_state["world_size"] == 2
    assert len(b_state["data"]) == 2  # both ranks' data positions are saved
    keys = [k for k in a if k.startswith(("model.", "ema."))]
    assert keys and set(keys) <= set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in keys)
    moved = max((a[k].float() - a["ema." + k[len("model."):]].float()).abs().max().item()
                for k in keys if k.startswith("model.") and k.endswith(".lora_up" if extra else ".weight"))
    assert moved > 1e-4  # the weights did train (EMA lags them)
    assert worst <= TOLERANCE, worst
    moments = [k for k in a if k.startswith("optim.") and k.endswith("exp_avg")]
    assert len(moments) >= (400 if extra else 600)  # one per trained parameter tensor
    worst_moment = max((a[k] - b[k]).abs().max().item() for k in moments)
    assert worst_moment <= MOMENT_TOLERANCE, worst_moment
