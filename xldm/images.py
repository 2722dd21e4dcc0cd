"""Images in and out of the pipeline as diffusers' `VaeImageProcessor` in the SDXL pipelines: Lanczos resize,
pixels / 255, `2x - 1`; masks grayscale, resized, binarised at 0.5; output `(x / 2 + 0.5).clamp(0, 1)`, then
`(x * 255).round()` to uint8.  Pillow's decompression-bomb guard (Image.MAX_IMAGE_PIXELS) stays at its default."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (EXIF orientation applied), or raise a ValueError that names the file."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({e})") from None


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height) of a PIL image or a (B, C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[-1]), int(image.shape[-2])


def round_to_multiple(width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """Round down to a multiple of `multiple` (diffusers `get_default_height_width`)."""
    return width - width % multiple, height - height % multiple


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", *_ALPHA_MODES, *SIXTEEN_BIT_MODES)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, for inference and training alike: 16-bit greyscale scaled by 255/65535 (Pillow's convert would clip
    it to white), transparency composited onto white (not dropped to black), the other `CONVERTIBLE_MODES` by
    Pillow.  Other modes (float "F", ...) have no defined scale: ValueError naming the mode."""
    mode = image.mode
    if mode not in CONVERTIBLE_MODES:
        raise ValueError(f"image mode {mode!r} is not supported; save the image as 8- or 16-bit")
    if mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """An RGB image -> (1, 3, height, width) float32 in [-1, 1], Lanczos-resized; a tensor is taken as
    (B, 3, H, W) in [0, 1] of the requested size."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W), got {tuple(image.shape)}")
        if (found := image_size(image)) != (width, height):
            raise ValueError(f"image tensor is {found[0]}x{found[1]}, expected {width}x{height}")
        return image.float() * 2 - 1
    array = np.asarray(_resize(to_rgb(image), width, height)).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_to_tensor(mask: Image.Image | torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A mask (white = repaint) -> (1, 1, height, width) float32 of 0/1, binarised at 0.5 after the resize."""
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] != 1 else m[None]
        if (found := image_size(m)) != (width, height):
            raise ValueError(f"mask is {found[0]}x{found[1]}, expected {width}x{height}")
    else:
        gray = _resize(mask, width, height).convert("L")
        m = torch.from_numpy(np.asarray(gray).astype(np.float32) / 255.0)[None, None]
    return (m >= 0.5).to(torch.float32)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) decoder output in [-1, 1] -> PIL images (diffusers `postprocess(output_type="pil")`)."""
    array = (x / 2 + 0.5).clamp(0, 1).detach().cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]
