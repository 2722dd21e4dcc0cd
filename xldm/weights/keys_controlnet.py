"""ControlNet state-dict key maps between the original layout (lllyasviel `cldm/cldm.py`, sgm names) and diffusers
`ControlNetModel`, and the diffusers config dict for a `ControlNetConfig` and back.

Pure dict -> dict renames, values untouched.  The shared encoder (time / vector embeddings, input blocks, middle
block) is renamed by the UNet's own rules (`keys_unet`); the ControlNet's own parts map as

    input_hint_block.0            <-> controlnet_cond_embedding.conv_in
    input_hint_block.{2 + 2j}     <-> controlnet_cond_embedding.blocks.j
    input_hint_block.{2 + 2n}     <-> controlnet_cond_embedding.conv_out      (n blocks)
    zero_convs.k.0                <-> controlnet_down_blocks.k
    middle_block_out.0            <-> controlnet_mid_block

(diffusers `loaders/single_file_utils.py` `convert_controlnet_checkpoint` names the same pairs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from xldm.models.controlnet import ControlNetConfig
from xldm.weights.keys_unet import _blocks, _convert, unet_config_from_diffusers, unet_diffusers_config

T = TypeVar("T")

# The ControlNetModel constructor arguments among a UNet2DConditionModel config's (diffusers
# `models/controlnets/controlnet.py` `ControlNetModel.__init__`).
_SHARED_WITH_UNET = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim",
)
# ControlNet settings this ControlNet does not implement: key -> accepted values.
_FIXED = {"controlnet_conditioning_channel_order": ("rgb",), "global_pool_conditions": (False,)}


def _controlnet_blocks(cfg: ControlNetConfig):
    unet = cfg.unet
    encoder = [b for b in _blocks(unet) if not b[0].startswith(("output_blocks.", "out."))]
    n = 2 * (len(cfg.hint_channels) - 1)
    hint = [("input_hint_block.0", "controlnet_cond_embedding.conv_in", "plain", 0)]
    hint += [(f"input_hint_block.{2 + 2 * j}", f"controlnet_cond_embedding.blocks.{j}", "plain", 0) for j in range(n)]
    hint.append((f"input_hint_block.{2 + 2 * n}", "controlnet_cond_embedding.conv_out", "plain", 0))
    skips = 1 + unet.num_levels * unet.num_res_blocks + unet.num_levels - 1
    zero = [(f"zero_convs.{k}.0", f"controlnet_down_blocks.{k}", "plain", 0) for k in range(skips)]
    zero.append(("middle_block_out.0", "controlnet_mid_block", "plain", 0))
    return encoder + hint + zero


def controlnet_original_to_diffusers(sd: Mapping[str, T], cfg: ControlNetConfig) -> dict[str, T]:
    """Original (cldm, no `control_model.` prefix) ControlNet keys -> diffusers `ControlNetModel` keys."""
    return _convert(sd, cfg.unet, True, _controlnet_blocks(cfg), "ControlNet")


def controlnet_diffusers_to_original(sd: Mapping[str, T], cfg: ControlNetConfig) -> dict[str, T]:
    """diffusers `ControlNetModel` keys -> original (cldm, unprefixed) keys."""
    return _convert(sd, cfg.unet, False, _controlnet_blocks(cfg), "ControlNet")


def controlnet_diffusers_config(cfg: ControlNetConfig, *, addition_time_embed_dim: int = 256) -> dict[str, Any]:
    """The diffusers `ControlNetModel` config (constructor kwargs / config.json body) for `cfg`."""
    unet = unet_diffusers_config(cfg.unet, addition_time_embed_dim=addition_time_embed_dim)
    return {k: unet[k] for k in _SHARED_WITH_UNET} | {k: v[0] for k, v in _FIXED.items()} | {
        "conditioning_channels": cfg.conditioning_channels,
        "conditioning_embedding_out_channels": list(cfg.hint_channels)}


def controlnet_config_from_diffusers(d: Mapping[str, Any]) -> ControlNetConfig:
    """The `ControlNetConfig` for a diffusers `ControlNetModel` config dict (missing keys: diffusers' defaults);
    settings outside what this ControlNet implements raise a ValueError naming them."""
    for key, accepted in _FIXED.items():
        if key in d and d[key] not in accepted:
            raise ValueError(f"unsupported diffusers ControlNet setting {key}={d[key]!r}; expected one of {accepted}")
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    mirrored = ["CrossAttnUpBlock2D" if b == "CrossAttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    # A ControlNet has no decoder: give the UNet parser the mirror it expects and the input width as output.
    unet = unet_config_from_diffusers({k: v for k, v in d.items() if k in _SHARED_WITH_UNET}
                                      | {"up_block_types": mirrored, "out_channels": d.get("in_channels", 4)})
    hint = d.get("conditioning_embedding_out_channels") or [16, 32, 96, 256]
    channels = d.get("conditioning_channels", 3)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"conditioning_channels must be a positive int, found {channels!r}")
    if not isinstance(hint, (list, tuple)) or not hint or not all(isinstance(c, int) and c > 0 for c in hint):
        raise ValueError(f"conditioning_embedding_out_channels must be a list of positive ints, found {hint!r}")
    return ControlNetConfig(unet=unet, conditioning_channels=channels, hint_channels=tuple(hint))
