"""`xldm generate --from-png IMG`: the settings an image's metadata records (its xldm JSON, or A1111 infotext),
type-checked, filling the `xldm generate` arguments not given on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# settings of an image's metadata (`xldm.pngmeta.read_png_params`) -> `xldm generate` arguments they fill in
_FROM_PNG = {"prompt": "prompt", "negative_prompt": "negative", "steps": "steps", "cfg": "cfg", "seed": "seed",
             "sampler": "sampler", "width": "width", "height": "height", "clip_skip": "clip_skip",
             "timestep_spacing": "timestep_spacing", "prediction": "prediction",
             "zero_terminal_snr": "zero_terminal_snr", "original_size": "original_size",
             "crop_top_left": "crop_top_left", "target_size": "target_size",
             "negative_original_size": "negative_original_size", "negative_target_size": "negative_target_size",
             "aesthetic_score": "aesthetic_score", "negative_aesthetic_score": "negative_aesthetic_score",
             "weighting": "weighting", "hires_scale": "hires_scale", "hires_size": "hires_size",
             "hires_upscaler": "hires_upscaler", "hires_strength": "hires_strength", "hires_steps": "hires_steps",
             "eta": "eta", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise",
             "cache_interval": "deep_cache", "cache_branch": "cache_branch", "cfg_end": "cfg_end"}


# the type of each setting read back; the others are numbers (int or float)
_INTEGER_SETTINGS = ("steps", "seed", "width", "height", "clip_skip", "hires_steps", "cache_interval", "cache_branch")
_PAIR_SETTINGS = ("original_size", "crop_top_left", "target_size", "negative_original_size", "negative_target_size",
                  "hires_size")
_TEXT_SETTINGS = ("prompt", "negative_prompt", "sampler", "timestep_spacing", "prediction", "hires_upscaler",
                  "long_prompts")
_BOOLEAN_SETTINGS = ("zero_terminal_snr", "weighting")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_setting(image: str, setting: str, value):
    """`value` of an image's `setting` if it has the setting's type (a pair as a tuple), else a ValueError."""
    if setting in _INTEGER_SETTINGS:
        valid, expected = _is_integer(value), "an integer"
    elif setting in _PAIR_SETTINGS:
        valid = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_integer, value))
        expected, value = "two integers", tuple(value) if valid else value
    elif setting in _TEXT_SETTINGS:
        valid, expected = isinstance(value, str), "text"
    elif setting in _BOOLEAN_SETTINGS:
        valid, expected = isinstance(value, bool), "true or false"
    else:
        valid, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if not valid:
        raise ValueError(f"--from-png {image}: the setting {setting!r} must be {expected}, found {value!r}")
    return value


def apply_png_settings(args: argparse.Namespace) -> dict:
    """--from-png IMG: the image's settings (its xldm JSON, or A1111 infotext from PNG text or JPEG / WebP EXIF) fill
    every argument not given on the command line; returns them.  The model is the one given (or the default):
    metadata names a file, not where it is."""
    from xldm.pngmeta import read_png_params

    if not Path(args.from_png).is_file():
        raise ValueError(f"--from-png {args.from_png}: no such file")
    params = read_png_params(args.from_png)
    from xldm.diffusion.schedules import SAMPLER_NAMES

    # A1111 >= 1.9 writes the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"): xldm's dpmpp_2m_karras
    if params.get("schedule") == "karras" and f"{params.get('sampler')}_karras" in SAMPLER_NAMES:
        params = dict(params, sampler=f"{params['sampler']}_karras")
    for setting, name in _FROM_PNG.items():
        value = params.get(setting)
        if value is None or getattr(args, name) is not None:
            continue
        value = _checked_setting(args.from_png, setting, value)
        setattr(args, name, {"epsilon": "eps"}.get(value, value) if setting == "prediction" else value)
    if args.long_prompts is None and params.get("long_prompts") is not None:
        args.long_prompts = _checked_setting(args.from_png, "long_prompts", params["long_prompts"]) == "chunk"
    if args.refiner is not None and args.refiner_start is None and params.get("refiner_start") is not None:
        args.refiner_start = _checked_setting(args.from_png, "refiner_start", params["refiner_start"])
    if args.init_image is not None and args.strength is None and params.get("strength") is not None:
        args.strength = _checked_setting(args.from_png, "strength", params["strength"])
    stages = [setting for setting in _CASCADE_SETTINGS if params.get(setting) is not None]
    if args.cascade is not None:  # a cascade's image: its per-stage lists
        for setting in stages:
            if getattr(args, setting) is None:
                setattr(args, setting, _checked_stage_list(args.from_png, setting, params[setting]))
    elif stages:
        print(f"xldm generate: --from-png {args.from_png}: {', '.join(stages)} of the image apply to a --cascade "
              f"only; not used with a --model", file=sys.stderr)
    return params


_CASCADE_SETTINGS = {"cascade_steps": int, "cascade_cfg": float, "cascade_aug": float}  # as CascadePipeline.params


def _checked_stage_list(image: str, setting: str, value) -> list:
    """A cascade image's per-stage list (`_CASCADE_SETTINGS`), or a ValueError saying what it holds."""
    kind = _CASCADE_SETTINGS[setting]
    valid = isinstance(value, list) and value and all(
        (_is_integer(v) if kind is int else isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value)
    if not valid:
        raise ValueError(f"--from-png {image}: the setting {setting!r} must be a list of "
                         f"{'integers' if kind is int else 'numbers'}, one per stage, found {value!r}")
    return [kind(v) for v in value]
