"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

Parameter names are the ldm/sgm checkpoint names without the `first_stage_model.` prefix
(`encoder.down.0.block.1.conv1.weight`, `decoder.up.3.upsample.conv.weight`, `encoder.mid.attn_1.q.weight`), so
the VAE of an official single-file checkpoint loads with one strict `load_state_dict`.  Layout: ldm
`modules/diffusionmodules/model.py` (`Encoder`, `Decoder`); numerics: diffusers `AutoencoderKL`
(models/autoencoders/autoencoder_kl.py): GroupNorm eps 1e-6 everywhere, an asymmetric (0, 1, 0, 1) pad before
each encoder downsampling, and a single-head mid attention that adds its residual inside."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xldm.config import VAEConfig
from xldm.diffusion.noise import randn
from xldm.models.layers import Upsample  # ldm `Upsample(with_conv=True)`: nearest x2, 3x3 conv (key `conv`)


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    # ldm Normalize(): GroupNorm(32, C, eps=1e-6, affine=True); diffusers passes eps 1e-6 to every VAE norm.
    return nn.GroupNorm(groups, channels, eps=1e-6)


class VAEResBlock(nn.Module):
    """ldm `ResnetBlock` without time embedding, dropout 0: x' + conv2(silu(norm2(conv1(silu(norm1(x)))))), x' = x or
    a 1x1 conv of x (`nin_shortcut`) when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class VAEAttention(nn.Module):
    """ldm `AttnBlock`: single-head self-attention over all pixels, q/k/v/proj_out as 1x1 convolutions, scale
    1/sqrt(C) (diffusers: one head of width C), residual added inside."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """ldm `Downsample(with_conv=True)` = diffusers `Downsample2D(padding=0)`: pad right/bottom by one, then a
    3x3 conv, stride 2, no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _mid_block(channels: int, groups: int) -> nn.Sequential:
    """`mid.block_1 -> mid.attn_1 -> mid.block_2` at the lowest resolution (ldm Encoder/Decoder `mid`)."""
    return nn.Sequential(OrderedDict(block_1=VAEResBlock(channels, channels, groups),
                                     attn_1=VAEAttention(channels, groups),
                                     block_2=VAEResBlock(channels, channels, groups)))


class VAELevel(nn.Module):
    """One resolution: `num_blocks` ResBlocks (`block.j`), then the resampling layer `resample` ("downsample":
    encoder, all but the last level; "upsample": decoder, all but level 0; None: none)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int,
                 resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(VAEResBlock(in_channels if j == 0 else out_channels, out_channels, groups)
                                   for j in range(num_blocks))
        self.resample = resample
        if resample is not None:
            self.add_module(resample, (Downsample if resample == "downsample" else Upsample)(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Encoder(nn.Module):
    """ldm `Encoder(double_z=True, attn_resolutions=[])`: image -> 2*z_channels moments (before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        in_widths = [cfg.ch] + widths[:-1]  # ldm in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList(VAELevel(in_widths[i], widths[i], cfg.num_res_blocks, cfg.norm_groups,
                                           "downsample" if i != len(widths) - 1 else None) for i in range(len(widths)))
        self.mid = _mid_block(widths[-1], cfg.norm_groups)
        self.norm_out = _group_norm(cfg.norm_groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """ldm `Decoder`: z -> image. `up[i]` is resolution level i (0 = full size) and runs from the last level down
    to 0, so the ldm keys are in the reverse order of diffusers' `up_blocks`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _mid_block(widths[-1], cfg.norm_groups)
        in_widths = widths[1:] + [widths[-1]]  # level i takes level i+1's width (the mid width at the last level)
        self.up = nn.ModuleList(VAELevel(in_widths[i], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups,
                                         "upsample" if i != 0 else None) for i in range(len(widths)))
        self.norm_out = _group_norm(cfg.norm_groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)) (ldm `DiagonalGaussianDistribution`)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)  # ldm / diffusers clamp
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        if isinstance(generator, tuple):
            generator = list(generator)  # noise.randn takes one generator per row as a list
        noise = randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)  # as diffusers draws it
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> latent (B, z_channels, H/f, W/f), f = `cfg.downsample_factor`."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        for width in [cfg.ch * m for m in cfg.ch_mult]:
            if width % cfg.norm_groups != 0:
                raise ValueError(f"VAE width {width} is not divisible by norm_groups={cfg.norm_groups}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.cfg.z_channels:
            raise ValueError(f"VAE decode expects latents (B, {self.cfg.z_channels}, h, w), "
                             f"found shape {tuple(z.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        f = self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VAE encode expects images (B, {self.cfg.in_channels}, H, W), "
                             f"found shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"VAE encode expects height and width that are multiples of {f}, found {x.shape[2]}x{x.shape[3]}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z -> image, nominally in [-1, 1] but not clamped."""
        self._check_latents(z)
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       sample: bool = True) -> torch.Tensor:
        """Images in [-1, 1] -> UNet latents `scaling_factor * z`, z sampled or the posterior mean."""
        posterior = self.encode(images)
        return (posterior.sample(generator) if sample else posterior.mode()) * self.cfg.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> image, as diffusers pipelines' `vae.decode(latents / scaling_factor)`."""
        return self.decode(latents / self.cfg.scaling_factor)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Reconstruction: decode(encode(x))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())
