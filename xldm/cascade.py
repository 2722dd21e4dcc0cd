"""Imagen-style cascaded pixel diffusion: a small base model at low resolution, then super-resolution stages.

A cascade (Ho et al. 2021, "Cascaded Diffusion Models"; Saharia et al. 2022, "Imagen", Sec. 2.4) is a list of
pixel-space diffusion models, each the same `UNet` class, configured:

* base stage: UNet(in 3, out 3) on the noisy RGB image, text conditioning as SDXL's conditioner builds it
  (context = the text encoders' features, vector = pooled text + Fourier-embedded scalars);
* super-resolution (SR) stage: UNet(in 6, out 3) on cat([noisy target, upsample(low-res)], channels), the
  low-res image upsampled bilinearly (align_corners=False) to the target size, same text conditioning, plus the
  noise-augmentation level s of the low-res image as one more Fourier-embedded scalar in the vector (the
  mechanism of SDXL's micro-conditioning).

Noise conditioning augmentation (Imagen Sec. 2.4; CDM Sec. 4.1): in training the low-res image is corrupted as
    z = sqrt(alpha_s) x + sqrt(1 - alpha_s) eps,  alpha_s = cos^2(pi s / 2),  s ~ U[0, s_max]
(the continuous cosine variance-preserving schedule, Nichol & Dhariwal 2021 eq. 17 without the offset), and s
is given to the model; at sampling s is a user setting (`DEFAULT_SR_AUG_LEVEL`).  s = 0 leaves x unchanged.

Every stage runs on SDXL's discrete schedule and samplers (`xldm.diffusion`), so all samplers work here too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xldm.conditioning import Conditioning, encode_prompts
from xldm.config import TextEncoderConfig, UNetConfig
from xldm.default_model import DEFAULT_BIGG
from xldm.diffusion import make_schedule, model_denoiser, randn, sample
from xldm.diffusion.guidance import guided_model_fn
from xldm.models.layers import timestep_embedding

STAGE_KINDS = ("base", "sr")
# Scalars a stage can take in its vector, and how many numbers each is (sizes are (height, width) pairs, SDXL).
SCALAR_WIDTHS = {"original_size": 2, "crop_top_left": 2, "target_size": 2, "aug_level": 1}
# s in [0, 1] is embedded as 1000 s, the range of the diffusion timesteps the same sinusoids embed (our choice;
# Imagen conditions on the augmentation level "similar to the timestep", Sec. 2.4).
AUG_LEVEL_EMBED_SCALE = 1000.0
# Sampling-time augmentation of an SR stage's input.  Imagen sweeps s at inference (Sec. 2.4) and gives no single
# value; 0.1 is our default, between the SD x4 upscaler's noise_level 20/1000 and DeepFloyd IF stage II's 250/1000
# (diffusers StableDiffusionUpscalePipeline / IFSuperResolutionPipeline defaults).
DEFAULT_SR_AUG_LEVEL = 0.1
DEFAULT_STEPS = {"base": 30, "sr": 20}  # our defaults
DEFAULT_CFG = {"base": 5.0, "sr": 4.0}  # our defaults
STAGE_METADATA_KEY = "xldm.cascade_stage"
STAGE_FORMAT_VERSION = 1


# --- configuration ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CascadeStageConfig:
    """One stage of a cascade.  `resolution` is the (width, height) the stage is trained at (its output); an SR
    stage's input is `resolution / scale`.  Passed as `config` to `xldm.conditioning.encode_prompts` (it has the
    `kind`, `unet` and `text_encoders` that function reads)."""

    kind: str  # "base" | "sr"
    resolution: tuple[int, int]
    unet: UNetConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    scale: int = 1  # SR upscaling factor; 1 for the base stage
    micro_conditioning: tuple[str, ...] = ()  # scalars in the vector, in order; an SR stage ends with "aug_level"
    micro_conditioning_dim: int = 32  # Fourier width per scalar
    prediction_type: str = "v"  # "epsilon" | "v"

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"CascadeStageConfig ({self.kind}): {message}")

        check(self.kind in STAGE_KINDS, f"kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        check(self.prediction_type in ("epsilon", "v"), f"prediction_type must be 'epsilon' or 'v', "
                                                         f"got {self.prediction_type!r}")
        w, h = self.resolution
        check(w > 0 and h > 0, f"resolution must be positive, got {self.resolution}")
        in_ch = 3 if self.kind == "base" else 6
        check(self.unet.in_channels == in_ch and self.unet.out_channels == 3,
              f"UNet channels must be in {in_ch} / out 3, found in {self.unet.in_channels} / out "
              f"{self.unet.out_channels}")
        if self.kind == "base":
            check(self.scale == 1, f"a base stage has scale 1, got {self.scale}")
            check("aug_level" not in self.micro_conditioning, "a base stage has no low-res input to augment")
        else:
            check(self.scale >= 2, f"an SR stage upscales by an integer scale >= 2, got {self.scale}")
            check(w % self.scale == 0 and h % self.scale == 0,
                  f"resolution {w}x{h} is not divisible by scale {self.scale}")
            check(self.micro_conditioning[-1:] == ("aug_level",),
                  f"an SR stage's scalars must end with 'aug_level', got {self.micro_conditioning}")
        unknown = [n for n in self.micro_conditioning if n not in SCALAR_WIDTHS]
        check(not unknown, f"unknown scalars {unknown}; expected names from {sorted(SCALAR_WIDTHS)}")
        check(len(set(self.micro_conditioning)) == len(self.micro_conditioning),
              f"repeated scalars in {self.micro_conditioning}")
        check(len(self.text_encoders) >= 1, "needs at least one text encoder")
        pooled = self.text_encoders[-1].projection_dim
        check(pooled > 0, "the last text encoder needs a projection (its pooled output enters the vector)")
        expected = pooled + self.num_scalars * self.micro_conditioning_dim
        check(self.unet.adm_in_channels == expected,
              f"UNet adm_in_channels is {self.unet.adm_in_channels}, but pooled text ({pooled}) + "
              f"{self.num_scalars} scalars x {self.micro_conditioning_dim} = {expected}")
        context = sum(te.width for te in self.text_encoders)
        check(self.unet.context_dim == context,
              f"UNet context_dim is {self.unet.context_dim}, but the text encoders give {context}")

    @property
    def num_scalars(self) -> int:
        return sum(SCALAR_WIDTHS[n] for n in self.micro_conditioning)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(width, height) of the low-res image an SR stage expects; None for a base stage."""
        if self.kind == "base":
            return None
        return self.resolution[0] // self.scale, self.resolution[1] // self.scale

    def describe(self) -> str:
        w, h = self.resolution
        if self.kind == "base":
            return f"base {w}x{h}"
        iw, ih = self.input_size
        return f"sr x{self.scale} {iw}x{ih} -> {w}x{h}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CascadeStageConfig":
        def tup(v):
            return tuple(v) if isinstance(v, list) else v

        unet = UNetConfig(**{k: tup(v) for k, v in d["unet"].items()})
        encoders = tuple(TextEncoderConfig(**te) for te in d["text_encoders"])
        rest = {k: tup(v) for k, v in d.items() if k not in ("unet", "text_encoders")}
        return cls(unet=unet, text_encoders=encoders, **rest)

    def at_resolution(self, resolution: tuple[int, int], scale: int | None = None) -> "CascadeStageConfig":
        """The same network at another (width, height) (and, for SR, another scale): cost tables, other sizes."""
        return replace(self, resolution=tuple(resolution), scale=self.scale if scale is None else scale)


def _unet(in_channels: int, *, block_out_channels: tuple[int, ...], transformer_depth: tuple[int, ...],
          num_res_blocks: int, head_channels: int, context_dim: int, adm: int, groups: int) -> UNetConfig:
    return UNetConfig(in_channels=in_channels, out_channels=3, block_out_channels=block_out_channels,
                      num_res_blocks=num_res_blocks, transformer_depth=transformer_depth,
                      transformer_depth_middle=1, num_head_channels=head_channels, context_dim=context_dim,
                      adm_in_channels=adm, norm_groups=groups)


# --- presets ---------------------------------------------------------------------------------------------------
# Tiny stages for tests: 16 -> 32 -> 64, one small text encoder shared by all stages.
TINY_CASCADE_TEXT_ENCODER = TextEncoderConfig(width=16, layers=2, heads=2, intermediate_size=32, activation="gelu",
                                              projection_dim=16, pad_token_id=0)
_TINY_BASE_MICRO = ("original_size", "crop_top_left")
TINY_CASCADE_BASE = CascadeStageConfig(
    kind="base", resolution=(16, 16), text_encoders=(TINY_CASCADE_TEXT_ENCODER,),
    micro_conditioning=_TINY_BASE_MICRO, micro_conditioning_dim=8,
    unet=_unet(3, block_out_channels=(16, 32), transformer_depth=(0, 1), num_res_blocks=1,
               head_channels=16, context_dim=16, adm=16 + 4 * 8, groups=8),
)
TINY_CASCADE_SR = CascadeStageConfig(
    kind="sr", resolution=(32, 32), scale=2, text_encoders=(TINY_CASCADE_TEXT_ENCODER,),
    micro_conditioning=("aug_level",), micro_conditioning_dim=8,
    unet=_unet(6, block_out_channels=(16, 32), transformer_depth=(0, 0), num_res_blocks=1,
               head_channels=16, context_dim=16, adm=16 + 8, groups=8),
)
TINY_CASCADE_SR2 = TINY_CASCADE_SR.at_resolution((64, 64))

# The default small cascade, 32 -> 64 -> 128 (the emoji data's 128^2 in three stages).  Its one text encoder is the
# default latent model's bigG-shaped encoder (`xldm.default_model.DEFAULT_BIGG`, pre-trained contrastively and
# frozen), shared by all stages and shipped once, inside the default model's file: the cascade's own files hold
# only UNets (`load_cascade("default")`).  Widths are ours, sized for <= 15 MB of fp16 UNet weights.  The SR UNets
# attend only at their lowest resolution, as Imagen's Efficient U-Net does for its super-resolution models
# (Saharia et al. 2022, appendix).
CASCADE_TEXT_ENCODER = DEFAULT_BIGG
_CTX = CASCADE_TEXT_ENCODER.width
_POOLED = CASCADE_TEXT_ENCODER.projection_dim
CASCADE_BASE_32 = CascadeStageConfig(
    kind="base", resolution=(32, 32), text_encoders=(CASCADE_TEXT_ENCODER,),
    micro_conditioning=("original_size", "crop_top_left"), micro_conditioning_dim=32,
    unet=_unet(3, block_out_channels=(48, 96, 96), transformer_depth=(0, 1, 1), num_res_blocks=1,
               head_channels=32, context_dim=_CTX, adm=_POOLED + 4 * 32, groups=16),
)
CASCADE_SR_64 = CascadeStageConfig(
    kind="sr", resolution=(64, 64), scale=2, text_encoders=(CASCADE_TEXT_ENCODER,),
    micro_conditioning=("aug_level",), micro_conditioning_dim=32,
    unet=_unet(6, block_out_channels=(24, 48, 48), transformer_depth=(0, 0, 1), num_res_blocks=1,
               head_channels=24, context_dim=_CTX, adm=_POOLED + 32, groups=8),
)
CASCADE_SR_128 = CascadeStageConfig(
    kind="sr", resolution=(128, 128), scale=2, text_encoders=(CASCADE_TEXT_ENCODER,),
    micro_conditioning=("aug_level",), micro_conditioning_dim=32,
    unet=_unet(6, block_out_channels=(24, 24, 48, 48), transformer_depth=(0, 0, 0, 1), num_res_blocks=1,
               head_channels=24, context_dim=_CTX, adm=_POOLED + 32, groups=8),
)

CASCADE_STAGE_PRESETS: dict[str, CascadeStageConfig] = {
    "tiny-cascade-base-16": TINY_CASCADE_BASE,
    "tiny-cascade-sr-32": TINY_CASCADE_SR,
    "tiny-cascade-sr-64": TINY_CASCADE_SR2,
    "cascade-base-32": CASCADE_BASE_32,
    "cascade-sr-64": CASCADE_SR_64,
    "cascade-sr-128": CASCADE_SR_128,
}
CASCADE_PRESETS: dict[str, tuple[CascadeStageConfig, ...]] = {
    "tiny-cascade": (TINY_CASCADE_BASE, TINY_CASCADE_SR, TINY_CASCADE_SR2),
    "cascade-small": (CASCADE_BASE_32, CASCADE_SR_64, CASCADE_SR_128),
}


# --- a loaded stage ----------------------------------------------------------------------------------------------

@dataclass
class CascadeStage:
    """A stage's networks: its UNet and its (frozen) text encoders, in `config.text_encoders` order."""

    config: CascadeStageConfig
    unet: nn.Module
    text_encoders: tuple[nn.Module, ...]

    @classmethod
    def random(cls, config: CascadeStageConfig, seed: int = 0,
               text_encoders: Sequence[nn.Module] | None = None) -> "CascadeStage":
        """Freshly initialised networks (seeded); `text_encoders` reuses given (e.g. pretrained) encoders."""
        from xldm.models.clip import CLIPTextModel
        from xldm.models.unet import UNet

        torch.manual_seed(seed)
        unet = UNet(config.unet)
        encoders = tuple(text_encoders) if text_encoders is not None else tuple(
            CLIPTextModel(te) for te in config.text_encoders)
        _check_encoder_configs(config, encoders, "text_encoders")
        return cls(config=config, unet=unet, text_encoders=encoders)

    def tokenizers(self) -> tuple:
        from xldm.tokenizer import CLIPTokenizer

        return tuple(CLIPTokenizer.for_encoder(te) for te in self.config.text_encoders)

    def to(self, device=None, dtype=None) -> "CascadeStage":
        for module in (self.unet, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        return self


def _check_encoder_configs(config: CascadeStageConfig, encoders: Sequence[nn.Module], where: str) -> None:
    found = tuple(getattr(e, "cfg", None) for e in encoders)
    if found != config.text_encoders:
        raise ValueError(f"{where}: the stage ({config.describe()}) expects text encoders {config.text_encoders}, "
                         f"found {found}")


# --- noise conditioning augmentation -----------------------------------------------------------------------------

def aug_alpha(s: Tensor) -> Tensor:
    """alpha_s = cos^2(pi s / 2): signal variance kept at augmentation level s in [0, 1] (cosine VP schedule,
    Nichol & Dhariwal 2021 eq. 17 with offset 0); alpha_0 = 1 exactly, alpha_1 ~ 0."""
    return torch.cos(s.double() * (math.pi / 2)).pow(2).float()


def _levels(s: float | Tensor, batch: int, device) -> Tensor:
    s = torch.as_tensor(s, dtype=torch.float32, device=device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"augmentation level: expected one value or {batch} (one per image), found {s.numel()}")
    if not bool(torch.all((s >= 0) & (s <= 1))):
        raise ValueError(f"augmentation level must lie in [0, 1], found {s.tolist()}")
    return s


def augment(x: Tensor, s: float | Tensor, generator=None, *, noise: Tensor | None = None) -> Tensor:
    """Imagen's noise conditioning augmentation: z = sqrt(alpha_s) x + sqrt(1 - alpha_s) eps per image.

    `s` is one level or one per image (B,), in [0, 1]; eps is `noise` or drawn from `generator` (one
    torch.Generator, or one per image, as `xldm.diffusion.randn`).  Images with s = 0 are returned unchanged,
    bit for bit (no noise is added).  The result is float32.
    """
    levels = _levels(s, x.shape[0], x.device)
    if noise is None:
        noise = randn(x.shape, generator, x.device, torch.float32)
    elif noise.shape != x.shape:
        raise ValueError(f"augmentation noise: expected shape {tuple(x.shape)}, found {tuple(noise.shape)}")
    alpha = aug_alpha(levels)[:, None, None, None]
    x = x.float()
    z = alpha.sqrt() * x + (1 - alpha).sqrt() * noise.to(x)
    return torch.where((levels == 0)[:, None, None, None], x, z)


# --- the SR stage's input ------------------------------------------------------------------------------------------

def check_low_res(config: CascadeStageConfig, low_res: Tensor, target_size: tuple[int, int]) -> None:
    """An SR stage making a `target_size` (width, height) image needs a (B, 3, H / scale, W / scale) low-res image:
    a wrong size or aspect ratio is a ValueError naming both."""
    tw, th = target_size
    expected = (tw // config.scale, th // config.scale)
    if low_res.ndim != 4 or low_res.shape[1] != 3:
        raise ValueError(f"{config.describe()}: the low-res image must be a (B, 3, H, W) tensor, found shape "
                         f"{tuple(low_res.shape)}")
    found = (int(low_res.shape[-1]), int(low_res.shape[-2]))
    if found != expected or tw % config.scale or th % config.scale:
        ratio = "" if found[0] * expected[1] == found[1] * expected[0] else \
            f" (aspect ratio {_ratio(*found)} instead of {_ratio(*expected)})"
        raise ValueError(f"{config.describe()}: to make a {tw}x{th} image it expects a low-res image of "
                         f"{expected[0]}x{expected[1]}, found {found[0]}x{found[1]}{ratio}")


def _ratio(w: int, h: int) -> str:
    g = math.gcd(w, h) or 1
    return f"{w // g}:{h // g}"


def upsample_low_res(low_res: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling to (width, height) with align_corners=False (pixel centres), as the SR input."""
    return F.interpolate(low_res.float(), size=(size[1], size[0]), mode="bilinear", align_corners=False)


def sr_model_input(noisy: Tensor, low_res_upsampled: Tensor) -> Tensor:
    """cat([noisy target (B, 3, H, W), upsampled low-res (B, 3, H, W)], channels) -> (B, 6, H, W)."""
    if noisy.shape[0] != low_res_upsampled.shape[0] or noisy.shape[-2:] != low_res_upsampled.shape[-2:]:
        raise ValueError(f"SR input: the noisy target {tuple(noisy.shape)} and the upsampled low-res image "
                         f"{tuple(low_res_upsampled.shape)} must have the same batch and size")
    return torch.cat([noisy, low_res_upsampled.to(noisy.dtype)], dim=1)


def downsample_for_sr(high_res: Tensor, scale: int) -> Tensor:
    """The low-res half of a training pair: box-filter (area) downsampling by `scale` (our choice)."""
    h, w = high_res.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"a {w}x{h} image cannot be downsampled by {scale}: sides must be multiples of it")
    return F.avg_pool2d(high_res.float(), scale)


# --- the vector ----------------------------------------------------------------------------------------------------

def stage_scalars(config: CascadeStageConfig, batch: int, values: dict[str, Any]) -> Tensor:
    """(B, num_scalars) float32 in `config.micro_conditioning` order.  Each value is a number / pair or a per-image
    tensor ((B,) or (B, 2)); "aug_level" is the level s in [0, 1] (embedded as 1000 s)."""
    columns = []
    for name in config.micro_conditioning:
        if values.get(name) is None:
            raise ValueError(f"{config.describe()} needs the scalar {name!r}, found none")
        width = SCALAR_WIDTHS[name]
        v = torch.as_tensor(values[name], dtype=torch.float32).cpu()
        if v.ndim <= 1 and v.numel() == width:
            v = v.reshape(1, width).expand(batch, width)
        v = v.reshape(batch, width) if v.numel() == batch * width else None
        if v is None:
            raise ValueError(f"{config.describe()}: scalar {name!r} must hold {width} number(s) or one row per "
                             f"image ({batch}, {width}), found {values[name]!r}")
        columns.append(v * AUG_LEVEL_EMBED_SCALE if name == "aug_level" else v)
    return torch.cat(columns, dim=1) if columns else torch.zeros(batch, 0)


def stage_vector(config: CascadeStageConfig, pooled: Tensor, scalars: Tensor,
                 keep_micro: Tensor | None = None) -> Tensor:
    """(B, adm_in_channels) = cat([pooled, fourier(scalar_1), ...]) as `xldm.conditioning.vector_conditioning`
    (same `timestep_embedding`, [cos | sin]).  `keep_micro` (B,) bool zeroes the embeddings of the scalars other
    than aug_level (conditioning dropout, sgm ucg_rate); the augmentation level is never dropped."""
    dim = config.micro_conditioning_dim
    n = scalars.shape[1]
    if n != config.num_scalars or scalars.shape[0] != pooled.shape[0]:
        raise ValueError(f"{config.describe()}: scalars expected shape ({pooled.shape[0]}, {config.num_scalars}), "
                         f"found {tuple(scalars.shape)}")
    emb = timestep_embedding(scalars.reshape(-1).to(pooled.device), dim).reshape(scalars.shape[0], n * dim)
    if keep_micro is not None:
        micro = n - (1 if config.kind == "sr" else 0)
        mask = torch.ones_like(emb)
        mask[:, : micro * dim] = keep_micro.to(emb)[:, None]
        emb = emb * mask
    dtype = torch.promote_types(pooled.dtype, torch.float32)
    return torch.cat([pooled.to(dtype), emb.to(dtype)], dim=1)


def stage_conditioning(stage: CascadeStage, prompts: list[str], negative_prompts: list[str] | None,
                       scalars: Tensor, *, guidance: bool) -> Conditioning:
    """Context and vector for one sampling run; with guidance the batch is [negatives, positives].  No negative
    prompt means zero context and pooled text, the unconditional input the stage saw under caption dropout."""
    tokenizers = stage.tokenizers()
    pos = encode_prompts(stage.text_encoders, tokenizers, stage.config, prompts)
    context, pooled = pos.context, pos.pooled
    if guidance:
        if negative_prompts is None:
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            neg = encode_prompts(stage.text_encoders, tokenizers, stage.config, negative_prompts)
            neg_context, neg_pooled = neg.context, neg.pooled
        context, pooled = torch.cat([neg_context, context]), torch.cat([neg_pooled, pooled])
        scalars = torch.cat([scalars, scalars])
    return Conditioning(context=context, vector=stage_vector(stage.config, pooled, scalars))


# --- ordering and sizes --------------------------------------------------------------------------------------------

def check_stage_order(configs: Sequence[CascadeStageConfig], *, has_init_image: bool | None = None) -> None:
    """A cascade is [base?, sr, sr, ...] with each SR stage's input the previous stage's output and resolutions
    increasing.  `has_init_image` (when known): a cascade starting with an SR stage needs one, a base-first
    cascade takes none.  Violations are ValueErrors naming what was expected and found."""
    if not configs:
        raise ValueError("a cascade needs at least one stage, found none")
    for i, cfg in enumerate(configs):
        if cfg.kind == "base" and i > 0:
            raise ValueError(f"stage {i} is a base stage ({cfg.describe()}); a base stage can only come first, "
                             f"found after {configs[i - 1].describe()}")
    for i in range(1, len(configs)):
        prev, cur = configs[i - 1], configs[i]
        if cur.resolution[0] <= prev.resolution[0] or cur.resolution[1] <= prev.resolution[1]:
            raise ValueError(f"stages out of order: resolutions must increase, but stage {i} ({cur.describe()}) "
                             f"follows stage {i - 1} ({prev.describe()})")
    for i in range(1, len(configs)):
        prev, cur = configs[i - 1], configs[i]
        pw, ph = prev.resolution
        if cur.input_size != prev.resolution:
            raise ValueError(f"stage {i} ({cur.describe()}) expects a {cur.input_size[0]}x{cur.input_size[1]} input, "
                             f"but stage {i - 1} ({prev.describe()}) makes {pw}x{ph}")
    if has_init_image is True and configs[0].kind == "base":
        raise ValueError(f"init_image given, but stage 0 is a base stage ({configs[0].describe()}); an input image "
                         f"needs a cascade that starts with an SR stage")
    if has_init_image is False and configs[0].kind == "sr":
        raise ValueError(f"stage 0 is an SR stage ({configs[0].describe()}) and expects a low-res input image; "
                         f"found no init_image (or put a base stage first)")


def plan_sizes(configs: Sequence[CascadeStageConfig], size: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """(width, height) of each stage's output: the last one `size` (default: the last stage's resolution), each
    earlier one the next one divided by that stage's scale (must divide exactly).  Any aspect ratio works: the
    UNets are convolutional."""
    final = tuple(size) if size is not None else configs[-1].resolution
    if len(final) != 2 or not all(isinstance(v, int) and v > 0 for v in final):
        raise ValueError(f"size must be (width, height) of positive ints, found {size!r}")
    sizes = [final]
    for cfg in reversed(configs[1:]):
        w, h = sizes[0]
        if w % cfg.scale or h % cfg.scale:
            raise ValueError(f"output size {w}x{h} is not divisible by the scale {cfg.scale} of {cfg.describe()}")
        sizes.insert(0, (w // cfg.scale, h // cfg.scale))
    return sizes


def stage_generators(seeds: Sequence[int], size: tuple[int, int]) -> list[torch.Generator]:
    """One CPU generator per image for the stage making a (width, height) image, seeded by (seed, width, height):
    a stage draws the same numbers whether it runs inside a cascade or alone on the same input."""
    gens = []
    for s in seeds:
        state = np.random.SeedSequence([int(s), size[0], size[1]]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def per_stage(values, n: int, name: str, default: Callable[[int], Any]) -> list:
    """One value per stage from None (stage i gets `default(i)`), a scalar (every stage), or a list of n."""
    if values is None:
        return [default(i) for i in range(n)]
    if isinstance(values, (int, float)):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per stage), found {len(values)}: {values}")
    return values


# --- the pipeline ---------------------------------------------------------------------------------------------------

@dataclass
class CascadeResult:
    images: list  # PIL images of the last stage
    stage_outputs: list[Tensor]  # per stage, (B, 3, H, W) float32 in [-1, 1]
    seeds: list[int]
    params: dict[str, Any] = field(default_factory=dict)


class CascadePipeline:
    """`CascadePipeline(stages)(prompt, steps=[30, 20, 20], cfg=[5, 4, 4], aug=[0, 0.1, 0.1], seed=1)`.

    Runs base -> SR -> SR: each stage samples its image with the guided denoiser of its UNet; an SR stage is
    conditioned on the previous output, clipped to [-1, 1] and noise-augmented at its level s.  A cascade whose
    first stage is an SR stage upscales `init_image` (any image with the expected aspect ratio when
    `resize_init_image`, e.g. an SDXL output; exactly the expected size otherwise).
    """

    def __init__(self, stages: Sequence[CascadeStage], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.stages = list(stages)
        check_stage_order([s.config for s in self.stages])
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32
        for stage in self.stages:
            stage.to(device=self.device, dtype=self.dtype)
            for module in (stage.unet, *stage.text_encoders):
                module.eval().requires_grad_(False)

    @property
    def configs(self) -> list[CascadeStageConfig]:
        return [s.config for s in self.stages]

    def _init_tensor(self, init_image, expected: tuple[int, int], resize: bool, batch: int) -> Tensor:
        from xldm.images import image_size, image_to_tensor

        found = image_size(init_image)
        if found != expected:
            same_ratio = found[0] * expected[1] == found[1] * expected[0]
            if not (resize and same_ratio):
                hint = " (pass resize_init_image=True to rescale an image of the same aspect ratio)" \
                    if same_ratio else ""
                raise ValueError(
                    f"stage 0 ({self.configs[0].describe()}) expects a low-res image of {expected[0]}x{expected[1]} "
                    f"(aspect ratio {_ratio(*expected)}), found {found[0]}x{found[1]} (aspect ratio "
                    f"{_ratio(*found)}){hint}")
            if isinstance(init_image, Tensor):  # [0, 1] tensor: antialiased resize to the expected size
                init_image = F.interpolate(init_image.float(), size=(expected[1], expected[0]), mode="bilinear",
                                           antialias=True, align_corners=False).clamp(0, 1)
        x = image_to_tensor(init_image, *expected)
        if x.shape[0] == 1:
            x = x.repeat(batch, 1, 1, 1)
        if x.shape[0] != batch:
            raise ValueError(f"init_image holds {x.shape[0]} images, expected 1 or {batch} (the batch)")
        return x.to(self.device)

    def __call__(self, prompt: str, *, steps: Sequence[int] | int | None = None,
                 cfg: Sequence[float] | float | None = None, aug: Sequence[float] | float | None = None,
                 seed: int = 0, init_image=None, resize_init_image: bool = False,
                 size: tuple[int, int] | None = None, negative_prompt: str | None = None, batch: int = 1,
                 sampler: str = "euler", original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0),
                 callback: Callable[[int, int, int], None] | None = None) -> CascadeResult:
        """Generate `batch` images of `size` (width, height; default the last stage's resolution).

        steps / cfg / aug: one value per stage (or one for all); defaults 30 / 5.0 for a base stage, 20 / 4.0 /
        `DEFAULT_SR_AUG_LEVEL` for an SR stage; a base stage's aug must be 0.  `original_size` / `crop_top_left`
        ((height, width) / (top, left), SDXL order) feed a stage that takes them; original_size defaults to the
        final output size.  `init_image` (PIL, or a (B, 3, H, W) tensor in [0, 1]) is the low-res input of a
        cascade that starts with an SR stage.  Image i uses seed + i.  `callback(stage, step, total)`.
        """
        configs = self.configs
        n = len(configs)
        check_stage_order(configs, has_init_image=init_image is not None)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, found {prompt!r}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, found {batch!r}")
        steps = per_stage(steps, n, "steps", lambda i: DEFAULT_STEPS[configs[i].kind])
        cfg = per_stage(cfg, n, "cfg", lambda i: DEFAULT_CFG[configs[i].kind])
        aug = per_stage(aug, n, "aug", lambda i: 0.0 if configs[i].kind == "base" else DEFAULT_SR_AUG_LEVEL)
        for i, c in enumerate(configs):
            if not isinstance(steps[i], int) or steps[i] < 1:
                raise ValueError(f"steps for stage {i} must be a positive int, found {steps[i]!r}")
            if not math.isfinite(float(cfg[i])) or float(cfg[i]) < 0:
                raise ValueError(f"cfg for stage {i} must be a finite number >= 0, found {cfg[i]!r}")
            if c.kind == "base" and aug[i]:
                raise ValueError(f"stage {i} is a base stage and takes no augmentation level; found {aug[i]}")
            if not 0.0 <= float(aug[i]) <= 1.0:
                raise ValueError(f"aug for stage {i} must lie in [0, 1], found {aug[i]!r}")
        sizes = plan_sizes(configs, size)
        final_w, final_h = sizes[-1]
        seeds = [seed + i for i in range(batch)]
        prompts = [prompt] * batch
        negatives = None if negative_prompt is None else [negative_prompt] * batch

        low = None
        if init_image is not None:
            first = configs[0]
            expected = (sizes[0][0] // first.scale, sizes[0][1] // first.scale)
            low = self._init_tensor(init_image, expected, resize_init_image, batch)
        outputs: list[Tensor] = []
        for i, (stage, (w, h)) in enumerate(zip(self.stages, sizes)):
            c = stage.config
            gens = stage_generators(seeds, (w, h))
            values = {"original_size": original_size or (final_h, final_w), "crop_top_left": crop_top_left,
                      "target_size": (h, w), "aug_level": float(aug[i])}
            with torch.no_grad():
                cond = stage_conditioning(stage, prompts, negatives, stage_scalars(c, batch, values),
                                          guidance=cfg[i] > 1)
                extra = None
                if c.kind == "sr":
                    check_low_res(c, low, (w, h))
                    # the low-res input is augmented once, before sampling (Imagen Sec. 2.4), with this stage's noise
                    up = upsample_low_res(augment(low, float(aug[i]), gens), (w, h)).to(self.dtype)
                    extra = torch.cat([up] * 2) if cfg[i] > 1 else up
                pred = "v_prediction" if c.prediction_type == "v" else "epsilon"
                schedule = make_schedule(sampler, steps[i], prediction_type=pred)
                x = randn((batch, 3, h, w), gens, self.device, self.dtype) * schedule.init_noise_sigma
                fn = guided_model_fn(stage.unet, cond.context, cond.vector, float(cfg[i]), extra)
                denoiser = model_denoiser(fn, pred)
                step_cb = None if callback is None else (lambda k, total, *_, i=i: callback(i, k, total))
                x = sample(sampler, denoiser, x, schedule, generator=gens, callback=step_cb)
            if not torch.isfinite(x).all():
                from xldm.errors import NonFiniteError

                raise NonFiniteError(f"stage {i} ({c.describe()}) produced NaN/inf pixels; try float32")
            low = x.float().clamp(-1, 1)  # Imagen clips each stage's output to the data range
            outputs.append(low)
        from xldm.images import tensor_to_images

        # per-stage lists under cascade_* keys (A1111's Steps / CFG scale are single numbers)
        params = {"prompt": prompt, "negative_prompt": negative_prompt, "sampler": sampler, "width": final_w,
                  "height": final_h, "cascade_steps": steps, "cascade_cfg": [float(v) for v in cfg],
                  "cascade_aug": [float(v) for v in aug], "cascade_sizes": [list(s) for s in sizes],
                  "cascade_stages": [c.describe() for c in configs], "init_image": init_image is not None}
        return CascadeResult(images=tensor_to_images(outputs[-1]), stage_outputs=outputs, seeds=seeds, params=params)


# --- files ------------------------------------------------------------------------------------------------------------

def stage_state_dict(stage: CascadeStage, *, include_text_encoders: bool = True) -> dict[str, Tensor]:
    """`unet.*` and `text_encoders.{i}.*` (xldm's CLIP layout)."""
    out = {f"unet.{k}": v for k, v in stage.unet.state_dict().items()}
    if include_text_encoders:
        for i, te in enumerate(stage.text_encoders):
            out.update({f"text_encoders.{i}.{k}": v for k, v in te.state_dict().items()})
    return out


def save_stage(stage: CascadeStage, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               include_text_encoders: bool = True) -> Path:
    """One stage as a safetensors file (atomic write), its config JSON in the header under `xldm.cascade_stage`.
    Without its text encoders the file needs them from elsewhere when loaded (`load_stage(text_encoders=...)`)."""
    from xldm.weights.io import save_file

    path = Path(path)
    tensors = stage_state_dict(stage, include_text_encoders=include_text_encoders)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {"format_version": STAGE_FORMAT_VERSION, "config": stage.config.to_dict(),
            "has_text_encoders": include_text_encoders}
    save_file(tensors, path, metadata={STAGE_METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


def read_stage_header(path: str | os.PathLike) -> tuple[CascadeStageConfig, bool]:
    """(config, whether the file holds the text encoders), from the header only."""
    from xldm.weights.io import open_checkpoint

    ckpt = open_checkpoint(path)
    return _parse_header(path, ckpt.metadata)


def _parse_header(path, metadata: dict[str, str]) -> tuple[CascadeStageConfig, bool]:
    if STAGE_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a cascade stage file (no '{STAGE_METADATA_KEY}' in its header metadata)")
    meta = json.loads(metadata[STAGE_METADATA_KEY])
    if meta.get("format_version") != STAGE_FORMAT_VERSION:
        raise ValueError(f"{path}: cascade stage format {meta.get('format_version')}, expected {STAGE_FORMAT_VERSION}")
    return CascadeStageConfig.from_dict(meta["config"]), bool(meta["has_text_encoders"])


def load_stage(path: str | os.PathLike, *, text_encoders: Sequence[nn.Module] | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> CascadeStage:
    """Load a stage strictly (every key used, every parameter present).  `text_encoders` supplies them for a file
    saved without its own (and overrides a file's own)."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.weights.io import load_strict, open_checkpoint

    ckpt = open_checkpoint(path)
    config, has_encoders = _parse_header(path, ckpt.metadata)
    n = len(config.text_encoders)
    allowed = ("unet.",) + tuple(f"text_encoders.{i}." for i in range(n))
    unknown = [k for k in ckpt.keys() if not k.startswith(allowed)]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys belong to no part of a cascade stage: {sorted(unknown)[:10]}")
    unet = UNet(config.unet)
    load_strict(unet, ckpt.tensors("unet.", dtype=dtype), component=f"{path}: UNet")
    if text_encoders is not None:
        encoders = tuple(text_encoders)
        _check_encoder_configs(config, encoders, f"{path}: text_encoders")
    elif has_encoders:
        encoders = []
        for i, te_cfg in enumerate(config.text_encoders):
            te = CLIPTextModel(te_cfg)
            load_strict(te, ckpt.tensors(f"text_encoders.{i}.", dtype=dtype), component=f"{path}: text encoder {i}")
            encoders.append(te)
        encoders = tuple(encoders)
    else:
        raise ValueError(f"{path}: this stage file holds no text encoders (they are stored with an earlier stage "
                         f"of its cascade); load the whole cascade, or pass text_encoders=")
    stage = CascadeStage(config=config, unet=unet, text_encoders=encoders)
    for module in (unet, *encoders):
        module.eval().requires_grad_(False)
    return stage.to(device=device, dtype=dtype)


def _same_encoders(a: CascadeStage, b: CascadeStage) -> bool:
    if a.config.text_encoders != b.config.text_encoders:
        return False
    for ea, eb in zip(a.text_encoders, b.text_encoders):
        if ea is eb:
            continue
        sa, sb = ea.state_dict(), eb.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa):
            return False
    return True


def save_cascade(stages: Sequence[CascadeStage], folder: str | os.PathLike, *,
                 dtype: torch.dtype | None = None) -> list[Path]:
    """`folder/stage_0.safetensors`, `stage_1...`; a stage whose text encoders equal stage 0's (configs and
    weights) is saved without them, so shared encoders are stored once."""
    check_stage_order([s.config for s in stages])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stage in enumerate(stages):
        include = i == 0 or not _same_encoders(stages[0], stage)
        paths.append(save_stage(stage, folder / f"stage_{i}.safetensors", dtype=dtype, include_text_encoders=include))
    return paths


DEFAULT_CASCADE_DIR = Path(__file__).parent / "data" / "cascade"


def cascade_files(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The stage files of `--cascade`: a folder (its stage_N.safetensors, by N), comma-separated files (in that
    order), a list of paths, or "default" (the cascade shipped with xldm)."""
    if not isinstance(spec, (str, os.PathLike)):
        paths = [Path(p) for p in spec]
    elif str(spec) == "default":
        paths = _folder_stages(DEFAULT_CASCADE_DIR, hint="the default cascade is not installed with this copy of "
                                                         "xldm")
    elif Path(spec).is_dir():
        paths = _folder_stages(Path(spec))
    else:
        paths = [Path(p.strip()) for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise ValueError(f"--cascade {spec}: no stage files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such cascade stage file: {p}")
    return paths


def _folder_stages(folder: Path, hint: str = "") -> list[Path]:
    import re

    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"stage_(\d+)\.safetensors", p.name)
            if m:
                found.append((int(m.group(1)), p))
    found.sort()
    if not found:
        raise FileNotFoundError(f"{folder}: no stage_N.safetensors files" + (f" ({hint})" if hint else ""))
    numbers = [k for k, _ in found]
    if numbers != list(range(len(found))):
        raise ValueError(f"{folder}: stage files must be numbered 0..{len(found) - 1}, found {numbers}")
    return [p for _, p in found]


def default_model_encoders(configs: Sequence[TextEncoderConfig], *, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None) -> tuple[nn.Module, ...] | None:
    """The text encoders of the bundled default latent model (`xldm.default_model`) with these configs, in this
    order; None when the default model is not installed or has no such encoders.  The default cascade ships
    without an encoder of its own and uses the default model's bigG-shaped one."""
    from xldm.default_model import DEFAULT_MODEL_PATH
    from xldm.weights.load import load_model

    if not DEFAULT_MODEL_PATH.is_file():
        return None
    encoders = load_model(DEFAULT_MODEL_PATH, components=["text_encoders"], dtype=dtype or torch.float32,
                          device=device).text_encoders
    try:
        return pick_encoders(encoders, configs, str(DEFAULT_MODEL_PATH))
    except ValueError:
        return None


def pick_encoders(encoders: Sequence[nn.Module], configs: Sequence[TextEncoderConfig],
                  where: str) -> tuple[nn.Module, ...]:
    """The encoders with these configs, in this order, out of a model's (e.g. the bigG-shaped one of an SDXL-style
    pair); ValueError naming `where` when one is missing."""
    picked = []
    for wanted in configs:
        matches = [e for e in encoders if e.cfg == wanted]
        if not matches:
            raise ValueError(f"{where}: none of its text encoders {[e.cfg for e in encoders]} has the config {wanted}")
        picked.append(matches[0])
    return tuple(picked)


def load_cascade(spec, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> list[CascadeStage]:
    """Load every stage of `spec` (see `cascade_files`); a stage saved without text encoders borrows those of an
    earlier stage with the same encoder configs, of the `stage_0.safetensors` in its folder, or of the bundled
    default model (`default_model_encoders`)."""
    stages: list[CascadeStage] = []
    for path in cascade_files(spec):
        config, has_encoders = read_stage_header(path)
        shared = None
        if not has_encoders:
            donors = [s.text_encoders for s in stages if s.config.text_encoders == config.text_encoders]
            sibling = path.parent / "stage_0.safetensors"  # a stage file picked out of its cascade folder
            if not donors and sibling.is_file() and sibling.resolve() != path.resolve():
                sibling_config, sibling_has = read_stage_header(sibling)
                if sibling_has and sibling_config.text_encoders == config.text_encoders:
                    donors = [load_stage(sibling, dtype=dtype, device=device).text_encoders]
            if not donors:
                found = default_model_encoders(config.text_encoders, dtype=dtype, device=device)
                donors = [found] if found is not None else []
            if not donors:
                raise ValueError(f"{path}: holds no text encoders, and neither an earlier stage, {sibling.name} "
                                 f"beside it nor the default model has encoders of the same configs")
            shared = donors[0]
        stages.append(load_stage(path, text_encoders=shared, dtype=dtype, device=device))
    check_stage_order([s.config for s in stages])
    return stages


__all__ = [
    "CascadeStageConfig", "CascadeStage", "CascadePipeline", "CascadeResult", "CASCADE_PRESETS",
    "CASCADE_STAGE_PRESETS", "augment", "aug_alpha", "check_low_res", "upsample_low_res", "sr_model_input",
    "downsample_for_sr", "stage_scalars", "stage_vector", "stage_conditioning", "check_stage_order", "plan_sizes",
    "stage_generators", "save_stage", "load_stage", "read_stage_header", "save_cascade", "load_cascade",
    "cascade_files", "per_stage", "default_model_encoders", "pick_encoders", "DEFAULT_SR_AUG_LEVEL",
    "AUG_LEVEL_EMBED_SCALE", "DEFAULT_CASCADE_DIR", "DEFAULT_STEPS",
    "DEFAULT_CFG", "TINY_CASCADE_TEXT_ENCODER", "TINY_CASCADE_BASE", "TINY_CASCADE_SR", "TINY_CASCADE_SR2",
    "CASCADE_TEXT_ENCODER", "CASCADE_BASE_32", "CASCADE_SR_64", "CASCADE_SR_128",
]
