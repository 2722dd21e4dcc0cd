"""Algorithmic speed-ups of sampling, each off by default and each with a measured quality cost
(benchmarks/speedups.py; the table is in the README under Benchmarks):

* DeepCache feature caching (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free", arXiv
  2312.00858, Sec. 3.2-3.3, uniform 1:N schedule): every `cache_interval`-th sampler step runs the whole UNet and
  keeps the up-path's features entering output block K-1-b (K input blocks, b = `cache_branch`); the steps between
  run only input blocks 0..b and output blocks K-1-b.. (the shallow skip branch), on the kept deep features.
* CFG over part of the schedule (`cfg_end`): once a fraction `cfg_end` of the steps is done the UNet runs on the
  conditional half alone (batch B instead of 2B), without the guidance combination (the webui's late-step CFG
  skip; diffusers' `callback_on_step_end` recipe that drops guidance after a step).
* A latent previewer: a linear map latent -> RGB (the webui's "Approx cheap", modules/sd_vae_approx.py) fitted by
  least squares to the model's own VAE, instead of factors fitted once to one VAE."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from xldm.conditioning import Conditioning


def input_block_count(unet_config) -> int:
    """The number of UNet input blocks: conv_in, num_res_blocks per level, a Downsample between levels."""
    levels = len(unet_config.block_out_channels)
    return 1 + levels * unet_config.num_res_blocks + levels - 1


def check_speedups(cache_interval, cache_branch, cfg_end) -> None:
    """Raise ValueError naming the setting unless each is of its type and range (the branch's upper bound depends on
    the UNet: `check_cache_branch`)."""
    if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(f"cache_interval must be an integer >= 1 (1 = no DeepCache), got {cache_interval!r}")
    if isinstance(cache_branch, bool) or not isinstance(cache_branch, int) or cache_branch < 0:
        raise ValueError(f"cache_branch must be an integer >= 0 (the deepest input block run on cached steps), "
                         f"got {cache_branch!r}")
    if isinstance(cfg_end, bool) or not isinstance(cfg_end, (int, float)) or not (0 <= cfg_end <= 1):
        raise ValueError(f"cfg_end must be a number in [0, 1] (the fraction of steps with CFG), got {cfg_end!r}")


def check_cache_branch(cache_branch: int, unet_config) -> None:
    count = input_block_count(unet_config)
    if cache_branch >= count:
        raise ValueError(f"cache_branch must be in [0, {count - 1}] for this UNet ({count} input blocks), "
                         f"got {cache_branch}")


class DeepCacheUNet(nn.Module):
    """`DeepCacheUNet(unet, interval, branch)(x, t, context, y, control)`: the UNet's output on full steps (step
    index % interval == 0, or nothing cached yet), the shallow branch's on the cached deep features otherwise.
    The sampling loop sets the step with `advance(i)` after step i.  ControlNet residuals are added on both paths
    (on cached steps to the shallow skips; the deep ones are inside the cached features); LoRA patches the UNet's
    own layers and so applies on both.  A cache made on a CFG batch [negative, positive] serves a later batch of
    the positives alone (`cfg_end`) with its second half: every UNet layer works per sample."""

    def __init__(self, unet: nn.Module, interval: int, branch: int = 0) -> None:
        super().__init__()
        check_speedups(interval, branch, 1.0)
        check_cache_branch(branch, unet.config)
        self.unet, self.interval, self.branch = unet, interval, branch
        self.kept_block = len(unet.output_blocks) - 1 - branch  # the output block that takes input block b's skip
        self.step = 0
        self.cache: Tensor | None = None
        self.full_calls = self.partial_calls = 0

    @property
    def config(self):
        return self.unet.config

    def advance(self, i: int, *_) -> None:
        self.step = i + 1

    def _cached_for(self, batch: int) -> Tensor | None:
        if self.cache is None:
            return None
        if self.cache.shape[0] == batch:
            return self.cache
        if self.cache.shape[0] == 2 * batch:  # CFG batch cached, positives alone now
            return self.cache[batch:]
        return None

    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor | None = None,
                control=None) -> Tensor:
        unet = self.unet
        timesteps = unet.check_inputs(x, timesteps, context, y)
        cached = self._cached_for(x.shape[0])
        if self.step % self.interval == 0 or cached is None:
            self.full_calls += 1
            skips, emb, context = unet.encoder_features(x, timesteps, context, y)
            if control is not None:
                skips = unet._add_control(skips, control)

            def keep(j: int, h: Tensor) -> None:
                if j == self.kept_block:
                    self.cache = h

            return unet.decode(skips, emb, context, keep=keep)
        self.partial_calls += 1
        skips, emb, context = unet.encoder_features(x, timesteps, context, y, depth=self.branch + 1)
        if control is not None:
            skips = unet._add_control(skips, control)
        return unet.decode(skips, emb, context, start=self.kept_block, h=cached)


def positive_half(cond: Conditioning) -> Conditioning:
    """The conditioning of the positives alone, unguided (the CFG batch is [negative..., positive...])."""
    if not cond.guided:
        return cond
    rows = cond.context.shape[0] // 2
    return Conditioning(context=cond.context[rows:], vector=None if cond.vector is None else cond.vector[rows:],
                        guided=False)


def guided_at(i: int, steps: int, cfg_end: float) -> bool:
    """Whether step i of `steps` runs with CFG: while the fraction of steps done, i / steps, is below cfg_end."""
    return i / steps < cfg_end


@dataclass(frozen=True)
class SpeedUps:
    """The speed-ups of one sampling run (checked once with the request, `check_speedups`): DeepCache's interval
    and branch, and the fraction of steps with CFG.  The defaults are off."""

    cache_interval: int = 1
    cache_branch: int = 0
    cfg_end: float = 1.0

    @classmethod
    def of(cls, req: Any) -> "SpeedUps":
        """A request's (`xldm.request.GenerationRequest`) speed-up settings."""
        return cls(req.cache_interval, req.cache_branch, req.cfg_end)


NO_SPEEDUPS = SpeedUps()


def speedup_model_fn(cond: Conditioning, unet: nn.Module, cfg: float, steps: int, *, extra_channels=None,
                     control=None, speedups: SpeedUps = NO_SPEEDUPS) -> tuple[Callable, Callable | None, nn.Module]:
    """(model_fn for `Denoiser`, advance(i) for the step callback or None, the network run).  With every setting
    at its default this is `cond.model_fn(unet, cfg, extra_channels, control)` and no callback."""
    cache_interval, cache_branch, cfg_end = speedups.cache_interval, speedups.cache_branch, speedups.cfg_end
    network = DeepCacheUNet(unet, cache_interval, cache_branch) if cache_interval > 1 else unet
    guided_fn = cond.model_fn(network, cfg, extra_channels, control)
    if not cond.guided or cfg_end >= 1:
        return guided_fn, (network.advance if network is not unet else None), network
    plain_fn = positive_half(cond).model_fn(network, cfg, extra_channels, control)
    state = {"step": 0}

    def fn(x_in: Tensor, t: Tensor) -> Tensor:
        return (guided_fn if guided_at(state["step"], steps, cfg_end) else plain_fn)(x_in, t)

    def advance(i: int, *_) -> None:
        state["step"] = i + 1
        if network is not unet:
            network.advance(i)

    return fn, advance, network


# -- the latent previewer ---------------------------------------------------------------------------------------

_PREVIEW_FITS: "weakref.WeakKeyDictionary[nn.Module, Tensor]" = weakref.WeakKeyDictionary()


def fit_latent_preview(vae: nn.Module, *, size: int = 128, count: int = 8, seed: int = 0) -> Tensor:
    """The (C + 1, 3) least-squares map [latent channels, 1] -> RGB in [-1, 1] of one VAE: `count` images of
    16-pixel squares in the 8 corner colours of the RGB cube (black, white, the primaries and secondaries) are
    encoded (the posterior mean, scaled as the UNet sees latents) and each latent pixel is paired with the mean
    colour of its f x f pixel cell.  Flat saturated squares fit the bundled emoji model's pictures better than
    smooth colour fields or decoded random latents (tests/test_speedups.py).  Kept per loaded VAE
    (`latent_preview_map`).  A half-precision VAE that overflows is fitted through a float32 copy."""
    generator = torch.Generator().manual_seed(seed)
    cells = size // 16
    colours = (torch.rand(count, 3, cells, cells, generator=generator) > 0.5).float() * 2 - 1
    images = F.interpolate(colours, size=(size, size), mode="nearest")
    param = next(vae.parameters())
    with torch.no_grad():
        latents = vae.encode_latents(images.to(param.device, param.dtype), sample=False).float().cpu()
        if not torch.isfinite(latents).all() and param.dtype != torch.float32:  # an fp16 VAE's overflow
            import copy

            latents = copy.deepcopy(vae).float().encode_latents(images.to(param.device), sample=False).cpu()
    if not torch.isfinite(latents).all():
        raise ValueError("the VAE encodes the preview's colour squares to non-finite latents: no preview map")
    factor = size // latents.shape[-1]
    targets = F.avg_pool2d(images, factor)  # (count, 3, h, w)
    design = torch.cat([latents, torch.ones_like(latents[:, :1])], dim=1)
    a = design.permute(0, 2, 3, 1).reshape(-1, design.shape[1]).double()
    b = targets.permute(0, 2, 3, 1).reshape(-1, 3).double()
    return torch.linalg.lstsq(a, b).solution.float()


def latent_preview_map(vae: nn.Module) -> Tensor:
    if vae not in _PREVIEW_FITS:
        _PREVIEW_FITS[vae] = fit_latent_preview(vae)
    return _PREVIEW_FITS[vae]


def model_preview_map(handle) -> Tensor:
    """The fitted map of a pipeline model's VAE (`Pipeline.model`, a `ModelHandle`; a VAE that loads on use is
    loaded for the fit): the previewer of `xldm generate --preview` and of the server's progress images."""
    with handle.use("vae") as comps:
        return latent_preview_map(comps.vae)


def preview_pixels(latents: Tensor, weights: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> RGB in [-1, 1] (B, 3, h, w) at latent resolution, by the fitted linear map."""
    if latents.ndim != 4 or latents.shape[1] + 1 != weights.shape[0]:
        raise ValueError(f"preview expects latents (B, {weights.shape[0] - 1}, h, w), found {tuple(latents.shape)}")
    w = weights.to(latents.device)
    rgb = torch.einsum("bchw,cr->brhw", latents.float(), w[:-1]) + w[-1][None, :, None, None]
    return rgb.clamp(-1, 1)


def preview_image(latents: Tensor, weights: Tensor, index: int = 0) -> Image.Image:
    """Batch item `index`'s preview as a PIL image (latent resolution)."""
    rgb = preview_pixels(latents[index: index + 1], weights)[0]
    array = ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def psnr(a: Tensor, b: Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of two tensors with values spanning `peak` (2 for [-1, 1])."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)
