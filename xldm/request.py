"""What decides an image: `GenerationRequest` (every setting, defaults shared with the CLI and the server), its
`GenerationResult`, and the helpers that read a request alone (sampler options, the LoRAs it names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from xldm.config import GENERATE_DEFAULTS
from xldm.diffusion.samplers import CHURN_DEFAULTS
from xldm.lora import LoraUse, parse_lora_tags, resolve_lora_name


MAX_SEED = 2**32 - 1
PREDICTION_ALIASES = {"eps": "epsilon"}


class Interrupted(Exception):
    """Raised from a step callback to stop a generation after the current step."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image.  Sizes are (width, height); crops are (top, left).  The defaults are
    `xldm.config.GENERATE_DEFAULTS`, shared with the CLI and the server."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = GENERATE_DEFAULTS["steps"]
    cfg: float = GENERATE_DEFAULTS["cfg"]
    seed: int | None = None
    sampler: str = GENERATE_DEFAULTS["sampler"]
    batch: int = 1
    # img2img / SDEdit / inpainting
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float | None = None  # default: 0.3 (img2img, diffusers), 0.9999 (inpaint, diffusers)
    mask: Image.Image | None = field(default=None, repr=False)
    # base -> refiner hand-off (diffusers denoising_end / denoising_start)
    refiner_start: float | None = None  # default 0.8 when a refiner is used
    # SDXL micro-conditioning (SDXL paper, Sec. 2.2); None = the image size
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # refiner only (diffusers StableDiffusionXLImg2ImgPipeline defaults)
    negative_aesthetic_score: float = 2.5
    # prompt handling: A1111's by default (75-token chunks, "(word:1.2)" and BREAK); "truncate" / False: diffusers'
    long_prompts: str = GENERATE_DEFAULTS["long_prompts"]
    weighting: bool = GENERATE_DEFAULTS["weighting"]
    tile_vae: bool | None = None  # None: tiled VAE decode and encode only when the image is large
    # LoRA / LyCORIS files on the main model: (path, weight[, text-encoder weight]) or LoraUse, with those the
    # prompt names in <lora:NAME:WEIGHT> tags (files in the pipeline's lora_dir; the tags are not encoded)
    loras: tuple = ()
    # ControlNets on the main model (xldm.controlnet.ControlUnit), applied in order, their residuals summed
    controlnets: tuple = ()
    clip_skip: int | None = None  # A1111 "Clip skip": 1 = the model's own layer, 2 = one earlier, ...
    # which training timesteps the schedule visits (diffusers timestep_spacing; "trailing" = A1111 "SGM Uniform",
    # what few-step distilled models such as SDXL Turbo / Lightning expect); lcm and *_karras have their own
    timestep_spacing: str = GENERATE_DEFAULTS["timestep_spacing"]
    # the main model's parameterisation and training schedule; None = the model's own (its config, or the
    # single file's `v_pred` / `ztsnr` marker keys)
    prediction: str | None = None  # "epsilon" ("eps"), "v" or "x0"
    zero_terminal_snr: bool | None = None
    # hires fix (A1111 "Hires. fix", xldm.hires): on when hires_scale or hires_size is given; a txt2img pass at
    # width x height, an upscale, an img2img pass at hires_strength over hires_steps (None: steps)
    hires_scale: float | None = None
    hires_size: tuple[int, int] | None = None  # (width, height); one side 0: from the aspect ratio
    hires_upscaler: str = GENERATE_DEFAULTS["hires_upscaler"]  # xldm.hires.UPSCALERS
    hires_strength: float = GENERATE_DEFAULTS["hires_strength"]
    hires_steps: int | None = None
    # sampler options (xldm.diffusion.samplers.check_sampler_options): the noise-adding samplers' eta (None: the
    # sampler's own, ETA_DEFAULTS), Euler's churn (Karras et al. 2022, Alg. 2; diffusers EulerDiscreteScheduler)
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    # algorithmic speed-ups (xldm.speedups), off by default: DeepCache feature caching (a full UNet pass every
    # cache_interval steps, the shallow branch through input block cache_branch between) and CFG on the first
    # cfg_end fraction of each pass's steps only
    cache_interval: int = 1
    cache_branch: int = 0
    cfg_end: float = 1.0


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    params: list[dict[str, Any]]  # one dict per image: every setting, for PNG metadata
    latents: torch.Tensor | None = None


def sampler_churn(req: GenerationRequest) -> dict[str, float]:
    """The request's Euler churn options (s_churn, s_tmin, s_tmax, s_noise) as `samplers.sample` takes them."""
    return {name: getattr(req, name) for name in CHURN_DEFAULTS}


def request_loras(req: GenerationRequest, lora_dir: str | Path | None, kept: Sequence[LoraUse] = ()) -> list[LoraUse]:
    """The LoRA files active for `req`: `kept` (the pipeline's), the request's, then the prompt's tags, in order."""
    uses = list(kept)
    for entry in req.loras:
        if not isinstance(entry, LoraUse):
            entry = (entry,) if isinstance(entry, (str, Path)) else tuple(entry)
            entry = LoraUse(Path(entry[0]), *(float(w) for w in entry[1:3]))
        check_lora_weights(f"LoRA {entry.path.name}", entry)
        uses.append(entry)
    for name, weight, text_weight in parse_lora_tags(req.prompt)[1]:
        use = LoraUse(resolve_lora_name(name, lora_dir), weight, text_weight)
        check_lora_weights(f"<lora:{name}>", use)
        uses.append(use)
    return uses


def check_lora_weights(what: str, use: LoraUse) -> None:
    """A ValueError naming `what` unless the LoRA's weights are finite (nan / inf would make NaN images)."""
    weights = (use.weight,) if use.text_weight is None else (use.weight, use.text_weight)
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{what}: weights must be finite numbers, got {', '.join(map(str, weights))}")
