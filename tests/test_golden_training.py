"""Golden weights of the training presets (issue 12): two steps of every preset the bundled models were trained
with give final weights whose SHA-256 is pinned in tests/golden/training.json, so that a change to the training
code which would no longer reproduce the shipped weights is caught (the same data, seed and settings must give
the same weights bit for bit).  Written with XLDM_WRITE_GOLDEN=1; compared only on the torch build and CPU
kernel family recorded there (float sums may round differently elsewhere)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xldm.train.cli import main as train_main

GOLDEN = Path(__file__).parent / "golden" / "training.json"
WRITE = os.environ.get("XLDM_WRITE_GOLDEN") == "1"

pytestmark = pytest.mark.usefixtures("one_thread")

# preset -> (extra flags, final file); "{init_*}" names the final file of an earlier preset in this module
CASES = {
    "default-clip": ([], "model.safetensors"),
    "default-vae": ([], "model.safetensors"),
    "default-base": ([], "model.safetensors"),
    "default-refiner": ([], "model.safetensors"),
    "default-base-ft": (["--init", "{init_default-base}", "--set", "cache_dir={cache}"], "model.safetensors"),
    "default-refiner-ft": (["--init", "{init_default-refiner}", "--set", "cache_dir={cache}"], "model.safetensors"),
    "cascade-base-32": ([], "stage.safetensors"),
    "cascade-sr-64": ([], "stage.safetensors"),
    "cascade-sr-128": ([], "stage.safetensors"),
}


def _meta() -> dict:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def weights_digest(path: Path) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def recorded():
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.mark.parametrize("preset", list(CASES))
def test_two_steps_of_the_preset_give_the_golden_weights(preset, images, runs, recorded):
    flags, final = CASES[preset]
    subs = {"{cache}": str(runs / f"cache-{preset}")}
    for name in CASES:
        subs[f"{{init_{name}}}"] = str(runs / name / "final" / CASES[name][1])
    flags = [subs.get(f, f) if not f.startswith("cache_dir=") else f"cache_dir={subs['{cache}']}" for f in flags]
    out = runs / preset
    assert train_main(["--preset", preset, "--data", str(images), "--out", str(out), "--steps", "2",
                       "--batch-size", "2", "--no-progress", *flags]) == 0
    # every weight file of the export (the contrastive run also writes its evaluator)
    digest = ",".join(weights_digest(p) for p in sorted((out / "final").glob("*.safetensors")))
    if WRITE:
        recorded.setdefault("meta", _meta())
        recorded[preset] = digest
        GOLDEN.write_text(json.dumps(recorded, indent=1) + "\n")
        return
    if recorded.get("meta") != _meta():
        pytest.skip(f"golden weights were recorded on {recorded.get('meta')}, this is {_meta()}")
    assert digest == recorded[preset]
