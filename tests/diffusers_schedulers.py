"""The diffusers scheduler for each xldm sampler, built from SDXL's scheduler config (schedule and sampler tests)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
DIFFUSERS_SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler,
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "dpmpp_sde_karras": (DPMSolverSDEScheduler, {"use_karras_sigmas": True}),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_karras": (DPMSolverMultistepScheduler,
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
}
VP_SAMPLERS = ("dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "ddim", "unipc", "dpmpp_3m_sde",
               "dpmpp_3m_sde_karras", "lcm")
