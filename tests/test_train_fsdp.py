"""FSDP2 (`parallel="fsdp"`) under torchrun with 2 CPU processes (gloo): the same training as 1 process with the
double batch, checkpoints in the common format, exact resume, and the gathered export."""

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
# FSDP vs 1 process differ only in float summation order (reduce-scatter of two half-batch means vs one
# full-batch mean, and the gradient norm summed shard by shard), as DDP does; the DDP test's bounds hold
# (eps 1e-4 damps Adam's sign-like first steps on ~1e-9 gradients, see tests/test_train_ddp.py).
# Measured after 2 steps: weights 2.6e-7, EMA 2.4e-7, AdamW first moments 8.0e-9.
TOLERANCE = 1e-6
MOMENT_TOLERANCE = 1e-7


def _args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["--preset", "tiny-sdxl-base", "--data", str(data), "--steps", "2", "--batch-size", str(batch),
            "--out", str(out), "--checkpoint-every", "1", "--keep-checkpoints", "2", "--no-progress",
            "--device", "cpu", "--set", "text_dropout=0.5", "--set", "offset_noise=0.05",
            "--set", "adam_eps=1e-4", *extra]


def _torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "xldm.train.cli", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def _max_diff(a: dict, b: dict, keys: list[str]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in keys)


@pytest.mark.slow  # 41 s on 2 cores: two gloo processes; the DDP equality and SIGKILL resume stay in the default suite
def test_fsdp_equals_single_process_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from shapes_dataset import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", 8, size=64)
    fsdp = _torchrun(*_args(data, tmp_path / "fsdp", 1, "--set", "parallel=fsdp"))
    single = subprocess.run([sys.executable, "-m", "xldm.train.cli", *_args(data, tmp_path / "single", 2)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    _finish(fsdp)

    # 1. FSDP x 2 processes x batch 1 == 1 process x batch 2, in the same checkpoint layout.
    _, a, a_state = ckpt.load_latest(tmp_path / "single" / "checkpoints")
    _, b, b_state = ckpt.load_latest(tmp_path / "fsdp" / "checkpoints")
    assert a_state["step"] == b_state["step"] == 2 and b_state["world_size"] == 2
    assert set(a) == {k for k in b if not k.startswith("rng.cuda")}  # same keys: resumable either way
    assert all(a[k].shape == b[k].shape for k in a)  # full tensors, not shards
    assert b_state["ema"]["num_updates"] == a_state["ema"]["num_updates"] == 2
    weights = [k for k in a if k.startswith(("model.", "ema."))]
    moved = max((a[k] - a["ema." + k[len("model."):]]).abs().max().item()
                for k in weights if k.startswith("model.") and k.endswith(".weight"))
    assert moved > 1e-4  # the weights did train (EMA lags them)
    worst = _max_diff(a, b, weights)
    assert worst <= TOLERANCE, worst
    moments = [k for k in a if k.startswith("optim.") and k.endswith("exp_avg")]
    assert len(moments) >= 600  # one per UNet parameter tensor
    worst_moment = _max_diff(a, b, moments)
    assert worst_moment <= MOMENT_TOLERANCE, worst_moment

    # 2. The export gathers the EMA weights of the shards: equal to the checkpoint's EMA shadows.
    final = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    prefix = "model.diffusion_model."
    exported = {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)}
    shadows = {k[len("ema.unet."):]: v for k, v in b.items() if k.startswith("ema.unet.")}
    assert exported.keys() == shadows.keys()
    assert max((exported[k].float() - shadows[k]).abs().max().item() for k in shadows) == 0.0

    # 3. Exact resume under FSDP: step 1's checkpoint, resumed to step 2, gives step 2 bit for bit.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copy(tmp_path / "fsdp" / "checkpoints" / ckpt.checkpoint_name(1), resumed)
    _finish(_torchrun(*_args(data, tmp_path / "resumed", 1, "--set", "parallel=fsdp"), "--resume"))
    _, c, c_state = ckpt.load_latest(resumed)
    assert c_state["step"] == 2 and c_state["lr"] == b_state["lr"] and c_state["data"] == b_state["data"]
    assert c_state["ema"] == b_state["ema"]
    state_keys = [k for k in b if k.startswith(("model.", "ema.", "optim."))]
    assert all(torch.equal(b[k], c[k]) for k in state_keys)  # tolerance 0
