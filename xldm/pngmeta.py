"""Image files (PNG, JPEG, WebP) that remember how they were made.

`save_png` writes two text chunks:
  * `parameters`: the generation settings as AUTOMATIC1111's stable-diffusion-webui writes them ("infotext"), so
    the webui's "PNG Info" tab, civitai and the many tools that read that format understand xldm images;
  * `xldm`: a JSON object holding every setting exactly (the A1111 text is lossy: it has no place for, e.g.,
    the micro-conditioning sizes).
JPEG and WebP files (`save_image`) carry the infotext as A1111 writes it there: EXIF UserComment (tag 0x9286 of the
Exif IFD) in the "UNICODE" encoding of piexif's `UserComment.dump` (8-byte prefix, then UTF-16 big-endian, in a
big-endian EXIF block), A1111 modules/images.py `save_image_with_geninfo`; `read_png_text` reads it back as the
`parameters` text.

The infotext layout follows A1111 `modules/processing.py` `create_infotext` and `modules/infotext_utils.py`
(`quote`, `parse_generation_parameters`):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>      (left out when empty)
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 1234, Size: 1024x1024, Model: ..., ...

The last line is `key: value` pairs joined by ", " in A1111's key order; a value holding a comma, a colon or a
newline is written as a JSON string (A1111 `quote`).  Sizes are WIDTHxHEIGHT.

xldm settings (`params`, named as in the pipeline's `GenerationResult.params`) map to A1111 keys by `_BEFORE_SIZE`
and `_AFTER_SIZE` (width/height -> Size, sampler names via `A1111_SAMPLER_NAMES`); others go to the JSON chunk only."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from xldm import __version__

# PNG text-chunk keywords.
A1111_CHUNK = "parameters"  # A1111 modules/images.py save_image_with_geninfo (pnginfo_section_name)
XLDM_CHUNK = "xldm"

# xldm sampler name -> A1111 sampler name (A1111 modules/sd_samplers_kdiffusion.py samplers_k_diffusion labels,
# in the combined "<sampler> <schedule>" form every infotext reader accepts).
_SAMPLERS_TO_A1111 = {"euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                      "dpmpp_2m_karras": "DPM++ 2M Karras", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
                      "ddim": "DDIM", "unipc": "UniPC", "dpmpp_sde_karras": "DPM++ SDE Karras",
                      "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_3m_sde_karras": "DPM++ 3M SDE Karras", "lcm": "LCM"}
# Both directions in one dict: xldm name -> A1111 name, and A1111 name -> xldm name (the two name sets are disjoint).
A1111_SAMPLER_NAMES: dict[str, str] = {**_SAMPLERS_TO_A1111, **{v: k for k, v in _SAMPLERS_TO_A1111.items()}}

# xldm schedule names -> A1111 "Schedule type" labels (A1111 modules/sd_schedulers.py); others are written as is.
_SCHEDULES_TO_A1111 = {"karras": "Karras", "exponential": "Exponential", "uniform": "Uniform",
                       "sgm_uniform": "SGM Uniform", "simple": "Simple", "normal": "Normal", "ddim": "DDIM"}
_SCHEDULES_FROM_A1111 = {v: k for k, v in _SCHEDULES_TO_A1111.items()}
# diffusers' "trailing" spacing is what A1111 users pick as "SGM Uniform" (A1111 sd_schedulers.sgm_uniform: evenly
# spaced model times from the last training step); the other spacings have no A1111 name (xldm JSON chunk only).
_SPACING_SCHEDULES = {"trailing": "sgm_uniform"}
_NUMBERS = ("steps", "seed", "cfg", "strength", "clip_skip", "refiner_start", "hires_scale", "hires_steps",
            "hires_strength", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise")

# (xldm setting, A1111 key) for the scalar settings, in A1111 create_infotext order. Size goes after Seed.
_BEFORE_SIZE = (("steps", "Steps"), ("sampler", "Sampler"), ("schedule", "Schedule type"), ("cfg", "CFG scale"),
                ("seed", "Seed"))
_AFTER_SIZE = (("model_hash", "Model hash"), ("model", "Model"), ("vae_hash", "VAE hash"), ("vae", "VAE"),
               ("strength", "Denoising strength"), ("hires_strength", "Denoising strength"),
               ("clip_skip", "Clip skip"), ("quantize", "Quantization"),
               # sampler options, written only when not the default: A1111 modules/sd_samplers_kdiffusion.py
               # (`eta_infotext_field` "Eta"; "Eta DDIM" for DDIM, sd_samplers_timesteps.py; "Sigma churn" ...)
               ("eta", "Eta"), ("s_churn", "Sigma churn"), ("s_tmin", "Sigma tmin"), ("s_tmax", "Sigma tmax"),
               ("s_noise", "Sigma noise"),
               # hires fix: A1111 StableDiffusionProcessingTxt2Img's extra_generation_params (modules/processing.py)
               ("hires_scale", "Hires upscale"), ("hires_size", "Hires resize"), ("hires_steps", "Hires steps"),
               ("hires_upscaler", "Hires upscaler"),
               # extra_generation_params of A1111's refiner (modules/sd_models_xl / processing refiner options)
               ("refiner", "Refiner"), ("refiner_start", "Refiner switch at"),
               # A1111 extensions-builtin/Lora (network hashes) and textual_inversion: "name: shorthash, ..."
               ("lora_hashes", "Lora hashes"), ("ti_hashes", "TI hashes"))
_NEGATIVE = "Negative prompt:"
_ETA_DDIM = "Eta DDIM"  # DDIM's eta key in A1111 infotext (the others' is "Eta")

# One `key: value` pair of the settings line: a key of word characters, spaces, '-' and '/', then either a JSON
# string or everything up to the next comma (the grammar of A1111 infotext_utils.re_param).
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _quote(value: Any) -> str:
    """A1111 `quote`: a value with ',', ':' or a newline becomes a JSON string; others are written as str()."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _unquote(text: str) -> str:
    try:
        return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
    except json.JSONDecodeError:
        return text


# A1111 names a checkpoint by its file name without the extension (modules/sd_models.py CheckpointInfo
# `name_for_extra`); these are the extensions taken off.
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")


def checkpoint_stem(name: str) -> str:
    """"sd_xl_base_1.0.safetensors" -> "sd_xl_base_1.0"; a folder's name (diffusers) is kept whole."""
    for suffix in CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _translate(setting: str, value: Any, schedules: Mapping[str, str]) -> Any:
    """Sampler and schedule names into the other program's names (`A1111_SAMPLER_NAMES` maps both ways); model
    files by their stem (A1111's `Model:`)."""
    if setting in ("model", "refiner") and isinstance(value, str) and schedules is _SCHEDULES_TO_A1111:
        return checkpoint_stem(value)
    if setting == "hires_size" and schedules is _SCHEDULES_TO_A1111:  # (width, height) -> "WxH"
        return f"{value[0]}x{value[1]}"
    if setting == "hires_scale" and schedules is _SCHEDULES_TO_A1111 and float(value).is_integer():
        return int(value)  # "Hires upscale: 2", as A1111 writes a whole scale
    if setting == "sampler":
        return A1111_SAMPLER_NAMES.get(value, value)
    return schedules.get(value, value) if setting == "schedule" else value


def format_a1111_parameters(params: Mapping[str, Any]) -> str:
    """The A1111 infotext of `params` (see the module docstring for the setting names)."""
    pairs: list[tuple[str, Any]] = []
    if params.get("schedule") is None and params.get("timestep_spacing") in _SPACING_SCHEDULES:
        params = dict(params, schedule=_SPACING_SCHEDULES[params["timestep_spacing"]])

    def add(table: tuple[tuple[str, str], ...]) -> None:
        for setting, key in table:
            if params.get(setting) is not None:
                key = _ETA_DDIM if setting == "eta" and params.get("sampler") == "ddim" else key
                pairs.append((key, _translate(setting, params[setting], _SCHEDULES_TO_A1111)))

    add(_BEFORE_SIZE)
    if params.get("width") is not None and params.get("height") is not None:
        pairs.append(("Size", f"{params['width']}x{params['height']}"))
    add(_AFTER_SIZE)
    # sd-webui-controlnet: one "ControlNet N" entry per unit, its value quoted ("Module: canny, Model: ...")
    for i, text in enumerate(params.get("controlnet_infotext") or ()):
        pairs.append((f"ControlNet {i}", text))
    # A1111 adds "Version" last; "xldm <version>" tells a reader where the image came from.
    pairs.append(("Version", f"xldm {__version__}"))

    text = str(params.get("prompt") or "")
    negative = params.get("negative_prompt")
    if negative:
        text += f"\n{_NEGATIVE} {negative}"
    text += "\n" + ", ".join(f"{key}: {_quote(value)}" for key, value in pairs)
    return text.strip()


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Parse an A1111 infotext into {"Prompt": ..., "Negative prompt": ..., "Steps": "30", ...}.  Values stay strings,
    as A1111 `parse_generation_parameters` keeps them; JSON-quoted values are unquoted, so a value may hold commas,
    colons and newlines.  Prompts may span several lines: every line before the one starting with "Negative prompt:"
    is the prompt, the lines from there to the settings line are the negative prompt.  The last line is the
    settings line only if it has at least three `key: value` pairs (A1111's test)."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""

    prompt_and_negative: tuple[list[str], list[str]] = ([], [])
    in_negative = False
    for line in lines:
        line = line.strip()
        if not in_negative and line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].strip()
        prompt_and_negative[in_negative].append(line)

    fields = {"Prompt": "\n".join(prompt_and_negative[0]), "Negative prompt": "\n".join(prompt_and_negative[1])}
    for key, value in _PAIR.findall(last):
        fields[key] = _unquote(value.strip())
    return fields


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def a1111_to_params(fields: Mapping[str, str]) -> dict[str, Any]:
    """Parsed A1111 fields -> xldm settings (numbers as int/float, A1111 sampler names mapped back)."""
    params: dict[str, Any] = {"prompt": fields.get("Prompt", "")}
    if fields.get("Negative prompt"):
        params["negative_prompt"] = fields["Negative prompt"]
    for setting, key in _BEFORE_SIZE + _AFTER_SIZE:
        if key in fields:
            params[setting] = (_number(fields[key]) if setting in _NUMBERS
                               else _translate(setting, fields[key], _SCHEDULES_FROM_A1111))
    if _ETA_DDIM in fields:
        params["eta"] = _number(fields[_ETA_DDIM])
    if "hires_size" in params:
        resize = _SIZE.match(str(params["hires_size"]))
        params["hires_size"] = (int(resize.group(1)), int(resize.group(2))) if resize else params["hires_size"]
    # "Denoising strength" of a txt2img with hires fix is the second pass's
    params.pop("hires_strength" if params.keys().isdisjoint(("hires_scale", "hires_size")) else "strength", None)
    spacing = {v: k for k, v in _SPACING_SCHEDULES.items()}.get(params.get("schedule"))
    if spacing is not None:
        params["timestep_spacing"] = spacing
    if size := _SIZE.match(fields.get("Size", "")):
        params["width"], params["height"] = int(size.group(1)), int(size.group(2))
    return params


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"setting of type {type(value).__name__} cannot be stored in PNG metadata: {value!r}")


def png_text(params: Mapping[str, Any]) -> dict[str, str]:
    """The two text chunks of a generated image: {"parameters": A1111 infotext, "xldm": every setting as JSON}."""
    return {A1111_CHUNK: format_a1111_parameters(params),
            XLDM_CHUNK: json.dumps(dict(params), ensure_ascii=False, default=_json_default)}


def encode_png(image: Image.Image, params: Mapping[str, Any] | None = None) -> bytes:
    """The PNG file of `image` in memory, with the text chunks of `params` (`png_text`; none without)."""
    info = PngInfo()
    for key, value in (png_text(params) if params is not None else {}).items():
        info.add_text(key, value)  # tEXt for Latin-1 text, iTXt (UTF-8) otherwise (Pillow PngInfo.add_text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, params: Mapping[str, Any]) -> Path:
    """`encode_png(image, params)` written atomically at `path` (`xldm.weights.io.atomic_write`: no reader sees
    half a PNG, an interrupted save leaves no partial file); returns the path.  JSON stores tuples as lists."""
    return save_image(image, path, params, format="PNG")


# file extension -> Pillow format; A1111 modules/images.py save_image_with_geninfo writes these three
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
JPEG_QUALITY = 80  # A1111 shared options jpeg_quality (also used for lossy WebP)
USER_COMMENT = 0x9286  # EXIF UserComment, in the Exif IFD (0x8769)
_UNICODE_PREFIX = b"UNICODE\0"  # piexif.helper.UserComment: "UNICODE" encoding = UTF-16 BE after this prefix
_ASCII_PREFIX = b"ASCII\0\0\0"


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format for a file name by its extension; ValueError for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{os.fspath(path)}: unknown image type {suffix or '(no extension)'!r}; use "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def exif_user_comment(text: str) -> bytes:
    """An EXIF block holding `text` as UserComment, as A1111 writes it with piexif (big-endian, "UNICODE")."""
    from PIL import ExifTags

    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[USER_COMMENT] = _UNICODE_PREFIX + text.encode("utf_16_be")
    return exif.tobytes()


def _decode_user_comment(raw: bytes | str) -> str:
    """piexif.helper.UserComment.load: the 8-byte character-code prefix names the encoding."""
    if isinstance(raw, str):
        return raw
    prefix, body = raw[:8], raw[8:]
    if prefix == _UNICODE_PREFIX:
        return body.decode("utf_16_be", errors="replace")
    if prefix == _ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    return raw.decode("utf-8", errors="replace").lstrip("\0")


def encode_image(image: Image.Image, params: Mapping[str, Any] | None = None, format: str = "PNG") -> bytes:
    """The file of `image` in memory: PNG with the text chunks of `params`, or JPEG / WebP with their infotext in
    EXIF UserComment (A1111's layout)."""
    if format == "PNG":
        return encode_png(image, params)
    options: dict[str, Any] = {"quality": JPEG_QUALITY}
    if params is not None:
        options["exif"] = exif_user_comment(format_a1111_parameters(params))
    if format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha (A1111 converts RGBA to RGB for JPEG too)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike, params: Mapping[str, Any] | None,
               format: str | None = None) -> Path:
    """`image` written atomically at `path` in the format of its extension (.png, .jpg/.jpeg, .webp) or `format`,
    with its settings (`encode_image`); returns the path."""
    from xldm.weights.io import atomic_write  # here: reading PNG metadata needs no torch

    data = encode_image(image, params, format or image_format(path))
    with atomic_write(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def image_text(image: Image.Image) -> dict[str, str]:
    """The settings text of an open image: its PNG text chunks, and an EXIF UserComment (JPEG, WebP) as the
    `parameters` text (A1111 modules/images.py read_info_from_image)."""
    text = {key: str(value) for key, value in getattr(image, "text", {}).items()}
    if A1111_CHUNK not in text:
        try:
            comment = image.getexif().get_ifd(0x8769).get(USER_COMMENT)
        except Exception:  # a malformed EXIF block: no parameters, as A1111 reads it
            comment = None
        if comment:
            text[A1111_CHUNK] = _decode_user_comment(comment)
    return text


def read_png_text(path: str | os.PathLike) -> dict[str, str]:
    """All tEXt/zTXt/iTXt chunks of a PNG as {keyword: text}; for JPEG / WebP, the EXIF UserComment as
    {"parameters": text}."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read only with the pixels
            return image_text(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{os.fspath(path)}: cannot read this image ({e})") from None


def read_png_params(path: str | os.PathLike) -> dict[str, Any]:
    """The settings an image was made with: the `xldm` JSON chunk, or, for images from other tools and for JPEG /
    WebP, the A1111 `parameters` text converted with `a1111_to_params`.  Raises ValueError if it has neither."""
    text = read_png_text(path)
    if XLDM_CHUNK in text:
        try:
            params = json.loads(text[XLDM_CHUNK])
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: the {XLDM_CHUNK!r} text chunk is not JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{os.fspath(path)}: the {XLDM_CHUNK!r} text chunk must be a JSON object of settings, "
                             f"found a {type(params).__name__}")
        return params
    if A1111_CHUNK in text:
        return a1111_to_params(parse_a1111_parameters(text[A1111_CHUNK]))
    raise ValueError(f"{os.fspath(path)}: no generation settings found (expected a PNG text chunk "
                     f"{XLDM_CHUNK!r} or {A1111_CHUNK!r}, or an EXIF UserComment; found {sorted(text) or 'none'})")
