"""Denoisers: a network's raw output turned into a prediction of the clean latents, D(x, sigma) -> x0.

Samplers only ever see a denoiser (Karras et al. 2022, sec. 2; k-diffusion); whether the network predicts
noise (eps) or velocity (v) is settled here, once.  Classifier-free guidance lives in `model_output_fn`.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""D(x, sigma, t) -> x0: x in VE coordinates at noise level sigma (0-d float32 tensor), t the model time
(0-d float32 tensor) passed to the network."""

ModelOutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""f(x_in, t) -> raw network output (eps or v) for the scaled input x_in = x / sqrt(sigma^2 + 1)."""


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network's input x / sqrt(sigma^2 + 1): unit variance, and equal to the VP sample
    (diffusers `scale_model_input` of the Euler-family schedulers)."""
    return x / ((sigma**2 + 1) ** 0.5)


def model_denoiser(model_output_fn: ModelOutputFn, prediction_type: str) -> Denoiser:
    """Wrap a network into D(x, sigma, t).

    epsilon:       x0 = x - sigma * eps               (in float32, as diffusers EulerDiscreteScheduler.step)
    v_prediction:  x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
                   (Salimans & Ho 2022 v = alpha * eps - sigma_vp * x0, rewritten in VE coordinates; the same
                   expression diffusers' Euler step uses)
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")

    def denoise(x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_output_fn(scale_input(x, sigma), t)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for a sample of shape {tuple(x.shape)}")
        x = x.float()
        if prediction_type == "epsilon":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)

    return denoise
