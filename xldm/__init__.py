"""xldm: Stable Diffusion XL, built from scratch in PyTorch."""

from xldm.config import SD15, SD21, SDXL_BASE, SDXL_REFINER, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"


def load(path, refiner=None, *, dtype=None, device=None, low_memory=False, quantize=None):
    """A generation pipeline for a single-file checkpoint or diffusers folder (see `xldm.pipeline.load`):
    `pipe = xldm.load("sd_xl_base_1.0.safetensors"); pipe("a red apple", seed=1).images[0]`."""
    from xldm.pipeline import load as _load

    return _load(path, refiner, dtype=dtype, device=device, low_memory=low_memory, quantize=quantize)

__all__ = [
    "load", "ModelConfig", "TextEncoderConfig", "UNetConfig", "VAEConfig",
    "SDXL_BASE", "SDXL_REFINER", "SD15", "SD21",
]
