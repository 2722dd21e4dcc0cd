"""ControlNet in generation: control units (a ControlNet, its control image, scale and guidance window), their
images, the canny preprocessor, and the residuals of several units at one denoising step.

Conventions are diffusers' `StableDiffusionXLControlNetPipeline` (pipelines/controlnet/pipeline_controlnet_sd_xl.py)
and `MultiControlNetModel` (models/controlnets/multicontrolnet.py):
  * the control image is RGB in [0, 1], resized to the output size (`VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False)`: Lanczos), repeated per image, and given to both halves of a CFG batch (guess mode off);
  * step i of N is controlled unless i / N < start or (i + 1) / N > end (`controlnet_keep`), N counting the steps
    after the image-to-image start; a unit's residuals are scaled by its scale, several units' are summed in order;
  * a unit with scale 0 (or outside its window) is skipped, so scale 0 gives the image without ControlNet bit for bit
    (diffusers runs it and adds zeros)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xldm.errors import ControlNetError
from xldm.images import open_image, to_rgb
from xldm.models.controlnet import ControlNet, Residuals

# The canny thresholds of the diffusers ControlNet docs (cv2.Canny(image, 100, 200)), also A1111's defaults.
CANNY_DEFAULTS = (100, 200)
PREPROCESSORS = ("canny",)


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet applied to a generation: `model` a path (diffusers folder, single file) or a loaded
    ControlNet; `image` a PIL image or an image file's path; `preprocess` None (the image is the control map, as
    depth or pose maps are) or "canny[:LOW,HIGH]"."""

    model: str | os.PathLike | ControlNet = field(repr=False)
    image: Image.Image | str | os.PathLike = field(repr=False)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None


def parse_preprocess(spec: str | None) -> tuple[str, tuple[int, int]] | None:
    """"canny" or "canny:LOW,HIGH" -> ("canny", (low, high)); None -> None.  ValueError for anything else."""
    if spec is None or spec == "none":
        return None
    match = re.fullmatch(r"canny(?::(\d+),(\d+))?", spec.strip())
    if not match:
        raise ValueError(f"unknown control preprocessor {spec!r}; expected canny or canny:LOW,HIGH (e.g. canny:100,200)")
    low, high = (int(match.group(1)), int(match.group(2))) if match.group(1) else CANNY_DEFAULTS
    if not 0 <= low <= high <= 255 * 4:
        raise ValueError(f"canny thresholds must satisfy 0 <= LOW <= HIGH, got {low},{high}")
    return "canny", (low, high)


def canny(image: Image.Image, low: int = CANNY_DEFAULTS[0], high: int = CANNY_DEFAULTS[1]) -> Image.Image:
    """OpenCV's Canny edge map of `image` (white edges on black), as RGB: the diffusers ControlNet docs' recipe
    (`cv2.Canny(np.array(image), low, high)`, then stacked to three channels)."""
    import cv2

    edges = cv2.Canny(np.asarray(to_rgb(image)), low, high)
    return Image.fromarray(edges).convert("RGB")


def open_control_image(path: str | os.PathLike) -> Image.Image:
    try:
        return open_image(path)
    except (ValueError, OSError) as e:
        raise ControlNetError(f"control image: {e}") from None


def control_image(image: Any, width: int, height: int, preprocess: str | None = None) -> torch.Tensor:
    """A control image -> (1, 3, height, width) float32 in [0, 1]: opened if a path, preprocessed, RGB, Lanczos-
    resized to the output size.  Anything that is not an image raises ControlNetError."""
    if isinstance(image, (str, os.PathLike)):
        image = open_control_image(image)
    if not isinstance(image, Image.Image):
        raise ControlNetError(f"control image must be a PIL image or an image file, got {type(image).__name__}")
    try:
        image = to_rgb(image)
    except ValueError as e:
        raise ControlNetError(f"control image: {e}") from None
    chosen = parse_preprocess(preprocess)
    if chosen is not None:
        image = canny(image, *chosen[1])
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def check_unit(unit: Any, index: int) -> None:
    """A unit's settings, before anything is loaded: ValueError naming the unit and the setting."""
    if not isinstance(unit, ControlUnit):
        raise ValueError(f"controlnets[{index}] must be a ControlUnit, got {type(unit).__name__}")
    if not isinstance(unit.scale, (int, float)) or not math.isfinite(unit.scale):
        raise ValueError(f"ControlNet {index}: scale must be a finite number, got {unit.scale!r}")
    for name in ("start", "end"):
        value = getattr(unit, name)
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"ControlNet {index}: {name} must be in [0, 1], got {value!r}")
    if unit.start >= unit.end:  # diffusers check_inputs: control_guidance_start < control_guidance_end
        raise ValueError(f"ControlNet {index}: start {unit.start} must be below end {unit.end}")
    parse_preprocess(unit.preprocess)
    if unit.image is None:
        raise ControlNetError(f"ControlNet {index}: no control image")


def unit_name(unit: ControlUnit) -> str:
    return Path(unit.model).name if isinstance(unit.model, (str, os.PathLike)) else "controlnet"


def unit_infotext(unit: ControlUnit, name: str) -> str:
    """A1111 sd-webui-controlnet's infotext value: "Module: canny, Model: NAME, Weight: 1, Guidance Start: 0, ..."."""
    chosen = parse_preprocess(unit.preprocess)
    return (f"Module: {chosen[0] if chosen else 'none'}, Model: {name}, Weight: {unit.scale:g}, "
            f"Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}")


class ControlStack:
    """The summed residuals of several ControlNets at the current step: `stack(x, t, context, vector)` -> Residuals
    or None (no unit active).  `step` is the index of the step being taken among `total`; the sampling loop
    advances it after each step (`advance`)."""

    def __init__(self, units: list[tuple[ControlNet, torch.Tensor, ControlUnit]], total: int) -> None:
        self.units, self.total, self.step = units, total, 0
        # each unit's control image features for the batch in use (rows, device), computed on first use: the same
        # at every step, so the hint network runs once per generation instead of once per step
        self._features: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def features(self, index: int, rows: int, device: torch.device) -> torch.Tensor:
        key = (index, rows, device)
        if key not in self._features:
            net, hint, _ = self.units[index]
            with torch.no_grad():
                self._features[key] = net.hint_features(hint.repeat(rows, 1, 1, 1).to(device))
        return self._features[key]

    def advance(self, i: int, *_) -> None:
        self.step = i + 1

    def scales(self) -> list[float]:
        i, n = self.step, self.total
        return [unit.scale * (1.0 - float(i / n < unit.start or (i + 1) / n > unit.end)) for _, _, unit in self.units]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 vector: torch.Tensor | None) -> Residuals | None:
        total: Residuals | None = None
        for index, ((net, hint, _), scale) in enumerate(zip(self.units, self.scales())):
            if scale == 0:
                continue
            rows = x.shape[0] // hint.shape[0]  # the CFG batch: the same control image for both halves
            down, mid = net(x, t, context, vector, None, scale, hint_features=self.features(index, rows, x.device))
            total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down)], total[1] + mid)
        return total


def edge_agreement(image: Image.Image, control_map: Image.Image, tolerance: int = 2) -> dict[str, float]:
    """How well an image's canny edges follow a control map's edges (white on black), the boundary F-measure of
    the BSDS benchmark (Martin et al. 2004) with a `tolerance`-pixel match distance: precision = share of the
    image's edge pixels within `tolerance` of a control edge, recall = share of the control's edge pixels within
    `tolerance` of an image edge, f1 their harmonic mean (0 when either side has no edges)."""
    import cv2

    if image.size != control_map.size:
        control_map = control_map.resize(image.size, resample=Image.Resampling.NEAREST)
    found = np.asarray(canny(image).convert("L")) > 127
    wanted = np.asarray(to_rgb(control_map).convert("L")) > 127
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1,) * 2)
    near_wanted = cv2.dilate(wanted.astype(np.uint8), kernel) > 0
    near_found = cv2.dilate(found.astype(np.uint8), kernel) > 0
    precision = float((found & near_wanted).sum() / found.sum()) if found.any() else 0.0
    recall = float((wanted & near_found).sum() / wanted.sum()) if wanted.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
