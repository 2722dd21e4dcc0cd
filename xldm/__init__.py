"""xldm: Stable Diffusion XL, built from scratch in PyTorch."""

from xldm.config import SD15, SD21, SDXL_BASE, SDXL_REFINER, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "TextEncoderConfig", "UNetConfig", "VAEConfig",
    "SDXL_BASE", "SDXL_REFINER", "SD15", "SD21",
]
