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
from torch import Tensor



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


__all__ = ["sample_generators", "NoiseDraw", "draw_noise"]
