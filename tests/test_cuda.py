"""The CUDA paths, on a GPU only (skipped without CUDA; `benchmarks/gpu.sh` runs them with `-m cuda`).

* the default dtype on CUDA is bf16 where the GPU has it (fp16 elsewhere) and a pipeline made without a dtype
  generates in it, recorded in the image's parameters;
* a fp16 VAE decode that really overflows (activations past fp16's 65504) is redone in float32 by
  `decode_checked`, giving the float32 image, and the VAE gets its fp16 weights back;
* attention runs on the fused SDPA kernels torch picks on a GPU: forced to flash attention (bf16, where the GPU
  has it) and to memory-efficient attention, xldm's UNet attention, its VAE attention and its causal CLIP attention
  find a kernel (a layout those kernels refuse raises "No available kernel") and agree with the math kernel;
* `torch.compile` of the UNet (`compile_unet`) gives the eager output on CUDA.
Tiny random models; each test a few seconds on a GPU (the compile one about a minute).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from xldm.config import TINY_CLIP_L, TINY_SDXL_BASE, TINY_VAE
from xldm.models.clip import CLIPTextModel
from xldm.models.layers import Attention
from xldm.models.unet import UNet, compile_unet
from xldm.models.vae import AutoencoderKL
from xldm.devices import default_dtype
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.vae_tiling import decode_checked, latents_are_finite

from tiny_models import random_components

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module.eval()


def test_default_dtype_on_cuda_is_bf16_where_the_gpu_has_it_and_the_pipeline_runs_in_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert default_dtype(CUDA) == expected
    assert default_dtype(CUDA, unet_parameters=1000) == expected  # the UNet's size matters on a CPU only
    pipe = Pipeline(random_components(TINY_SDXL_BASE, seed=0), device="cuda")
    assert pipe.dtype == expected and pipe.dtype_chosen
    assert next(pipe.model.loaded.unet.parameters()).device.type == "cuda"
    result = pipe.generate(GenerationRequest(prompt="a red apple", steps=2, width=64, height=64, seed=1))
    assert result.latents.dtype == expected and result.latents.device.type == "cuda"
    assert result.params[0]["dtype"] == {torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]
    assert result.images[0].size == (64, 64)


def test_fp16_vae_overflow_is_decoded_again_in_float32():
    vae = randomized(AutoencoderKL(TINY_VAE), seed=3).to(CUDA)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e4)  # weights fit fp16; activations ~1e5 do not (its max is 65504)
    latents = 4 * torch.randn(1, TINY_VAE.z_channels, 8, 8, generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        expected = vae.decode_latents(latents)  # float32
    assert latents_are_finite(expected)
    half = copy.deepcopy(vae).half()
    with torch.no_grad():
        assert not latents_are_finite(half.decode_latents(latents.half()))  # a real overflow, not a simulated one
    before = {k: v.clone() for k, v in half.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        image = decode_checked(half, latents)
    assert image.dtype == torch.float32 and latents_are_finite(image)
    # the same fp16-rounded weights in float32: close to the float32 VAE's image
    assert (image - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 1e-3
    assert all(v.dtype == torch.float16 and torch.equal(v, before[k]) for k, v in half.state_dict().items())


def _flash_available() -> bool:
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability() >= (8, 0)


BACKENDS = [pytest.param(SDPBackend.FLASH_ATTENTION, torch.bfloat16, id="flash-bf16",
                         marks=pytest.mark.skipif(not torch.cuda.is_available() or not _flash_available(),
                                                  reason="no flash attention on this GPU")),
            pytest.param(SDPBackend.EFFICIENT_ATTENTION, torch.bfloat16, id="efficient-bf16"),
            pytest.param(SDPBackend.EFFICIENT_ATTENTION, torch.float32, id="efficient-fp32")]


@pytest.mark.parametrize("backend, dtype", BACKENDS)
@torch.no_grad()
def test_attention_finds_the_fused_sdpa_kernels_and_matches_math(backend, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    cross = randomized(Attention(320, heads=5, head_dim=64, context_dim=2048), seed=1).to(CUDA, dtype)
    self_attn = randomized(Attention(320, heads=5, head_dim=64), seed=2).to(CUDA, dtype)
    x = torch.randn(2, 1024, 320, device=CUDA, dtype=dtype)
    context = torch.randn(2, 77, 2048, device=CUDA, dtype=dtype)
    clip = randomized(CLIPTextModel(TINY_CLIP_L), seed=3).to(CUDA, dtype)
    ids = torch.randint(0, TINY_CLIP_L.vocab_size, (2, TINY_CLIP_L.max_positions), device=CUDA)
    runs = {"unet cross-attention": lambda: cross(x, context), "unet self-attention": lambda: self_attn(x),
            "clip causal attention": lambda: clip(ids).pooled}
    for name, run in runs.items():
        with sdpa_kernel(SDPBackend.MATH):
            reference = run().float()
        with sdpa_kernel(backend):
            found = run().float()
        scale = reference.abs().max().item()
        assert (found - reference).abs().max().item() <= tol * max(scale, 1.0), name


@torch.no_grad()
def test_vae_attention_runs_on_a_fused_kernel():
    """The VAE's single-head mid-block attention (head dim = the VAE's width) on memory-efficient attention."""
    vae = randomized(AutoencoderKL(TINY_VAE), seed=4).to(CUDA, torch.bfloat16)
    z = torch.randn(1, TINY_VAE.z_channels, 16, 16, device=CUDA, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.MATH):
        reference = vae.decode(z).float()
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        found = vae.decode(z).float()
    assert (found - reference).abs().max().item() <= 5e-2 * max(reference.abs().max().item(), 1.0)


@torch.no_grad()
def test_compiled_unet_matches_eager_on_cuda():
    config = TINY_SDXL_BASE.unet
    unet = randomized(UNet(config), seed=5).to(CUDA)
    x = torch.randn(2, config.in_channels, 8, 8, device=CUDA)
    t = torch.tensor([500.0, 20.0], device=CUDA)
    context = torch.randn(2, 77, config.context_dim, device=CUDA)
    y = torch.randn(2, config.adm_in_channels, device=CUDA)
    eager = unet(x, t, context, y)
    seconds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor's own notes
        compiled = compile_unet(unet, seconds.append)(x, t, context, y)
    assert len(seconds) == 1 and seconds[0] > 0
    assert (compiled - eager).abs().max().item() <= 1e-3 * max(eager.abs().max().item(), 1.0)
    again = unet(x, t, context, y)  # the compiled graph again: timed once only
    assert len(seconds) == 1 and (again - compiled).abs().max().item() <= 1e-5 * max(eager.abs().max().item(), 1.0)
