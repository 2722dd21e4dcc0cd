"""The dtype chosen for the hardware (`xldm.devices.default_dtype`), how it is said and recorded, and the
`--compile` option, on tiny random models.  The CUDA side is in tests/test_cuda.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import xldm.devices as devices_module
from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE
from xldm.devices import CPU_BF16_MIN_UNET_PARAMETERS, cpu_has_native_bf16, default_dtype, dtype_reason, unet_parameters
from xldm.pipeline import Pipeline
from xldm.pngmeta import parse_a1111_parameters, png_text, read_png_text
from xldm.weights.save import save_single_file

from tiny_models import random_components

CPU = torch.device("cpu")
SDXL_UNET_PARAMETERS = 2_567_463_684  # the released SDXL base UNet (README "Benchmarks", train_step.py estimate)
pytestmark = pytest.mark.usefixtures("one_thread")


def fake_cpu(monkeypatch, *, avx512_bf16: bool | None, amx: bool | None = False) -> None:
    """torch's CPU feature checks as given; None: this torch has no such check."""
    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True),
                                                        (False, False, False), (None, True, True)])
def test_native_bf16_from_torch_checks(monkeypatch, avx512_bf16, amx, expected) -> None:
    fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                             ("fpu avx512f avx512_vnni", False)])
def test_native_bf16_from_cpuinfo_when_torch_cannot_say(monkeypatch, tmp_path, flags, expected) -> None:
    fake_cpu(monkeypatch, avx512_bf16=None, amx=None)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_path = devices_module.Path
    monkeypatch.setattr(devices_module, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert cpu_has_native_bf16() is expected


def test_default_dtype_on_cpu_depends_on_bf16_support_and_unet_size(monkeypatch) -> None:
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert default_dtype(CPU, SDXL_UNET_PARAMETERS) == torch.bfloat16
    assert default_dtype(CPU, CPU_BF16_MIN_UNET_PARAMETERS) == torch.bfloat16
    assert default_dtype(CPU, CPU_BF16_MIN_UNET_PARAMETERS - 1) == torch.float32  # small: overhead-bound
    assert default_dtype(CPU, None) == torch.float32  # size unknown
    assert default_dtype(torch.device("meta"), SDXL_UNET_PARAMETERS) == torch.float32
    fake_cpu(monkeypatch, avx512_bf16=False)
    assert default_dtype(CPU, SDXL_UNET_PARAMETERS) == torch.float32


def test_dtype_reason_says_why(monkeypatch) -> None:
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert dtype_reason(CPU, torch.bfloat16, chosen=True) == "dtype: bf16 (CPU has AVX512-BF16)"
    assert "under 100 M parameters" in dtype_reason(CPU, torch.float32, chosen=True)
    assert dtype_reason(CPU, torch.float16, chosen=False) == "dtype: fp16 (as asked)"
    fake_cpu(monkeypatch, avx512_bf16=False, amx=True)
    assert dtype_reason(CPU, torch.bfloat16, chosen=True) == "dtype: bf16 (CPU has AMX)"
    fake_cpu(monkeypatch, avx512_bf16=False)
    assert dtype_reason(CPU, torch.float32, chosen=True) == "dtype: fp32 (CPU has no native bf16)"


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    return save_single_file(random_components(TINY_SDXL_BASE, seed=0),
                            tmp_path_factory.mktemp("models") / "base.safetensors")


def test_unet_parameters_from_file_header_and_loaded_networks(base_file) -> None:
    components = random_components(TINY_SDXL_BASE, seed=0)
    count = sum(p.numel() for p in components.unet.parameters())
    assert unet_parameters(base_file) == count == unet_parameters(components)
    assert count < CPU_BF16_MIN_UNET_PARAMETERS


def test_pipeline_picks_bf16_for_a_large_unet_and_records_it(monkeypatch, base_file) -> None:
    """With the threshold lowered the tiny model counts as large: the pipeline runs in bf16, the params say so in
    the xldm JSON chunk only (A1111 has no key), and the A1111 line still parses."""
    fake_cpu(monkeypatch, avx512_bf16=True)
    small = Pipeline(base_file, device="cpu")
    assert small.dtype == torch.float32 and small.dtype_chosen
    monkeypatch.setattr(devices_module, "CPU_BF16_MIN_UNET_PARAMETERS", 1)
    pipe = Pipeline(base_file, device="cpu")
    assert pipe.dtype == torch.bfloat16
    result = pipe("a red heart", steps=2, width=64, height=64, seed=3)
    assert next(pipe.model.loaded.unet.parameters()).dtype == torch.bfloat16  # (loaded on use)
    assert result.params[0]["dtype"] == "bf16"
    text = png_text(result.params[0])
    assert json.loads(text["xldm"])["dtype"] == "bf16"
    fields = parse_a1111_parameters(text["parameters"])
    assert fields["Steps"] == "2" and not any("bf16" in v for v in fields.values())
    reference = small("a red heart", steps=2, width=64, height=64, seed=3)
    assert "dtype" not in reference.params[0]  # fp32 images keep their metadata as before
    a, b = (np.asarray(r.images[0], dtype=np.float64) for r in (reference, result))
    assert 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)) > 25  # same image, bf16 rounding apart
    assert Pipeline(base_file, device="cpu", dtype=torch.float32).dtype == torch.float32  # an explicit dtype wins


def test_cli_prints_the_dtype_choice(monkeypatch, base_file, tmp_path, capsys) -> None:
    fake_cpu(monkeypatch, avx512_bf16=True)
    out = tmp_path / "a.png"
    assert cli_main(["generate", "a red heart", "--model", str(base_file), "--steps", "2", "--width", "64",
                     "--height", "64", "--device", "cpu", "--out", str(out)]) == 0
    assert "dtype: fp32 (the UNet is under 100 M parameters: bf16 would not be faster)" in capsys.readouterr().err
    assert "dtype" not in json.loads(read_png_text(out)["xldm"])
    assert cli_main(["generate", "a red heart", "--model", str(base_file), "--steps", "2", "--width", "64",
                     "--height", "64", "--device", "cpu", "--dtype", "bf16", "--out", str(out), "--force"]) == 0
    assert "dtype: bf16 (as asked)" in capsys.readouterr().err
    assert json.loads(read_png_text(out)["xldm"])["dtype"] == "bf16"


@pytest.mark.slow  # inductor compiles C++ for the UNet: tens of seconds on 2 cores
def test_compile_gives_the_same_image_and_reports_the_compile_time(base_file, tmp_path, capsys) -> None:
    settings = dict(steps=2, width=64, height=64, seed=5)
    plain = Pipeline(base_file, device="cpu", dtype=torch.float32)("a red heart", **settings)
    compiled = Pipeline(base_file, device="cpu", dtype=torch.float32, compile=True)
    result = compiled("a red heart", **settings)
    assert len(compiled.compile_seconds) == 1 and compiled.compile_seconds[0] > 0
    assert getattr(compiled.model.loaded.unet, "compiled", False)
    assert "unet.input_blocks.0.0.weight" not in dict(compiled.model.loaded.unet.named_parameters())  # names kept
    assert "input_blocks.0.0.weight" in dict(compiled.model.loaded.unet.named_parameters())
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (plain, result))
    assert np.abs(a - b).max() <= 2
    out = tmp_path / "c.png"
    assert cli_main(["generate", "a red heart", "--model", str(base_file), "--steps", "2", "--width", "64",
                     "--height", "64", "--device", "cpu", "--compile", "--out", str(out)]) == 0
    assert "compile: the UNet's first call took" in capsys.readouterr().err


def test_server_chooses_per_model_like_generate_and_keeps_an_explicit_dtype(monkeypatch, base_file) -> None:
    """`xldm serve` without --dtype runs each model in the dtype `xldm generate` would pick for it (from its UNet's
    size in the file header), reloading a cached model whose dtype no longer fits; --dtype wins over both."""
    from xldm.serve.jobs import ModelStore

    fake_cpu(monkeypatch, avx512_bf16=True)
    store = ModelStore([base_file], device="cpu")
    name = base_file.name
    assert store.dtype_for(name) == torch.float32
    assert store.pipeline(name, None).dtype == torch.float32
    monkeypatch.setattr(devices_module, "CPU_BF16_MIN_UNET_PARAMETERS", 1)
    store._pipeline = None  # the settings are the same; the cached pipeline would be kept otherwise
    pipe = store.pipeline(name, None)
    assert store.dtype_for(name) == torch.bfloat16 == pipe.dtype
    assert next(pipe.model.loaded.unet.parameters()).dtype == torch.bfloat16
    assert ModelStore([base_file], device="cpu", dtype=torch.float32).dtype_for(name) == torch.float32
