"""Weight-only int8 (xldm.models.quantize): close to the float UNet, a quarter of fp32's weight bytes, recorded in
the image's parameters, composed with unfused LoRA and with low-memory mode; a bad value is a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE
from xldm.models.quantize import Int8Conv2d, Int8Linear, quantize_weights, weight_bytes
from xldm.pipeline import Pipeline, load
from xldm.pngmeta import format_a1111_parameters
from xldm.weights.save import save_single_file

from lora_files import random_lora, save_kohya
from tiny_models import random_components

PROMPT = "a red heart"
SETTINGS = dict(steps=2, width=64, height=64, seed=3)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "base.safetensors"
    return save_single_file(random_components(TINY_SDXL_BASE, seed=0), path)


def unet_inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = config.unet
    return (torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([999.0, 250.0]),
            torch.randn(2, 77, cfg.context_dim, generator=g), torch.randn(2, cfg.adm_in_channels, generator=g))


def test_quantized_unet_is_close_to_the_float_one():
    model = random_components(TINY_SDXL_BASE, seed=0)
    inputs = unet_inputs(TINY_SDXL_BASE)
    with torch.no_grad():
        want = model.unet(*inputs)
        replaced = quantize_weights(model.unet)
        got = model.unet(*inputs)
    assert replaced > 20
    assert not any(type(m) in (nn.Linear,) for m in model.unet.modules())  # every Linear quantized
    assert any(isinstance(m, Int8Conv2d) for m in model.unet.modules())  # and the 1x1 convolutions
    assert all(m.kernel_size != (1, 1) for m in model.unet.modules() if type(m) is nn.Conv2d)
    # per-row int8 rounds each weight by at most half a step (max|row| / 254); through the tiny UNet's random
    # weights the output moves by 0.16 % of its spread (measured: 0.0016 RMS over the output's std, 0.0026 max
    # over its max), so the bounds below hold it to 3x that
    error = (got - want).float()
    assert error.pow(2).mean().sqrt() / want.std() < 0.005
    assert error.abs().max() / want.abs().max() < 0.008


def test_int8_weights_take_a_quarter_of_fp32s_bytes():
    layer = nn.Linear(256, 512)
    fp32 = layer.weight.numel() * 4
    quantized = Int8Linear(layer)
    assert quantized.qweight.dtype == torch.int8 and quantized.qweight.numel() * 1 == fp32 // 4
    counted = weight_bytes(nn.Sequential(quantized))["weights"]
    assert counted == fp32 // 4 + 512 * 4  # int8 values + one fp32 scale per output row
    assert counted / fp32 == pytest.approx(0.25 + 1 / 256)
    model = random_components(TINY_SDXL_BASE, seed=0)
    before = weight_bytes(model.unet)
    quantize_weights(model.unet)
    after = weight_bytes(model.unet)
    assert after["other"] == before["other"]  # (3x3 convolutions, norms and biases keep their dtype)
    assert after["weights"] / before["weights"] < 0.25 + 1 / 32  # the tiny UNet's rows have >= 32 inputs
    # the dequantized weight is within half a step of the float one, per row
    w = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]
    linear = nn.Linear(32, 64)
    with torch.no_grad():
        linear.weight.copy_(w)
    q = Int8Linear(linear)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.weight - w).abs() <= step / 2 + 1e-7).all()


def test_the_image_records_it_and_low_memory_gives_the_same_bits(base):
    pipe = load(base, dtype=torch.float32, device="cpu", quantize="int8")
    result = pipe(PROMPT, **SETTINGS)
    assert result.params[0]["quantize"] == "int8"
    assert "Quantization: int8" in format_a1111_parameters(result.params[0])
    plain = load(base, dtype=torch.float32, device="cpu")(PROMPT, **SETTINGS)
    assert "quantize" not in plain.params[0]
    assert not torch.equal(plain.latents, result.latents)
    low = Pipeline(base, dtype=torch.float32, device="cpu", low_memory=True, quantize="int8")
    first = low(PROMPT, **SETTINGS).latents
    assert torch.equal(low(PROMPT, **SETTINGS).latents, first)  # the int8 UNet kept, not quantized again
    torch.testing.assert_close(first, result.latents, rtol=0, atol=1e-5)  # (mapped vs read: tests/test_low_memory.py)
    assert any(isinstance(m, Int8Linear) for m in low.model.loaded.unet.modules())


def test_unfused_lora_composes_and_fused_is_refused(base, tmp_path):
    lora = tmp_path / "style.safetensors"
    save_kohya(lora, TINY_SDXL_BASE, random_lora(TINY_SDXL_BASE, seed=2, text=False))
    pipe = load(base, dtype=torch.float32, device="cpu", quantize="int8")
    without = pipe(PROMPT, **SETTINGS).latents
    with_lora = pipe(PROMPT, **SETTINGS, loras=((lora, 1.0),)).latents
    float_pipe = load(base, dtype=torch.float32, device="cpu")
    float_delta = float_pipe(PROMPT, **SETTINGS, loras=((lora, 1.0),)).latents - float_pipe(PROMPT, **SETTINGS).latents
    # the LoRA moves the int8 model's output as it moves the float one's
    delta = with_lora - without
    assert delta.abs().max() > 0.01
    assert (delta - float_delta).pow(2).mean().sqrt() < 0.2 * float_delta.pow(2).mean().sqrt()
    pipe.load_lora(lora)
    with pytest.raises(ValueError, match="weights are int8-quantized and cannot take a fused LoRA"):
        pipe.fuse_loras()
    pipe.model.loras.fused = True  # (past the pipeline's check: the layer refuses it too)
    with pytest.raises(ValueError, match="cannot be fused into int8-quantized weights"):
        pipe(PROMPT, **SETTINGS)


def test_a_bad_value_is_a_clear_error(base, capsys):
    with pytest.raises(ValueError, match=r"quantize must be one of int8 \(or None for none\), got 'int4'"):
        Pipeline(base, dtype=torch.float32, device="cpu", quantize="int4")
    with pytest.raises(SystemExit):
        cli_main(["generate", PROMPT, "--model", str(base), "--quantize", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err
