"""The denoiser: what a network's raw output means, settled once for sampling and for training.

One `Denoiser` per parameterisation, as k-diffusion's `external.py` (`DiscreteEpsDDPMDenoiser`, `VDenoiser`): it
turns the output into the clean sample for the samplers, D(x, sigma, t) -> x0 (Karras et al. 2022, Sec. 2), and
gives the training target and loss on SDXL's discrete schedule (DDPM, Ho et al. 2020; SDXL paper Sec. 2.5):

    sampling (VE, x = x0 + sigma eps, network input x / sqrt(sigma^2 + 1)):
        epsilon  x0 = x - sigma * out                      (float32, as diffusers EulerDiscreteScheduler.step)
        v        x0 = x / (sigma^2 + 1) - out * sigma / sqrt(sigma^2 + 1)   (Salimans & Ho 2022, in VE terms)
        x0       x0 = out
    training (VP, abar_t of `schedules.alphas_cumprod`):
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        target = eps | sqrt(abar_t) eps - sqrt(1 - abar_t) x0 | x0
        loss = mean_b w_b * mean_chw (out - target)^2, w_b = 1 or min-SNR-gamma (Hang et al. 2023, eq. 9-10)"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from xldm.config import PREDICTION_TYPES
from xldm.diffusion.schedules import alphas_cumprod

ModelOutputFn = Callable[[Tensor, Tensor], Tensor]
"""f(x_in, t) -> raw network output for the scaled input x_in = x / sqrt(sigma^2 + 1) at model time t."""


def scale_input(x: Tensor, sigma: Tensor) -> Tensor:
    """The network's input x / sqrt(sigma^2 + 1), the VP sample (diffusers Euler-family `scale_model_input`)."""
    return x / ((sigma**2 + 1) ** 0.5)


class Denoiser:
    """`Denoiser(prediction_type, model_fn)(x, sigma, t) -> x0` for the samplers; `noised`, `target` and `loss`
    for training (`model_fn` is then not needed: the training loop calls the network itself)."""

    def __init__(self, prediction_type: str, model_fn: ModelOutputFn | None = None) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.model_fn = model_fn
        self._abar: dict[torch.device, Tensor] = {}

    def __call__(self, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
        out = self.model_fn(scale_input(x, sigma), t)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for a sample of shape {tuple(x.shape)}")
        return self.denoised(x, sigma, out)

    def denoised(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        x = x.float()
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        return out.float()

    def alphas_cumprod(self, device: torch.device) -> Tensor:
        if device not in self._abar:
            self._abar[device] = alphas_cumprod().to(device=device, dtype=torch.float32)
        return self._abar[device]

    def _abar_at(self, timesteps: Tensor, device: torch.device) -> Tensor:
        return self.alphas_cumprod(device)[timesteps.to(device)][:, None, None, None]

    def noised(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        abar = self._abar_at(timesteps, x0.device)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def x0_from_output(self, x_t: Tensor, out: Tensor, timesteps: Tensor) -> Tensor:
        """The clean sample the network's output at VP sample x_t implies (the inverse of `target`), float32."""
        abar = self._abar_at(timesteps, x_t.device)
        x_t, out = x_t.float(), out.float()
        if self.prediction_type == "epsilon":
            return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        if self.prediction_type == "v":
            return abar.sqrt() * x_t - (1 - abar).sqrt() * out
        return out

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v":
            abar = self._abar_at(timesteps, x0.device)
            return abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return x0

    def min_snr_weights(self, timesteps: Tensor, gamma: float, device: torch.device) -> Tensor:
        """Hang et al. 2023, eq. 9-10: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v), min(SNR, gamma) (x0)."""
        abar = self.alphas_cumprod(device)[timesteps.to(device)]
        snr = abar / (1 - abar)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        return clipped / (snr + 1) if self.prediction_type == "v" else clipped

    def loss(self, prediction: Tensor, x0: Tensor, noise: Tensor, timesteps: Tensor,
             min_snr_gamma: float = 0.0) -> Tensor:
        """Mean over the batch of the (min-SNR weighted) per-sample MSE to the target, in float32."""
        target = self.target(x0, noise, timesteps)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if min_snr_gamma > 0:
            per_sample = per_sample * self.min_snr_weights(timesteps, min_snr_gamma, x0.device).to(per_sample)
        return per_sample.mean()
