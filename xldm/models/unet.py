"""The SD/SDXL UNet (sgm `UNetModel`), built from a `UNetConfig` alone: SDXL base and refiner, SD 1.5, SD 2.1.

Parameter names are the checkpoint names without the `model.diffusion_model.` prefix (`time_embed.0`,
`label_emb.0.0`, `input_blocks.N.M...`, `middle_block.{0,1,2}`, `output_blocks.N.M...`, `out.{0,2}`), so an
original UNet state dict loads strictly.  Numerics follow diffusers `models/unets/unet_2d_condition.py`."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from xldm.config import UNetConfig
from xldm.models.layers import Downsample, ResBlock, SpatialTransformer, Upsample, timestep_embedding


class UNetBlock(nn.ModuleList):
    """One `input_blocks.N` / `middle_block` / `output_blocks.N` entry (sgm `TimestepEmbedSequential`)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                output_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Latent-diffusion UNet with cross-attention to text and optional vector ("adm") conditioning."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        widths, ted, groups = config.block_out_channels, config.time_embed_dim, config.norm_groups
        mc = widths[0]
        for width in widths:
            if width % groups:
                raise ValueError(f"channel width {width} is not divisible by norm_groups={groups}")
        for width in config.attention_widths:
            config.heads_for(width)  # raises if the width does not split into heads
        if config.transformer_depth_middle < 1:
            raise ValueError(f"transformer_depth_middle must be >= 1 (the SD/SDXL mid block always has attention), "
                             f"got {config.transformer_depth_middle}")

        def transformer(width: int, depth: int) -> SpatialTransformer:
            heads, head_dim = config.heads_for(width)
            return SpatialTransformer(width, heads, head_dim, depth, config.context_dim,
                                      config.use_linear_in_transformer, groups)

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if config.adm_in_channels > 0:
            # sgm num_classes="sequential": label_emb.0 = Linear, SiLU, Linear.
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(config.adm_in_channels, ted), nn.SiLU(),
                                                         nn.Linear(ted, ted)))

        # Encoder: conv_in, then per level num_res_blocks x (ResBlock [+ SpatialTransformer]), then Downsample.
        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(config.in_channels, mc, 3, padding=1)])])
        skip_widths, ch = [mc], mc
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, width, groups)]
                ch = width
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level]))
                self.input_blocks.append(UNetBlock(layers))
                skip_widths.append(ch)
            if level != config.num_levels - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch)]))
                skip_widths.append(ch)

        self.middle_block = UNetBlock([ResBlock(ch, ted, ch, groups), transformer(ch, config.transformer_depth_middle),
                                       ResBlock(ch, ted, ch, groups)])

        # Decoder: per level (deepest first) num_res_blocks+1 x (ResBlock on [h, skip] [+ ST]), Upsample last.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.num_levels)):
            width = widths[level]
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), ted, width, groups)]
                ch = width
                if config.transformer_depth[level] > 0:
                    layers.append(transformer(ch, config.transformer_depth[level]))
                if level > 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(layers))

        # diffusers conv_norm_out uses norm_eps 1e-5.
        self.out = nn.Sequential(nn.GroupNorm(groups, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def _run(self, block: UNetBlock, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
             output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, output_size, use_reentrant=False)
        return block(h, emb, context, output_size)

    def encoder_features(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                         y: torch.Tensor | None, depth: int | None = None
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The encoder half, inputs trusted (`forward` checks them): the output of every input block, then the
        middle block's, with the time embedding and the context in the parameter dtype.  `depth`: run only the
        first `depth` input blocks and no middle block (a partial pass, `xldm.speedups.DeepCacheUNet`)."""
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        # Sinusoid in float32, cast to the parameter dtype (diffusers casts t_emb to the sample dtype).
        emb = self.time_embed(timestep_embedding(timesteps, self.config.block_out_channels[0]).to(dtype))
        if self.config.adm_in_channels > 0:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        features = []
        for block in self.input_blocks[:depth]:
            h = self._run(block, h, emb, context)
            features.append(h)
        if depth is None:
            features.append(self._run(self.middle_block, h, emb, context))
        return features, emb, context

    def _add_control(self, features: list[torch.Tensor],
                     control: tuple[list[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        down, mid = control
        if len(features) <= len(self.input_blocks):  # a partial pass: the shallow input blocks' skips only
            return [f + r.to(f.dtype) for f, r in zip(features, down)]
        if len(down) != len(features) - 1:
            raise ValueError(f"control: expected {len(features) - 1} down residuals (one per input block), "
                             f"found {len(down)}")
        for i, (f, r) in enumerate(zip(features, list(down) + [mid])):
            if r.shape != f.shape:
                name = "the mid residual" if i == len(down) else f"down residual {i}"
                raise ValueError(f"control: {name} has shape {tuple(r.shape)}, the UNet's feature {tuple(f.shape)}")
        return [f + r.to(f.dtype) for f, r in zip(features, list(down) + [mid])]

    def decode(self, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor, *, start: int = 0,
               h: torch.Tensor | None = None,
               keep: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The decoder half: output blocks `start`, `start` + 1, ... on `h` (default: the last of `skips`, the
        middle block's output), each concatenated with the skip connection popped from the end of `skips`, then
        `out`.  `keep(j, h)` hears the input from below of each output block j (DeepCache's cached features)."""
        skips = list(skips)
        if h is None:
            h = skips.pop()
        for j, block in enumerate(self.output_blocks[start:], start):
            if keep is not None:
                keep(j, h)
            h = torch.cat([h, skips.pop()], dim=1)
            # The block that ends in an Upsample sizes it to the next skip connection.
            target = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, target)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None,
                control: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Network output for latents `x` (B, C, H, W) at `timesteps` ((B,) or 0-d), text `context` (B, L, context_dim)
        and vector conditioning `y` (B, adm_in_channels: pooled text + Fourier micro-conditioning).  Any H, W >= 1
        works: upsampling is sized to the matching skip connection (diffusers `upsample_size` path).
        `control`: ControlNet residuals (one per input block, one for the middle block) added to the skip
        connections and to the middle block's output (diffusers `down_block_additional_residuals`,
        `mid_block_additional_residual`)."""
        timesteps = self.check_inputs(x, timesteps, context, y)
        skips, emb, context = self.encoder_features(x, timesteps, context, y)
        if control is not None:
            skips = self._add_control(skips, control)
        return self.decode(skips, emb, context)

    def check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                     y: torch.Tensor | None) -> torch.Tensor:
        """Raise ValueError unless `forward`'s inputs fit this UNet; the timesteps as a tensor on x's device."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected shape (B, {cfg.in_channels}, H, W), found {tuple(x.shape)}")
        batch = x.shape[0]
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
            raise ValueError(f"timesteps: expected shape () or ({batch},), found {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context: expected shape ({batch}, L, {cfg.context_dim}), found {tuple(context.shape)}")
        if cfg.adm_in_channels > 0:
            if y is None:
                raise ValueError(f"y: expected vector conditioning of shape ({batch}, {cfg.adm_in_channels}), "
                                 "found None")
            if y.ndim != 2 or y.shape[0] != batch or y.shape[1] != cfg.adm_in_channels:
                raise ValueError(f"y: expected shape ({batch}, {cfg.adm_in_channels}), found {tuple(y.shape)}")
        elif y is not None:
            raise ValueError(f"y: this UNet has no vector conditioning (adm_in_channels=0), found a tensor of shape "
                             f"{tuple(y.shape)}")
        return timesteps


def compile_unet(unet: nn.Module, on_first_call=None) -> nn.Module:
    """`torch.compile` a UNet's forward in place (an instance attribute, so parameter names, state dicts and
    LoRA patching are unchanged; dynamo's guards recompile when a shape or a patched module changes).  The first
    call, which compiles, is timed and its seconds passed to `on_first_call`.  Returns the same module."""
    if getattr(unet, "compiled", False):
        return unet
    compiled = torch.compile(unet.forward)
    first = [True]

    def forward(*args, **kwargs):
        if not first[0]:
            return compiled(*args, **kwargs)
        import time

        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        first[0] = False
        if on_first_call is not None:
            on_first_call(time.perf_counter() - start)
        return out

    unet.forward = forward
    unet.compiled = True
    return unet
