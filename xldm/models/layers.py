"""Building blocks of the SD/SDXL UNet (sgm `openaimodel.py` / `attention.py` names).

Parameter names follow the original ldm/sgm checkpoints (`in_layers.0`, `emb_layers.1`, `op`, ...), so an
official single-file checkpoint loads with no renaming.  The arithmetic follows diffusers 0.42.1
(`ResnetBlock2D`, `Transformer2DModel`, `BasicTransformerBlock`, `AttnProcessor2_0`, `Downsample2D`,
`Upsample2D`), which the parity tests use as the oracle."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of `t` (any shape) -> `t.shape + (dim,)`, `[cos | sin]`, float32: diffusers
    `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)` = sgm `timestep_embedding`, frequencies
    exp(-ln(max_period) * i / half), i < half; an odd `dim` gets a trailing zero column, as in diffusers."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[..., None].float() * torch.exp(exponent)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """sgm `ResBlock` == diffusers `ResnetBlock2D` (GroupNorm eps 1e-5): h = conv(SiLU(GN(x))) + Linear(SiLU(emb));
    out = skip(x) + conv(dropout(SiLU(GN(h)))), skip a 1x1 convolution when the channel count changes."""

    def __init__(self, in_channels: int, emb_channels: int, out_channels: int, groups: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels, eps=1e-5), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # No parameters (and so no checkpoint key) when the widths agree, as in sgm.
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.out_layers(self.in_layers(x) + self.emb_layers(emb)[:, :, None, None])
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head (cross-)attention, q/k/v without bias, output projection with bias (diffusers `Attention`), SDPA
    with its default scale 1/sqrt(head_dim), heads split as view(B, L, heads, head_dim).transpose(1, 2)
    (diffusers `AttnProcessor2_0`)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch = x.shape[0]
        q, k, v = (proj(src).view(batch, -1, self.heads, self.head_dim).transpose(1, 2)
                   for proj, src in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Linear gives value and gate; value * gelu(gate), exact (erf) gelu."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width; keys `net.0.proj`, `net.2` (sgm / diffusers `FeedForward`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: x += attn1(LN1(x)); x += attn2(LN2(x), context); x += ff(LN3(x)); LN eps 1e-5 (diffusers)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Registration order follows sgm, so state_dict() lists keys as the original checkpoint does.
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions (sgm `SpatialTransformer`, diffusers `Transformer2DModel`): GroupNorm (eps
    1e-6), proj_in, `depth` blocks, proj_out, + input.  SD 2.x/SDXL project with Linear layers on (B, HW, C); SD 1.x
    with 1x1 convolutions before flattening (proj_out after un-flattening), in diffusers' order."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout=dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """3x3 convolution with stride 2, padding 1 (sgm `Downsample`, key `op`); odd sizes round up."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 convolution (sgm `Upsample`).  `output_size` forces the size, so sides that
    are not multiples of 2**(levels-1) still meet their skip connections (diffusers `Upsample2D(output_size=...)`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(output_size), mode="nearest"))
