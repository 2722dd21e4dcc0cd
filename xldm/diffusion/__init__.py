"""Diffusion math as pure functions (k-diffusion style): schedules, denoisers and samplers that reproduce the
diffusers schedulers at SDXL's settings (see `schedules` and `samplers` for which matches which)."""

from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.noise import randn
from xldm.diffusion.samplers import (SAMPLERS, sample, sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler,
                                     sample_euler_ancestral, sample_heun, sample_unipc)
from xldm.diffusion.schedules import (SAMPLER_NAMES, Schedule, alphas_cumprod, img2img_start, make_schedule,
                                      refiner_start, split_for_refiner)

__all__ = ["Denoiser", "randn", "SAMPLERS", "sample", "sample_ddim", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_unipc", "SAMPLER_NAMES", "Schedule",
           "alphas_cumprod", "img2img_start", "make_schedule", "refiner_start", "split_for_refiner"]
