"""Classifier-free guidance (Ho & Salimans 2022) around a conditional network.

The network runs once on the CFG batch [negative..., positive...] and the outputs are combined as
`u + g * (c - u)` on the raw network output (eps or v), exactly as diffusers' SDXL pipelines do.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def guided_model_fn(network: nn.Module, context: torch.Tensor, vector: torch.Tensor | None, cfg: float,
                    extra_channels: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x_in, t) -> guided network output, for `xldm.diffusion.denoiser.model_denoiser`.

    `context` / `vector` hold the CFG batch [negative, positive] when `cfg > 1`, else the positive half only.
    `extra_channels` (same batch as the network input) are concatenated after the sample along channels:
    the mask and masked-image latents of a 9-channel inpainting UNet, or the upsampled low-resolution image
    of a cascade super-resolution stage.  `cfg <= 1` runs the network once, unguided.
    """
    guided = cfg > 1
    dtype = next(network.parameters()).dtype

    def fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x_in] * 2) if guided else x_in
        if extra_channels is not None:
            if extra_channels.shape[0] != x.shape[0] or extra_channels.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"extra input channels {tuple(extra_channels.shape)} do not match the network "
                                 f"input {tuple(x.shape)} in batch and size")
            x = torch.cat([x, extra_channels.to(x.dtype)], dim=1)
        out = network(x.to(dtype), t, context, vector)
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + cfg * (text - uncond)
        return out

    return fn


__all__ = ["guided_model_fn"]
