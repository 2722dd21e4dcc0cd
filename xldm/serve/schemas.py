"""Request and response bodies of the HTTP API, with AUTOMATIC1111's field names, defaults and shapes.

They follow stable-diffusion-webui `modules/api/models.py` (`StableDiffusionTxt2ImgProcessingAPI`,
`StableDiffusionImg2ImgProcessingAPI`, `TextToImageResponse`, `ProgressResponse`, `SDModelItem`, `SamplerItem`,
`PNGInfoResponse`), so scripts written for the webui's API send the same JSON.  What differs:

* **Bounds.** Every number has a range (`Limits`), every string a length: out of range is a 422 before any work.
  NaN and Infinity are refused (`allow_inf_nan=False`; the server also refuses them in the raw JSON).
* **Unknown keys are refused** (422 naming them), and path-like ones (`outpath_samples` ...) always: the server's
  folders are fixed at start.  Webui fields xldm does not apply (face restoration, tiling, scripts, variation
  seeds, styles, `s_min_uncond`, `mask_blur`, `inpainting_fill`; a hires pass with its own checkpoint, sampler or
  prompt ...) are accepted at the value that has no effect (the webui's default) and refused otherwise, never silently dropped (`unapplied_fields`).
* **Sampler options** `eta` (samplers that add noise) and `s_churn`, `s_tmin`, `s_tmax`, `s_noise` (Euler) are
  applied (`sampler_fields`); on a sampler that cannot apply them only the values webui clients send by default
  (eta 0 or 1, s_churn 0, s_tmin 0, s_tmax 0 = infinity, s_noise 1) are accepted, as meaning nothing there.
* **Empty negative prompt** = none: SDXL base's zeroed unconditional embedding (diffusers'
  `force_zeros_for_empty_prompt`, as `xldm generate` without `--negative`).
* **width/height** default to the model's native size (the webui's API says 512 whatever the model).
* **SDXL micro-conditioning** (not in the webui's request): `original_size`, `crop_top_left`, `target_size`,
  `aesthetic_score`, `negative_aesthetic_score`, and the webui's settings `sdxl_crop_top`, `sdxl_crop_left`,
  `sdxl_refiner_high_aesthetic_score`, `sdxl_refiner_low_aesthetic_score` (`override_settings`, options)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from xldm.diffusion.samplers import CHURN_DEFAULTS, CHURN_SAMPLERS, ETA_DEFAULTS
from xldm.diffusion.schedules import SAMPLER_NAMES, SPACING_FREE_SAMPLERS
from xldm.request import MAX_SEED
from xldm.config import GENERATE_DEFAULTS
from xldm.pngmeta import A1111_SAMPLER_NAMES, encode_png


@dataclass(frozen=True)
class Limits:
    """Bounds on one request.  The request models take their field bounds from `LIMITS`; a server's own `Limits`
    sets the body, image and page bounds."""

    min_side: int = 8  # width/height: multiples of 8 (the VAE's factor) in [min_side, max_side]
    max_side: int = 2048  # SDXL's largest bucket side (SDXL paper, App. I)
    max_steps: int = 150  # the webui's slider maximum
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_cfg: float = 30.0  # the webui's slider maximum
    max_prompt_chars: int = 8000
    max_image_bytes: int = 16 * 2**20  # one decoded image file (PNG/JPEG/WebP)
    max_image_pixels: int = 4096 * 4096  # checked from the header, before the pixels are decoded
    max_body_bytes: int = 48 * 2**20  # a whole request: two base64 images of max_image_bytes fit
    max_name_chars: int = 255


LIMITS = Limits()
_L = LIMITS


# The webui's aliases (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py); the xldm names work too.
_ALIASES: dict[str, tuple[str, ...]] = {
    "euler_a": ("k_euler_a", "k_euler_ancestral"), "euler": ("k_euler",), "heun": ("k_heun",),
    "dpmpp_2m": ("k_dpmpp_2m",), "dpmpp_2m_karras": ("k_dpmpp_2m_ka",), "dpmpp_2m_sde_karras": ("k_dpmpp_2m_sde_ka",),
    "dpmpp_sde_karras": ("k_dpmpp_sde_ka",), "dpmpp_3m_sde": ("k_dpmpp_3m_sde",),
    "dpmpp_3m_sde_karras": ("k_dpmpp_3m_sde_ka",),
}
# The webui's per-sampler option flags (modules/sd_samplers_kdiffusion.py `samplers_k_diffusion`,
# sd_samplers_timesteps.py for DDIM), as its API lists them, true of xldm's samplers (LCM, whose every step
# draws fresh noise, is marked too): the schedule, second-order steps (two model calls),
# ancestral noise that A1111's "ENSD" seed offset would move, Brownian-tree noise (xldm's DPM++ SDE only:
# samplers._BrownianNoise; the multistep SDE samplers draw plain Gaussian noise as diffusers does).
_OPTIONS: dict[str, dict[str, str]] = {
    "euler_a": {"uses_ensd": "True"}, "heun": {"second_order": "True"},
    "dpmpp_2m_karras": {"scheduler": "karras"},
    "dpmpp_2m_sde_karras": {"scheduler": "karras", "uses_ensd": "True"},
    "dpmpp_sde_karras": {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
    "dpmpp_3m_sde": {"uses_ensd": "True"}, "dpmpp_3m_sde_karras": {"scheduler": "karras", "uses_ensd": "True"},
    "ddim": {"default_eta_is_0": "True", "uses_ensd": "True"}, "lcm": {"uses_ensd": "True"},
}
# Webui >= 1.9 sends the schedule separately: ("DPM++ 2M", "Karras") is the combined "DPM++ 2M Karras".
_SCHEDULERS_MERGED = {"karras": " Karras"}
# "SGM Uniform" (A1111 modules/sd_schedulers.py `sgm_uniform`: evenly spaced model times from the last training
# step, alias "SGMUniform") is diffusers' "trailing" timestep spacing, the one few-step models (Turbo, Lightning)
# are sampled with; xldm.pngmeta writes trailing as "Schedule type: SGM Uniform".
_SCHEDULER_SPACINGS = {"sgm uniform": "trailing", "sgm_uniform": "trailing", "sgmuniform": "trailing"}


def sampler_aliases(xldm_name: str) -> list[str]:
    return [*_ALIASES.get(xldm_name, ()), xldm_name]


def sampler_options(xldm_name: str) -> dict[str, str]:
    return dict(_OPTIONS.get(xldm_name, {}))


def resolve_sampler(name: str | None, scheduler: str | None = None) -> str:
    """A webui sampler name (or alias, or xldm name; case-insensitive) -> the xldm sampler name; `scheduler` "Karras"
    picks the Karras variant, "SGM Uniform" a sampler whose schedule the spacing changes (`scheduler_spacing`)."""
    name = (name or A1111_SAMPLER_NAMES[GENERATE_DEFAULTS["sampler"]]).strip()
    sched = (scheduler or "").strip().lower()
    if sched in _SCHEDULERS_MERGED and not name.lower().endswith(_SCHEDULERS_MERGED[sched].lower()):
        name += _SCHEDULERS_MERGED[sched]
    elif sched not in ("", "automatic", *_SCHEDULERS_MERGED, *_SCHEDULER_SPACINGS):
        raise ValueError(f"scheduler {scheduler!r} is not available; use 'Automatic', 'Karras' or 'SGM Uniform'")
    wanted = name.lower()
    for xname in SAMPLER_NAMES:
        if wanted in (a.lower() for a in (A1111_SAMPLER_NAMES[xname], *sampler_aliases(xname))):
            if sched in _SCHEDULER_SPACINGS and xname in SPACING_FREE_SAMPLERS:
                raise ValueError(f"scheduler {scheduler!r} (trailing timestep spacing) does not change the "
                                 f"{A1111_SAMPLER_NAMES[xname]} schedule; pick the sampler without Karras, or "
                                 f"scheduler 'Automatic'")
            return xname
    choices = ", ".join(A1111_SAMPLER_NAMES[x] for x in SAMPLER_NAMES)
    raise ValueError(f"unknown sampler {name!r}; expected one of {choices}")


def scheduler_spacing(scheduler: str | None) -> str | None:
    """The timestep spacing a webui `scheduler` sets ("SGM Uniform": trailing); None: the request's default."""
    return _SCHEDULER_SPACINGS.get((scheduler or "").strip().lower())


_PATH_LIKE_KEY = re.compile(r"path|dir|file|folder", re.IGNORECASE)
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(text: str, what: str = "image", limits: Limits = LIMITS) -> Image.Image:
    """A base64 image (optionally a `data:image/...;base64,` URL) -> a loaded PIL image.  URLs and paths are refused,
    never fetched or opened (the webui fetches http URLs when allowed; xldm never).  Raises ValueError with the
    reason: not base64, too many bytes, too many pixels, not PNG/JPEG/WebP."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what}: expected a base64-encoded image")
    head = text[:16].lower()
    refused = f"{what}: URLs and paths are not accepted; send the image itself, base64-encoded"
    # ":" is no base64 character, so a URL or a drive path can be refused before decoding; "/" is one (a raw
    # base64 JPEG starts "/9j/"), so a text that only looks like a path is refused once it fails to decode
    if head.startswith(("http:", "https:", "file:", "ftp:")) or re.match(r"^[a-z]:[\\/]", head):
        raise ValueError(refused)
    path_like = head.startswith(("/", "\\", ".", "~"))
    text = _DATA_URL.sub("", text, count=1)
    if len(text) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
        raise ValueError(f"{what}: larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(refused if path_like else f"{what}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG", "WEBP"))  # anything else is refused
        width, height = image.size
        if width * height > limits.max_image_pixels:  # before decoding a single pixel
            raise ValueError(f"{what}: {width}x{height} has more than {limits.max_image_pixels} pixels")
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        if path_like:
            raise ValueError(refused) from None
        raise ValueError(f"{what}: not a PNG, JPEG or WebP image ({type(e).__name__})") from None
    return image


def png_base64(image: Image.Image, params: dict[str, Any] | None = None) -> str:
    """A PIL image -> base64 PNG, with the settings' text chunks (the webui's images carry `parameters` too)."""
    return base64.b64encode(encode_png(image, params)).decode("ascii")


# strict: "5" is not 5 and 1 is not true (wrong types are refused, not coerced); ints are accepted as floats.
_STRICT = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
# a base64 image of at most max_image_bytes (4 characters per 3 bytes, and room for a data: URL prefix)
Base64Image = Annotated[str, Field(max_length=(_L.max_image_bytes + 2) // 3 * 4 + 64)]
# [width, height] with sides in [1, 16384], and [top, left] in [0, 16384] (JSON has no tuples)
Size2 = Annotated[list[Annotated[int, Field(ge=1, le=16384)]], Field(min_length=2, max_length=2)]
Crop2 = Annotated[list[Annotated[int, Field(ge=0, le=16384)]], Field(min_length=2, max_length=2)]


# Webui fields xldm has no field for, accepted with no effect: read by the webui only with hires fix on (with
# enable_hr they are refused as unknown), or bookkeeping of the webui's own (modules/processing.py, modules/api/models.py).
_HIRES_ONLY = frozenset({"hr_upscaler", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                         "hr_negative_prompt", "hr_additional_modules", "hr_cfg", "hr_distilled_cfg"})
_NO_EFFECT_WHEN = {"force_task_id": (None, ""), "infotext": (None, ""), "user": (None, ""), "firstpass_image": (None,)}
# What webui clients send for the sampler options when they mean none (webuiapi's txt2img sends eta=1.0, s_churn=0,
# s_tmax=0, s_tmin=0, s_noise=1 with every request; the webui reads s_tmax 0 as infinity): accepted on a sampler
# that cannot apply the option, where they mean nothing (as the webui ignores them there).
_NEUTRAL_SAMPLER_VALUES = {"eta": (0.0, 1.0), "s_churn": (0.0,), "s_tmin": (0.0,), "s_tmax": (0.0, math.inf),
                           "s_noise": (1.0,)}


def sampler_fields(body: "GenerationBase", sampler: str) -> dict[str, float]:
    """The `GenerationRequest` sampler options of a body for `sampler`: those it can apply (eta for the samplers of
    `ETA_DEFAULTS`, churn for Euler's), s_tmax 0 read as infinity; the neutral values of the others left out
    (`unapplied_fields` refuses the rest)."""
    fields: dict[str, float] = {}
    if body.eta is not None and sampler in ETA_DEFAULTS:
        fields["eta"] = float(body.eta)
    if sampler in CHURN_SAMPLERS:
        for name in CHURN_DEFAULTS:
            value = getattr(body, name)
            if value is not None:
                fields[name] = math.inf if name == "s_tmax" and value == 0 else float(value)
    return fields


def _unknown_keys(model: type[BaseModel], data: dict[str, Any]) -> list[str]:
    """Keys of `data` that `model` has no field for and that would have an effect: refused by name."""
    known = set(model.model_fields)
    bad = []
    for key, value in data.items():
        if key in known:
            continue
        if key in _HIRES_ONLY and not data.get("enable_hr"):
            continue
        if key == "denoising_strength" and not data.get("enable_hr"):  # txt2img: the hires pass's
            continue
        if key in _NO_EFFECT_WHEN and value in _NO_EFFECT_WHEN[key]:
            continue
        bad.append(key)
    return sorted(bad)


def unapplied_fields(body: "GenerationBase", sampler: str) -> list[str]:
    """The fields of a request that xldm would not apply, each with what is accepted; [] when all apply."""
    problems = []
    label = A1111_SAMPLER_NAMES[sampler]
    if body.eta is not None and sampler not in ETA_DEFAULTS and float(body.eta) not in _NEUTRAL_SAMPLER_VALUES["eta"]:
        problems.append(f"eta={body.eta:g} (the {label} sampler adds no noise; samplers that take eta: "
                        f"{', '.join(A1111_SAMPLER_NAMES[n] for n in ETA_DEFAULTS)})")
    if sampler not in CHURN_SAMPLERS:
        for name in CHURN_DEFAULTS:
            value = getattr(body, name)
            if value is not None and float(value) not in _NEUTRAL_SAMPLER_VALUES[name]:
                problems.append(f"{name}={value:g} (the {label} sampler has no churn; samplers that take s_churn, "
                                f"s_tmin, s_tmax, s_noise: "
                                f"{', '.join(A1111_SAMPLER_NAMES[n] for n in CHURN_SAMPLERS)})")
    if body.s_min_uncond not in (None, 0.0):
        problems.append(f"s_min_uncond={body.s_min_uncond:g} (only 0: xldm always runs the unconditional pass)")
    if isinstance(body, Img2ImgRequest):
        if body.initial_noise_multiplier not in (None, 1.0):
            problems.append(f"initial_noise_multiplier={body.initial_noise_multiplier:g} (only 1)")
        if body.image_cfg_scale not in (None, 1.5):  # instruct-pix2pix models only; the webui's default 1.5
            problems.append(f"image_cfg_scale={body.image_cfg_scale:g} (instruct-pix2pix only: null or 1.5)")
        if body.mask is not None:
            for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
                if getattr(body, name) not in (None, 0):
                    problems.append(f"{name}={getattr(body, name)} (xldm does not blur the mask: 0)")
            if body.inpainting_fill not in (None, 1):  # xldm's inpainting noises the original image (diffusers' SDXL inpaint)
                problems.append(f"inpainting_fill={body.inpainting_fill} (xldm starts from the original: 1)")
            if body.inpaint_full_res:
                problems.append("inpaint_full_res=true (xldm inpaints the whole picture: false)")
    return problems


CONTROL_RESIZE_MODES = {"just resize": 0, "crop and resize": 1, "resize and fill": 2}
CONTROL_MODES = {"balanced": 0, "my prompt is more important": 1, "controlnet is more important": 2}


class ControlNetUnitRequest(BaseModel):
    """One unit of sd-webui-controlnet's API (`internal_controlnet/external_code.py` ControlNetUnit, as the
    extension's `alwayson_scripts.controlnet.args` take it).  Applied: `enabled`, `image` / `input_image`, `module`
    ("none" or "canny" with `threshold_a` / `threshold_b` as low / high, -1 = 100 / 200), `model`, `weight`,
    `guidance_start`, `guidance_end`, `resize_mode` "Just Resize" (0) or "Crop and Resize" (1, the extension's
    default: centre crop to the output's aspect, then resize).  Others only at their no-effect default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    enabled: bool = True
    image: Base64Image | dict[str, Any] | None = None
    input_image: Base64Image | None = None
    mask: Base64Image | None = None
    module: str = Field(default="none", max_length=64)
    model: str = Field(default="None", max_length=_L.max_name_chars)
    weight: float = Field(default=1.0, ge=0, le=4)
    resize_mode: int | str = Field(default="Crop and Resize")
    low_vram: bool = False
    lowvram: bool = False
    processor_res: int = Field(default=-1, ge=-1, le=4096)
    threshold_a: float = Field(default=-1, ge=-1, le=1024)
    threshold_b: float = Field(default=-1, ge=-1, le=1024)
    guidance_start: float = Field(default=0.0, ge=0, le=1)
    guidance_end: float = Field(default=1.0, ge=0, le=1)
    control_mode: int | str = Field(default="Balanced")
    guessmode: bool | int | None = None
    pixel_perfect: bool = False
    hr_option: str = Field(default="Both", max_length=32)
    save_detected_map: bool = True

    def image_text(self) -> str | None:
        """The control image's base64 text: `image` (a string, or the webui page's {"image": ..., "mask": ...})
        or `input_image`."""
        image = self.image
        if isinstance(image, dict):
            if image.get("mask") not in (None, ""):
                raise ValueError("a ControlNet unit's mask is not applied by xldm; send the image only")
            image = image.get("image")
        return image or self.input_image or None

    def resize(self) -> int:
        mode = self.resize_mode
        value = CONTROL_RESIZE_MODES.get(mode.strip().lower()) if isinstance(mode, str) else mode
        if value not in (0, 1):
            raise ValueError(f"resize_mode {mode!r}: xldm does 'Just Resize' (0) and 'Crop and Resize' (1)")
        return value

    def unapplied(self) -> list[str]:
        problems = []
        mode = self.control_mode
        if (CONTROL_MODES.get(mode.strip().lower()) if isinstance(mode, str) else mode) != 0 or self.guessmode:
            problems.append(f"control_mode={mode!r} (only 'Balanced' / 0)")
        for name in ("low_vram", "lowvram", "pixel_perfect"):
            if getattr(self, name):
                problems.append(f"{name}=true (only false)")
        if self.mask not in (None, ""):
            problems.append("mask (a ControlNet unit's mask is not applied)")
        if self.processor_res not in (-1, 512):  # the extension's default resolution: canny runs on the image as is
            problems.append(f"processor_res={self.processor_res} (only -1 or 512)")
        if self.hr_option not in ("Both", "Low res only"):
            problems.append(f"hr_option={self.hr_option!r} (ControlNet steers the first pass: 'Both')")
        return problems


class _NoPaths(BaseModel):
    """A body that refuses keys naming a path/folder/file, but for `names` (a model name is no path: it is looked up
    among the registered names)."""

    model_config = _STRICT
    names: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            bad = sorted(k for k in data if isinstance(k, str) and k not in cls.names and _PATH_LIKE_KEY.search(k))
            if bad:
                raise ValueError(f"{', '.join(bad)}: the server's files and folders are fixed at start and cannot "
                                 f"be set by a request")
        return data


class Settings(_NoPaths):
    """The settings (webui "options") the server knows; usable in `override_settings` and `/sdapi/v1/options`."""

    names = frozenset({"sd_model_checkpoint"})
    sd_model_checkpoint: str | None = Field(default=None, max_length=_L.max_name_chars)
    sd_vae: str | None = Field(default=None, max_length=_L.max_name_chars,
                               description='"Automatic"/"None": the model VAE; else a name of /sdapi/v1/sd-vae')
    CLIP_stop_at_last_layers: int | None = Field(default=None, ge=1, le=12, description="clip skip: 1 = none")
    samples_save: bool | None = None
    sdxl_crop_top: int | None = Field(default=None, ge=0, le=16384)
    sdxl_crop_left: int | None = Field(default=None, ge=0, le=16384)
    sdxl_refiner_high_aesthetic_score: float | None = Field(default=None, ge=0, le=10)
    sdxl_refiner_low_aesthetic_score: float | None = Field(default=None, ge=0, le=10)


class GenerationBase(_NoPaths):
    """Fields shared by txt2img and img2img (webui `StableDiffusionProcessing` as its API exposes it)."""

    names = frozenset({"refiner_checkpoint"})
    prompt: str = Field(default="", max_length=_L.max_prompt_chars)
    negative_prompt: str = Field(default="", max_length=_L.max_prompt_chars, description='"": none (zeros)')
    styles: list[str] = Field(default_factory=list, max_length=0,
                              description="saved webui styles; xldm has none, so only [] is accepted")
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED, description="-1: random; image i uses seed + i")
    subseed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(default=0.0, ge=0, le=0, description="variation seeds: not available (0 only)")
    seed_resize_from_h: int = Field(default=-1, ge=-1, le=0)
    seed_resize_from_w: int = Field(default=-1, ge=-1, le=0)
    sampler_name: str | None = Field(default=None, max_length=64, description='e.g. "Euler a", "DPM++ 2M Karras"')
    sampler_index: str | None = Field(default=None, max_length=64, description="deprecated webui alias of sampler_name")
    scheduler: str | None = Field(default=None, max_length=64, description='"Automatic", "Karras" or "SGM Uniform" (webui >= 1.9)')
    batch_size: int = Field(default=1, ge=1, le=_L.max_batch_size)
    n_iter: int = Field(default=1, ge=1, le=_L.max_n_iter)
    # (xldm's shared defaults, xldm.config.GENERATE_DEFAULTS: the CLI and the Python API use the same)
    steps: int = Field(default=GENERATE_DEFAULTS["steps"], ge=1, le=_L.max_steps)
    cfg_scale: float = Field(default=GENERATE_DEFAULTS["cfg"], ge=0, le=_L.max_cfg)
    width: int | None = Field(default=None, ge=_L.min_side, le=_L.max_side, multiple_of=8,
                              description="default: the model's native size")
    height: int | None = Field(default=None, ge=_L.min_side, le=_L.max_side, multiple_of=8)
    restore_faces: bool | None = Field(default=None, description="not available: only false/null")
    tiling: bool | None = Field(default=None, description="not available: only false/null")
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(default=None, ge=0, le=1)
    s_min_uncond: float | None = Field(default=None, ge=0, le=100)
    s_churn: float | None = Field(default=None, ge=0, le=100)
    s_tmax: float | None = Field(default=None, ge=0, le=1e4)
    s_tmin: float | None = Field(default=None, ge=0, le=1e4)
    s_noise: float | None = Field(default=None, ge=0, le=10)
    override_settings: dict[str, Any] | None = Field(default=None, max_length=64)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(default=None, max_length=_L.max_name_chars,
                                           description="a name from /sdapi/v1/sd-models; null: no refiner")
    refiner_switch_at: float | None = Field(default=None, gt=0, lt=1,
                                            description="fraction of the steps after which the refiner takes over")
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = Field(default=None, max_length=64)
    send_images: bool = True
    save_images: bool = Field(default=False, description="also write the PNGs under the server's --outputs folder")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, max_length=8,
                                             description='webui extensions: only {"controlnet": {"args": [unit, '
                                                         '...]}} (sd-webui-controlnet\'s API)')
    script_name: str | None = Field(default=None, max_length=0)
    script_args: list[Any] = Field(default_factory=list, max_length=0)
    # xldm: SDXL micro-conditioning (SDXL paper, Sec. 2.2), sizes as [width, height], crop as [top, left]
    original_size: Size2 | None = None
    crop_top_left: Crop2 | None = None
    target_size: Size2 | None = None
    negative_original_size: Size2 | None = None
    negative_target_size: Size2 | None = None
    aesthetic_score: float | None = Field(default=None, ge=0, le=10, description="refiner conditioning (6.0)")
    negative_aesthetic_score: float | None = Field(default=None, ge=0, le=10, description="refiner (2.5)")
    # xldm: the webui's prompt semantics (75-token chunks, "(word:1.2)", BREAK), as `xldm generate` by default
    prompt_weighting: bool = Field(default=True, description="false: diffusers' plain encoding (77 tokens, no "
                                                              "weights), as `xldm generate --no-prompt-weighting`")
    # xldm: sampling speed-ups (xldm.speedups), as `xldm generate --deep-cache N --cache-branch B --cfg-end F`
    deep_cache: int = Field(default=1, ge=1, le=1000, description="DeepCache: a whole UNet pass every N-th step "
                                                                   "(1 = off)")
    cache_branch: int = Field(default=0, ge=0, le=1000, description="DeepCache: the deepest input block run on "
                                                                     "cached steps")
    cfg_end: float = Field(default=1.0, ge=0, le=1, description="CFG on this first fraction of the steps only")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and (bad := _unknown_keys(cls, data)):
            raise ValueError(f"{', '.join(bad)}: not a field xldm applies; leave {'it' if len(bad) == 1 else 'them'}"
                             f" out")
        return data

    def control_units(self) -> list[tuple[int, ControlNetUnitRequest]]:
        """(index, unit) of the enabled units of `alwayson_scripts.controlnet.args`; ValueError for another script or a bad unit."""
        scripts = dict(self.alwayson_scripts)
        other = sorted(k for k in scripts if k.lower() != "controlnet")
        if other:
            raise ValueError(f"alwayson_scripts {', '.join(other)}: not available in xldm (only controlnet)")
        if not scripts:
            return []
        script = next(iter(scripts.values()))
        if not isinstance(script, dict) or not isinstance(script.get("args"), list) or set(script) - {"args"}:
            raise ValueError('alwayson_scripts.controlnet: expected {"args": [unit, ...]}')
        units = []
        for index, raw in enumerate(script["args"]):
            try:
                unit = ControlNetUnitRequest.model_validate(raw)
            except ValueError as e:
                detail = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                                   for err in e.errors()) if hasattr(e, "errors") else str(e)
                raise ValueError(f"alwayson_scripts.controlnet.args[{index}]: {detail}") from None
            if unit.enabled:
                units.append((index, unit))
        return units

    @model_validator(mode="after")
    def _supported(self) -> "GenerationBase":
        for name in ("restore_faces", "tiling"):
            if getattr(self, name):
                raise ValueError(f"{name} is not available in xldm; send false or leave it out")
        return self


class Txt2ImgRequest(GenerationBase):
    # hires fix (xldm.hires): the webui's fields; hr_resize_x / hr_resize_y, when not both 0, replace hr_scale
    enable_hr: bool = Field(default=False, description="hires fix: txt2img, upscale, img2img at denoising_strength")
    denoising_strength: float | None = Field(default=None, gt=0, le=1,
                                             description=f"hires pass strength (default "
                                                         f"{GENERATE_DEFAULTS['hires_strength']}); with enable_hr")
    firstphase_width: int = Field(default=0, ge=0, le=_L.max_side)
    firstphase_height: int = Field(default=0, ge=0, le=_L.max_side)
    hr_scale: float = Field(default=2.0, ge=1, le=4)
    hr_upscaler: str | None = Field(default=None, max_length=64, description="/sdapi/v1/upscalers or "
                                    "/sdapi/v1/latent-upscale-modes (default Latent)")
    hr_second_pass_steps: int = Field(default=0, ge=0, le=_L.max_steps, description="0: steps")
    hr_resize_x: int = Field(default=0, ge=0, le=_L.max_side, multiple_of=8)
    hr_resize_y: int = Field(default=0, ge=0, le=_L.max_side, multiple_of=8)
    # the webui's per-pass choices: only "the same as the first pass" (their defaults) is available
    hr_checkpoint_name: str | None = Field(default=None, max_length=_L.max_name_chars)
    hr_sampler_name: str | None = Field(default=None, max_length=64)
    hr_scheduler: str | None = Field(default=None, max_length=64)
    hr_prompt: str = Field(default="", max_length=_L.max_prompt_chars)
    hr_negative_prompt: str = Field(default="", max_length=_L.max_prompt_chars)

    @model_validator(mode="after")
    def _hires_supported(self) -> "Txt2ImgRequest":
        if not self.enable_hr:
            return self
        sampler = resolve_sampler(self.sampler_name or self.sampler_index, self.scheduler)
        same = {"hr_checkpoint_name": self.hr_checkpoint_name in (None, "", "Use same checkpoint"),
                "hr_sampler_name": self.hr_sampler_name in (None, "", "Use same sampler")
                or resolve_sampler(self.hr_sampler_name, self.scheduler) == sampler,
                "hr_scheduler": self.hr_scheduler in (None, "", "Use same scheduler", self.scheduler),
                "hr_prompt": self.hr_prompt in ("", self.prompt),
                "hr_negative_prompt": self.hr_negative_prompt in ("", self.negative_prompt)}
        if different := [name for name, ok in same.items() if not ok]:
            raise ValueError(f"{', '.join(different)}: xldm's hires pass uses the first pass's checkpoint, sampler, "
                             f"scheduler and prompts; leave {'it' if len(different) == 1 else 'them'} out (or equal "
                             f"to the first pass's)")
        if self.hr_scale <= 1 and self.hr_resize_x == self.hr_resize_y == 0:
            raise ValueError(f"enable_hr: hr_scale must be > 1 (got {self.hr_scale:g}), or give hr_resize_x / "
                             f"hr_resize_y")
        return self

    def hires_fields(self) -> dict[str, Any]:
        """The `GenerationRequest` hires settings of this body (none without enable_hr)."""
        if not self.enable_hr:
            return {}
        size = (self.hr_resize_x, self.hr_resize_y)
        return {"hires_scale": None if any(size) else float(self.hr_scale), "hires_size": size if any(size) else None,
                "hires_upscaler": self.hr_upscaler or GENERATE_DEFAULTS["hires_upscaler"],
                "hires_strength": float(self.denoising_strength or GENERATE_DEFAULTS["hires_strength"]),
                "hires_steps": self.hr_second_pass_steps or None}


class Img2ImgRequest(GenerationBase):
    init_images: list[Base64Image] = Field(min_length=1, max_length=1, description="one base64 image")
    resize_mode: int = Field(default=0, ge=0, le=0, description="0 (just resize) only")
    denoising_strength: float = Field(default=0.75, gt=0, le=1)
    image_cfg_scale: float | None = Field(default=None, ge=0, le=_L.max_cfg)
    mask: Base64Image | None = Field(default=None, description="base64 image, white = repaint")
    mask_blur: int | None = Field(default=None, ge=0, le=64, description="with a mask: 0 only (no blur)")
    mask_blur_x: int | None = Field(default=None, ge=0, le=64)
    mask_blur_y: int | None = Field(default=None, ge=0, le=64)
    inpainting_fill: int | None = Field(default=None, ge=0, le=3,
                                        description="with a mask: 1 (original) only, what xldm does; null = 1")
    inpaint_full_res: bool = Field(default=False, description="with a mask: false only (whole picture)")
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=256)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1, description="1: black = repaint")
    initial_noise_multiplier: float | None = Field(default=None, ge=0, le=2, description="1 only")
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    model_config = _STRICT
    image: Base64Image = Field(description="base64 PNG")


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its `parameters` text chunk")
    parameters: dict[str, Any] = Field(description="the request as understood (images left out)")
    info: str = Field(description="a JSON string: seed, all_seeds, infotexts, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queued: int = Field(default=0, description="xldm: jobs waiting behind the running one")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the running job")
    eta_relative: float = Field(description="seconds left, estimated from the time so far")
    state: ProgressState
    current_image: str | None = Field(default=None, description="base64 PNG preview of the denoised estimate")
    textinfo: str | None = None
    current_task: str | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str = Field(description="the file's name (the server's folders are not disclosed)")
    config: str | None = None
    kind: str = Field(default="base", description='xldm: "refiner" models are usable as refiner_checkpoint only')


class SDVaeItem(BaseModel):
    model_name: str
    filename: str = Field(description="the file under the server's VAE folder")


class LoraItem(BaseModel):
    name: str = Field(description="what <lora:NAME:WEIGHT> names")
    alias: str
    path: str = Field(description="the file under the server's LoRA folder")
    metadata: dict[str, Any]


class UpscalerItem(BaseModel):  # webui modules/api/models.py UpscalerItem
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = Field(default_factory=dict)


class PngInfoResponse(BaseModel):
    info: str = Field(description="the `parameters` text chunk")
    items: dict[str, Any] = Field(description="the other text chunks")
    parameters: dict[str, Any] = Field(description="the infotext parsed into fields")
