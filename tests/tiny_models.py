"""Tiny random models shared by the tests (SDXL structure, small widths)."""

from __future__ import annotations

import torch

from xldm.models.clip import CLIPTextModel
from xldm.models.components import Components
from xldm.models.unet import UNet
from xldm.models.vae import AutoencoderKL


def random_components(config, seed: int = 0, scale: float = 0.05) -> Components:
    """All networks of `config` with every tensor random (some layers are zero-initialised by design;
    random values everywhere mean a wrong key map or a skipped layer cannot hide)."""
    torch.manual_seed(seed)
    model = Components(
        config=config,
        unet=UNet(config.unet),
        vae=AutoencoderKL(config.vae),
        text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders),
    )
    with torch.no_grad():
        for module in model.modules().values():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * scale)
            module.eval()
    return model.to(dtype=torch.float32)
