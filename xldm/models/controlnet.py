"""The SDXL ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a copy
of the UNet's encoder half (time / vector embeddings, `input_blocks`, `middle_block`), fed the control image through
a small conditioning network, whose features leave through zero-initialised 1x1 convolutions into the UNet's skip
connections and middle-block output.

Parameter names are those of the original-layout files (lllyasviel `cldm/cldm.py` `ControlNet`, sgm names):
`time_embed.*`, `label_emb.*`, `input_blocks.*`, `middle_block.*`, `input_hint_block.{0,2,...,14}`,
`zero_convs.N.0`, `middle_block_out.0`, so such a file loads with one strict `load_state_dict`.  Numerics follow
diffusers `models/controlnets/controlnet.py` (`ControlNetModel`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from xldm.config import ModelConfig, UNetConfig
from xldm.errors import ControlNetError
from xldm.models.layers import timestep_embedding
from xldm.models.unet import UNet

# Hint network widths of every released ControlNet (cldm.py: 16, 16, 32, 32, 96, 96, 256; diffusers
# `conditioning_embedding_out_channels` default (16, 32, 96, 256)).
HINT_CHANNELS = (16, 32, 96, 256)

Residuals = tuple[list[torch.Tensor], torch.Tensor]
"""(one residual per input block, the middle block's residual): what the UNet adds to its skips and mid output."""


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder of `unet` (its decoder fields are unused) and its hint network, which takes
    `conditioning_channels`-channel images at 8x the latent size (3: RGB)."""

    unet: UNetConfig
    conditioning_channels: int = 3
    hint_channels: tuple[int, ...] = HINT_CHANNELS

    def __post_init__(self) -> None:
        if self.conditioning_channels < 1 or len(self.hint_channels) < 1 or min(self.hint_channels) < 1:
            raise ValueError(f"conditioning_channels and hint_channels must be positive, got "
                             f"{self.conditioning_channels} and {self.hint_channels}")

    @property
    def downsample_factor(self) -> int:
        """How much smaller than the control image the latents are: 2 per strided hint convolution."""
        return 2 ** (len(self.hint_channels) - 1)


def _hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """cldm `input_hint_block`: conv, SiLU, then per width step a conv and a stride-2 conv (each + SiLU), and a
    zero-initialised conv to the UNet's first width; Conv2d at the even indices 0, 2, ..., SiLU between."""
    widths = cfg.hint_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.conditioning_channels, widths[0], 3, padding=1), nn.SiLU()]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(w_in, w_in, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(w_in, w_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(nn.Conv2d(widths[-1], cfg.unet.block_out_channels[0], 3, padding=1)))
    return nn.Sequential(*layers)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """The paper's zero convolution (Sec. 3.1): weight and bias 0, so a fresh ControlNet changes nothing."""
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(nn.Module):
    """`ControlNet(config)(x, timesteps, context, y, hint, scale)` -> (down residuals, mid residual), each x scale."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        # The encoder half of the UNet, built by the UNet itself so the two can never disagree; its decoder is
        # dropped before any of it is used.
        encoder = UNet(config.unet)
        self.time_embed = encoder.time_embed
        if config.unet.adm_in_channels > 0:
            self.label_emb = encoder.label_emb
        self.input_blocks = encoder.input_blocks
        self.middle_block = encoder.middle_block
        del encoder
        self.input_hint_block = _hint_block(config)
        # One zero 1x1 conv per input block output, wrapped as cldm's TimestepEmbedSequential (hence the `.0`).
        self.zero_convs = nn.ModuleList(
            nn.Sequential(_zero(nn.Conv2d(w, w, 1))) for w in self.skip_widths)
        mid = config.unet.block_out_channels[-1]
        self.middle_block_out = nn.Sequential(_zero(nn.Conv2d(mid, mid, 1)))

    @property
    def skip_widths(self) -> list[int]:
        """Channels of each input block's output (the UNet's skip connections), in order."""
        cfg = self.config.unet
        widths = [cfg.block_out_channels[0]]
        for level, width in enumerate(cfg.block_out_channels):
            widths += [width] * cfg.num_res_blocks
            if level != cfg.num_levels - 1:
                widths.append(width)
        return widths

    def hint_features(self, hint: torch.Tensor) -> torch.Tensor:
        """The control image's features (cldm `input_hint_block`), the same at every step: a sampling loop computes
        them once (`xldm.controlnet.ControlStack`) and passes them as `forward(..., hint_features=)`."""
        return self.input_hint_block(hint.to(self.time_embed[0].weight.dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None, hint: torch.Tensor | None, scale: float = 1.0, *,
                hint_features: torch.Tensor | None = None) -> Residuals:
        """Residuals for latents `x` (B, C, H, W) and control images `hint` (B, conditioning_channels, 8H, 8W) in
        [0, 1], or their `hint_features` (B, C0, H, W) computed before; `timesteps`, `context` and `y` as for the
        UNet."""
        cfg, unet = self.config, self.config.unet
        if x.ndim != 4 or x.shape[1] != unet.in_channels:
            raise ValueError(f"x: expected shape (B, {unet.in_channels}, H, W), found {tuple(x.shape)}")
        if hint_features is None:
            f = cfg.downsample_factor
            expected = (x.shape[0], cfg.conditioning_channels, x.shape[2] * f, x.shape[3] * f)
            if hint is None or tuple(hint.shape) != expected:
                found = None if hint is None else tuple(hint.shape)
                raise ValueError(f"control image: expected shape {expected} ({f}x the latents), found {found}")
            hint_features = self.hint_features(hint)
        elif tuple(hint_features.shape) != (x.shape[0], unet.block_out_channels[0], *x.shape[2:]):
            raise ValueError(f"hint features: expected shape {(x.shape[0], unet.block_out_channels[0], *x.shape[2:])}"
                             f", found {tuple(hint_features.shape)}")
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, unet.block_out_channels[0]).to(dtype))
        if unet.adm_in_channels > 0:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        # cldm: the hint features are added to the output of the first input block (the conv_in).
        h = self.input_blocks[0](x.to(dtype), emb, context) + hint_features
        down = [self.zero_convs[0](h)]
        for block, zero in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            down.append(zero(h))
        mid = self.middle_block_out(self.middle_block(h, emb, context))
        # diffusers ControlNetModel: every residual times conditioning_scale (guess_mode off).
        return [d * scale for d in down], mid * scale


def _family(unet: UNetConfig) -> str:
    """The base a UNet (or ControlNet encoder) shape belongs to, for messages (widths: the official configs)."""
    if unet.adm_in_channels == 0:
        return {768: "SD 1.x", 1024: "SD 2.x"}.get(unet.context_dim, "SD 1.x/2.x")  # no vector conditioning
    return {2816: "SDXL base", 2560: "SDXL refiner"}.get(unet.adm_in_channels, "an SDXL-shaped base")


def _shape_text(unet: UNetConfig) -> str:
    return (f"text context {unet.context_dim}, vector {unet.adm_in_channels}, widths "
            f"{list(unet.block_out_channels)} x {unet.num_res_blocks} blocks, {unet.in_channels} latent channels")


def check_controlnet_fits(control: ControlNetConfig, model: ModelConfig, name: str = "ControlNet") -> None:
    """Raise ControlNetError unless `control` can steer `model`: the same text context and vector conditioning,
    residuals of the UNet's skip shapes, the model's latent channels, and the VAE's downsampling in its hint
    network.  (Transformer depths may differ: reduced "small" ControlNets keep the skip shapes.)"""
    c, u = control.unet, model.unet
    fits = (c.context_dim == u.context_dim and c.adm_in_channels == u.adm_in_channels
            and c.block_out_channels == u.block_out_channels and c.num_res_blocks == u.num_res_blocks
            and c.in_channels == model.latent_channels)
    if not fits:
        raise ControlNetError(f"{name} is a ControlNet for {_family(c)} ({_shape_text(c)}); the model is "
                              f"{model.kind} and expects one with {_shape_text(replace(u, in_channels=model.latent_channels))}")
    if control.downsample_factor != model.downsample_factor:
        raise ControlNetError(f"{name}: its hint network downsamples {control.downsample_factor}x, the model's "
                              f"latents are {model.downsample_factor}x smaller than the image")
