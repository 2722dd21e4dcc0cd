"""The diffusion training objective on SDXL's discrete schedule (DDPM, Ho et al. 2020; SDXL paper Sec. 2.5).

For clean latents x0, noise eps and a timestep t in [t_min, t_max] (abar_t from `xldm.diffusion.schedules`,
scaled_linear 0.00085..0.012 over 1000 steps):

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    target = eps                                         (epsilon prediction)
           = sqrt(abar_t) eps - sqrt(1 - abar_t) x0      (v prediction, Salimans & Ho 2022, eq. in App. D)
    loss = mean_b w_b * mean_chw (model(x_t, t, c) - target)^2

with w_b = 1, or min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
Strategy"): SNR = abar / (1 - abar); w = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.

Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): eps += strength * n_bc, one normal draw per sample
and channel broadcast over the pixels; SDXL trains its final multi-aspect stage with 0.05 (paper Sec. 2.5).

Randomness: every sample of every step draws from its own CPU generator seeded by (run seed, step, global
sample index).  The draws then do not depend on the batch split across processes (2 ranks x B == 1 rank x 2B)
nor on anything but the step, so a resumed run draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xldm.conditioning import encode_prompts, vector_conditioning
from xldm.config import ModelConfig
from xldm.diffusion.schedules import alphas_cumprod


def sample_generators(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, step, global index) through numpy's SeedSequence
    (well mixed, so neighbouring steps or indices give unrelated streams)."""
    gens = []
    for index in indices:
        state = np.random.SeedSequence([seed, step, int(index)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


@dataclass
class NoiseDraw:
    """The random choices of one training batch (CPU tensors)."""

    timesteps: Tensor  # (B,) int64 in [t_min, t_max]
    noise: Tensor  # (B, C, H, W) float32, offset noise included
    keep_text: Tensor  # (B,) bool: False = caption dropped (zero context and pooled)
    keep_micro: Tensor  # (B,) bool: False = micro-conditioning embedding dropped


def draw_noise(generators: Sequence[torch.Generator], latent_shape: Sequence[int], *, t_min: int, t_max: int,
               offset_noise: float = 0.0, text_dropout: float = 0.0, micro_dropout: float = 0.0) -> NoiseDraw:
    """Per sample, in a fixed order: timestep, two dropout uniforms, latent noise, per-channel offset.
    Every draw is made whatever the options, so changing one option never shifts the others' streams."""
    channels = latent_shape[0]
    ts, keep_t, keep_m, noises = [], [], [], []
    for g in generators:
        ts.append(torch.randint(t_min, t_max + 1, (1,), generator=g))
        u = torch.rand(2, generator=g)
        keep_t.append(u[0] >= text_dropout)
        keep_m.append(u[1] >= micro_dropout)
        eps = torch.randn(tuple(latent_shape), generator=g)
        offset = torch.randn(channels, generator=g)
        noises.append(eps + offset_noise * offset[:, None, None])  # Guttenberg 2023; SDXL Sec. 2.5: 0.05
    return NoiseDraw(timesteps=torch.cat(ts), noise=torch.stack(noises), keep_text=torch.stack(keep_t),
                     keep_micro=torch.stack(keep_m))


class DiscreteSchedule:
    """abar_t of SDXL's training schedule (same table as `xldm.diffusion.schedules.alphas_cumprod`)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.alphas_cumprod = alphas_cumprod().to(device=device, dtype=torch.float32)

    def _abar(self, timesteps: Tensor) -> Tensor:
        return self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device)][:, None, None, None]

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        abar = self._abar(timesteps)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor, prediction_type: str) -> Tensor:
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v":
            abar = self._abar(timesteps)
            return abar.sqrt() * noise - (1 - abar).sqrt() * x0
        raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {prediction_type!r}")

    def snr(self, timesteps: Tensor) -> Tensor:
        abar = self.alphas_cumprod[timesteps.to(self.alphas_cumprod.device)]
        return abar / (1 - abar)


def min_snr_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Hang et al. 2023, eq. 9-10: min(SNR, gamma)/SNR for epsilon targets, min(SNR, gamma)/(SNR + 1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


def diffusion_loss(prediction: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of (weighted) per-sample MSE, computed in float32."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def micro_ids(config: ModelConfig, batch: dict) -> Tensor:
    """(B, n) micro-conditioning scalars in the model's order (SDXL paper Sec. 2.2; SDXL_SPEC 4): base
    [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; refiner [orig_h, orig_w, crop_top, crop_left,
    aesthetic_score]; all taken from what the data pipeline really did."""
    columns = []
    for name in config.micro_conditioning:
        value = batch[name]
        value = torch.as_tensor(value, dtype=torch.float32)
        columns.append(value.reshape(value.shape[0], -1))
    return torch.cat(columns, dim=1)


def training_conditioning(config: ModelConfig, text_encoders: Sequence, tokenizers: Sequence, batch: dict,
                          keep_text: Tensor, keep_micro: Tensor, *, device: torch.device,
                          train_text_encoders: bool = False, embeddings=None) -> tuple[Tensor, Tensor | None]:
    """(context, vector) for a training batch, with conditioning dropout for classifier-free guidance.

    A dropped caption gives zero context and zero pooled text, the base pipeline's unconditional branch
    (diffusers `force_zeros_for_empty_prompt`); a dropped micro-conditioning zeroes its Fourier embedding, as
    sgm's `ucg_rate` zeroes an embedder's output.  Text encoders run under no_grad unless trained.
    `embeddings`: the captions' `TextEmbeddings` computed already (the latent/text cache, xldm.train.cache).
    """
    emb = embeddings
    if emb is None:
        with torch.set_grad_enabled(train_text_encoders and torch.is_grad_enabled()):
            emb = encode_prompts(text_encoders, tokenizers, config, list(batch["captions"]))
    keep_t = keep_text.to(device=device, dtype=emb.context.dtype)
    context = emb.context.to(device) * keep_t[:, None, None]
    if config.unet.adm_in_channels <= 0:
        return context, None
    pooled = emb.pooled.to(device) * keep_t[:, None]
    vector = vector_conditioning(config, pooled, micro_ids(config, batch).to(device))
    pooled_width = pooled.shape[1]
    keep_m = keep_micro.to(device=device, dtype=vector.dtype)[:, None]
    vector = torch.cat([vector[:, :pooled_width], vector[:, pooled_width:] * keep_m], dim=1)
    return context, vector


__all__ = ["sample_generators", "NoiseDraw", "draw_noise", "DiscreteSchedule", "min_snr_weights",
           "diffusion_loss", "micro_ids", "training_conditioning"]
