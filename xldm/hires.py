"""Hires fix: AUTOMATIC1111's two-pass txt2img ("Hires. fix", stable-diffusion-webui modules/processing.py
`StableDiffusionProcessingTxt2Img.sample_hr_pass`).

1. A txt2img pass at the request's size (the base model only; no refiner hand-off here).
2. An upscale to the hires size, either of the latents (`Latent ...`: `torch.nn.functional.interpolate`, the modes
   of A1111 modules/shared.py `latent_upscale_modes`) or of the decoded images (`Lanczos`, `Nearest`, `None`: PIL
   resize, then a VAE encode; A1111 modules/images.py `resize_image` resizes with Lanczos when the upscaler is
   "None", so `None` here is that Lanczos resize too).
3. An img2img pass at the hires size with `hires_strength` (A1111 `denoising_strength`), on the same prompt,
   LoRAs and ControlNets (control images resized to the hires size), micro-conditioning sizes defaulting to the
   hires size; a refiner, if any, takes over during this pass at `refiner_start`.

Steps follow diffusers' img2img (`StableDiffusionXLImg2ImgPipeline`, `strength`): the second pass schedules
`hires_steps` steps (None or 0: the first pass's steps) and runs the last int(hires_steps * hires_strength) of them,
so the two passes equal diffusers' txt2img followed by its img2img at the same settings.  A1111 instead runs
exactly `hr_second_pass_steps` steps over an int(steps / strength)-step schedule (sd_samplers_common
`setup_img2img_steps`); for strength 0.5 and 10 steps both run 10 steps from the same point of a 20-step schedule,
and A1111's behaviour is had here by setting hires_steps to int(steps / strength).

Seeds: the second pass starts afresh from each image's seed (seed + i), as A1111 makes a new `ImageRNG` with the
same seeds for it; like diffusers given the same generator seeds for its img2img call, the posterior sample of the
re-encoded image (image-space upscalers) is drawn first, then the noise."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from xldm.request import GenerationRequest, GenerationResult


class TwoPassRunner(Protocol):
    """What the two passes need of a pipeline (`xldm.pipeline.Pipeline`): a run of a resolved request, and the
    decode of a model's latents."""

    model: Any

    def run(self, req: GenerationRequest, **options: Any) -> GenerationResult: ...

    def decode(self, handle: Any, latents: torch.Tensor, tile: bool | None = None) -> torch.Tensor: ...

# A1111 modules/shared.py latent_upscale_modes (name -> torch interpolate mode, antialias); all torch has
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# image-space upscalers (A1111 modules/upscaler.py UpscalerNone, UpscalerLanczos, UpscalerNearest), PIL filters
IMAGE_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,  # A1111 resize_image: "None" resizes with Lanczos
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
UPSCALERS = (*LATENT_UPSCALE_MODES, *IMAGE_UPSCALERS)
MAX_HIRES_SCALE = 8.0  # a sanity bound (A1111's slider goes to 4)


def hires_enabled(req: GenerationRequest) -> bool:
    return req.hires_scale is not None or req.hires_size is not None


def hires_steps(req: GenerationRequest) -> int:
    """The second pass's schedule length: `hires_steps`, or the first pass's steps for None / 0 (A1111)."""
    return req.hires_steps or req.steps


def hires_target(req: GenerationRequest, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """The second pass's (width, height) from the first pass's size: `hires_size` (a 0 side follows the aspect
    ratio, as A1111 hr_resize_x / hr_resize_y), else the size times `hires_scale`; rounded down to multiples of 8
    (the VAE's factor: A1111 leaves int(width * scale) unrounded and drops the remainder in the latent)."""
    width, height = width or req.width, height or req.height
    if req.hires_size is not None:
        w, h = req.hires_size
        if w == 0:
            w = h * width // height
        elif h == 0:
            h = w * height // width
    else:
        w, h = int(width * req.hires_scale), int(height * req.hires_scale)
    return max(w // 8 * 8, 8), max(h // 8 * 8, 8)


def check_hires(req: GenerationRequest, width: int, height: int) -> None:
    """The hires settings of a request of the first-pass size width x height; ValueError naming the problem."""
    if req.hires_upscaler not in UPSCALERS:
        raise ValueError(f"unknown hires upscaler {req.hires_upscaler!r}; expected one of {', '.join(UPSCALERS)}")
    if isinstance(req.hires_strength, bool) or not isinstance(req.hires_strength, (int, float)) \
            or not 0 < req.hires_strength <= 1:
        raise ValueError(f"hires_strength (denoising strength) must be in (0, 1], got {req.hires_strength!r}")
    if req.hires_steps is not None and (isinstance(req.hires_steps, bool) or not isinstance(req.hires_steps, int)
                                        or req.hires_steps < 0):
        raise ValueError(f"hires_steps must be an integer >= 0 (0: the first pass's steps), got {req.hires_steps!r}")
    if not hires_enabled(req):
        if req.hires_steps is not None:
            raise ValueError("hires_steps set without hires_scale or hires_size (the hires fix is off)")
        return
    if req.init_image is not None:
        raise ValueError("hires fix is a txt2img option (A1111 has none in img2img); for img2img give the larger "
                         "width/height directly")
    if req.hires_size is not None:
        size = req.hires_size
        if (len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % 8 for v in size)
                or tuple(size) == (0, 0)):
            raise ValueError(f"hires_size must be (width, height), multiples of 8 (one may be 0: from the aspect "
                             f"ratio), got {size!r}")
        w, h = hires_target(req, width, height)
        if w < width or h < height:
            raise ValueError(f"hires size {w}x{h} is smaller than the first pass's {width}x{height}; hires fix "
                             f"upscales")
    else:
        scale = req.hires_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 1 < scale <= MAX_HIRES_SCALE:
            raise ValueError(f"hires_scale must be a number in (1, {MAX_HIRES_SCALE:g}] (or give hires_size), "
                             f"got {scale!r}")
    steps = hires_steps(req)
    if int(steps * req.hires_strength) < 1:
        raise ValueError(f"hires strength {req.hires_strength} with {steps} hires steps leaves no denoising step; "
                         f"raise hires_steps or hires_strength")


def upscale_latents(latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """A1111 sample_hr_pass: F.interpolate(samples, size=(H // 8, W // 8), mode=..., antialias=...)."""
    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    return F.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def upscale_images(images: list[Image.Image], width: int, height: int, upscaler: str) -> list[Image.Image]:
    """Decoded first-pass images resized in image space (A1111 images.resize_image, resize mode 0)."""
    return [image.resize((width, height), resample=IMAGE_UPSCALERS[upscaler]) for image in images]


def run_hires(pipe: TwoPassRunner, req: GenerationRequest, *, callback: Callable | None = None, output: str = "pil",
              status: Callable[[str], None] | None = None) -> GenerationResult:
    """The two passes of a resolved hires request (see the module docstring).  Callback stages: "base" for the
    first pass, "hires" for the second, "refiner" for a refiner's part of the second."""
    from xldm.images import image_to_tensor, tensor_to_images

    first = pipe.run(req, callback=callback, output="latent", first_pass=True)
    width, height = hires_target(req)
    if req.hires_upscaler in LATENT_UPSCALE_MODES:
        start = upscale_latents(first.latents, width, height, req.hires_upscaler)
    else:
        if status is not None:
            status(f"decoding the first pass for the {req.hires_upscaler} upscale")
        images = tensor_to_images(pipe.decode(pipe.model, first.latents, req.tile_vae))
        start = torch.cat([image_to_tensor(im, width, height)
                           for im in upscale_images(images, width, height, req.hires_upscaler)])
    second = replace(req, width=width, height=height, steps=hires_steps(req), strength=req.hires_strength)

    def renamed(stage: str, *rest: Any) -> None:
        callback("hires" if stage == "base" else stage, *rest)

    result = pipe.run(second, callback=renamed if callback is not None else None, output=output, status=status,
                      start=start)
    result.params = first.params  # the request's settings at the first pass's size, with the hires ones
    return result


def hires_params(req: GenerationRequest) -> dict[str, Any]:
    """The hires settings of an image's metadata (none without hires fix, so plain images keep theirs)."""
    if not hires_enabled(req):
        return {}
    params: dict[str, Any] = {"hires_upscaler": req.hires_upscaler, "hires_strength": req.hires_strength}
    if req.hires_size is not None:
        params["hires_size"] = tuple(req.hires_size)
    else:
        params["hires_scale"] = req.hires_scale
    if req.hires_steps:
        params["hires_steps"] = req.hires_steps
    return params


def extra_generation_params(req: GenerationRequest) -> dict[str, Any]:
    """The hires entries of A1111's `Processed.extra_generation_params` (the response's `info`)."""
    params, entries = hires_params(req), {}
    if "hires_scale" in params:
        entries["Hires upscale"] = params["hires_scale"]
    if "hires_size" in params:
        entries["Hires resize"] = "{}x{}".format(*params["hires_size"])
    if "hires_steps" in params:
        entries["Hires steps"] = params["hires_steps"]
    if params:
        entries["Hires upscaler"] = params["hires_upscaler"]
    return entries


def progress_stages(req: GenerationRequest, has_refiner: bool) -> dict[str, tuple[float, float]]:
    """Each stage's (start, width) share of one image's steps (the server's progress): the first pass, the hires
    pass and, with a refiner, its part of the hires pass."""
    from xldm.diffusion.schedules import img2img_start, split_for_refiner

    steps = hires_steps(req)
    start = img2img_start(steps, req.hires_strength)
    end = split_for_refiner(steps, req.refiner_start, req.sampler, req.timestep_spacing) if has_refiner else steps
    total = req.steps + steps - start
    first, second = req.steps / total, (end - start) / total
    stages = {"base": (0.0, first), "hires": (first, second)}
    if has_refiner:
        stages["refiner"] = (first + second, 1.0 - first - second)
    return stages


def upscaler_items() -> list[dict[str, Any]]:
    """GET /sdapi/v1/upscalers (A1111 modules/api/models.py UpscalerItem): the image-space upscalers."""
    # (A1111 UpscalerData's default scale is 4 for these file-less upscalers too)
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
            for name in IMAGE_UPSCALERS]


def latent_mode_items() -> list[dict[str, str]]:
    """GET /sdapi/v1/latent-upscale-modes (A1111 api.get_latent_upscale_modes)."""
    return [{"name": name} for name in LATENT_UPSCALE_MODES]
