"""Low-memory mode keeps each network near the device (xldm.weights.offload): the second image reads no file,
its pixels equal the resident pipeline's, a changed file is read again and a removed one is a clear error."""

from __future__ import annotations

import os

import pytest
import torch

from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.errors import CorruptCheckpointError
from xldm.pipeline import Pipeline, load
from xldm.request import GenerationRequest
from xldm.weights import io
from xldm.weights.load import load_model
from xldm.weights.offload import MappedPages
from xldm.weights.save import save_single_file

from tiny_models import random_components

PROMPT = "a red heart"
SETTINGS = dict(steps=2, width=64, height=64, seed=3)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def files(tmp_path):
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), tmp_path / "base.safetensors")
    refiner = save_single_file(random_components(TINY_SDXL_REFINER, seed=1), tmp_path / "refiner.safetensors")
    return base, refiner


@pytest.fixture()
def reads(monkeypatch):
    """Counts of tensor data reads and of files opened, by the one safetensors reader (xldm.weights.io)."""
    counts = {"tensors": 0, "opened": 0}
    read, opened = io.Checkpoint._read, io._open_safetensors

    def counting_read(self, *args, **kwargs):
        counts["tensors"] += 1
        return read(self, *args, **kwargs)

    def counting_open(*args, **kwargs):
        counts["opened"] += 1
        return opened(*args, **kwargs)

    monkeypatch.setattr(io.Checkpoint, "_read", counting_read)
    monkeypatch.setattr(io, "_open_safetensors", counting_open)
    return counts


def test_second_image_reads_no_file_and_equals_the_resident_pipeline(files, reads):
    base, refiner = files
    resident = load(base, refiner=refiner, dtype=torch.float32, device="cpu")
    expected = [resident(PROMPT, **dict(SETTINGS, seed=s)).latents for s in (3, 4)]
    pipe = Pipeline(base, refiner, dtype=torch.float32, device="cpu", low_memory=True)
    first = pipe(PROMPT, **SETTINGS).latents
    assert reads["tensors"] > 0
    reads.update(tensors=0)
    second = pipe(PROMPT, **dict(SETTINGS, seed=4)).latents
    assert reads["tensors"] == 0  # every network kept: the files' tensors are not read again
    assert torch.equal(pipe(PROMPT, **SETTINGS).latents, first)  # the kept networks give the same bits again
    # ... and the resident pipeline's latents up to float32 rounding: the mapped weights sit where the file puts
    # them, not 64-byte aligned, and torch's 1x1 convolution then sums in another order (2.4e-7 measured here)
    for got, want in zip((first, second), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert [resident(PROMPT, **SETTINGS).images[0].tobytes()] == [pipe(PROMPT, **SETTINGS).images[0].tobytes()]
    # kept as views of the mapped files (the file's dtype is the one it runs in), one set per network
    assert set(pipe.model._near) == {"text_encoders", "unet"}  # (the refiner's VAE decodes)
    assert set(pipe.refiner._near) == {"text_encoders", "unet", "vae"}
    for handle in (pipe.model, pipe.refiner):
        assert all(kept[2] is not None and kept[2].nbytes > 0 for kept in handle._near.values())


def test_a_network_that_needs_a_cast_is_freed_after_use_and_read_again(files, reads):
    base, _ = files  # an fp32 file run in bf16: no view of the file can serve, so nothing is kept
    pipe = Pipeline(base, dtype=torch.bfloat16, device="cpu", low_memory=True)
    resident = load(base, dtype=torch.bfloat16, device="cpu")
    assert torch.equal(pipe(PROMPT, **SETTINGS).latents, resident(PROMPT, **SETTINGS).latents)
    assert pipe.model.loaded.unet is None and not pipe.model._near
    reads.update(tensors=0)
    pipe(PROMPT, **SETTINGS)
    assert reads["tensors"] > 0


def test_a_changed_file_is_read_again_and_a_removed_one_is_an_error(files, tmp_path):
    base, _ = files
    pipe = Pipeline(base, dtype=torch.float32, device="cpu", low_memory=True)
    pipe(PROMPT, **SETTINGS)
    save_single_file(random_components(TINY_SDXL_BASE, seed=5), base)  # rewritten in place of the old one
    other = load(base, dtype=torch.float32, device="cpu")(PROMPT, **SETTINGS).latents
    assert torch.equal(pipe(PROMPT, **SETTINGS).latents, other)
    os.remove(base)
    with pytest.raises(FileNotFoundError, match="removed after its text_encoders was loaded"):
        pipe(PROMPT, **SETTINGS)


def test_a_changed_file_that_is_no_longer_valid_is_refused_strictly(files, tmp_path):
    base, refiner = files
    pipe = Pipeline(base, dtype=torch.float32, device="cpu", low_memory=True)
    pipe(PROMPT, **SETTINGS)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(base.read_bytes()[:-1000])
    os.replace(truncated, base)
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        pipe(PROMPT, **SETTINGS)
    os.replace(refiner, base)  # another model's file under the same name
    with pytest.raises(ValueError, match="expected 2 text encoder"):
        pipe(PROMPT, **SETTINGS)


def test_released_pages_keep_tensors_written_in_place(files):
    base, _ = files
    unet = load_model(base, components=["unet"], mapped=True).unet
    file_unet = load_model(base, components=["unet"]).unet
    pages = MappedPages([unet], [base])
    if not pages.recorded:
        pytest.skip("no memory-mapped tensors seen on this system (needs Linux /proc/self/maps)")
    weight = unet.out[2].weight
    with torch.no_grad():
        weight.mul_(2)  # as a fused LoRA writes (copy-on-write pages of the private mapping)
    assert pages.release() > 0
    assert torch.equal(weight, file_unet.out[2].weight * 2)  # the write kept
    for (name, p), q in zip(unet.named_parameters(), file_unet.parameters()):
        if not name.startswith("out.2.weight"):
            assert torch.equal(p, q), name  # released pages read back from the file


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_pinned_host_copies_and_one_network_on_the_device(files, reads):
    base, refiner = files
    resident = load(base, refiner=refiner, dtype=torch.float32, device="cuda")
    expected = [resident(PROMPT, **dict(SETTINGS, seed=s)).latents for s in (3, 4)]
    del resident
    pipe = Pipeline(base, refiner, dtype=torch.float32, device="cuda", low_memory=True)
    handles = (pipe.model, pipe.refiner)

    def on_device() -> int:
        return sum(next(m.parameters()).is_cuda for h in handles for m in h.loaded.modules().values())

    during = []
    first = pipe.generate(GenerationRequest(PROMPT, **SETTINGS),
                          callback=lambda *_: during.append(on_device())).latents
    assert during and set(during) == {1}  # only the UNet in use is on the device
    reads.update(tensors=0)
    second = pipe(PROMPT, **dict(SETTINGS, seed=4)).latents
    assert reads["tensors"] == 0
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    for handle in handles:
        for module in handle.loaded.modules().values():
            tensors = [*module.parameters(), *module.buffers()]
            assert all(t.device.type == "cpu" and t.is_pinned() for t in tensors)  # all off the device after use
