"""VAE state-dict key maps: original ldm/sgm names <-> diffusers `AutoencoderKL` names, and the config in both.

Keys are given without the `first_stage_model.` prefix of a single-file checkpoint.  The rules are those of
diffusers' `convert_ldm_vae_checkpoint` (loaders/single_file_utils.py):
  norm_out -> conv_norm_out,  encoder.down.i.block.j -> encoder.down_blocks.i.resnets.j,
  encoder.down.i.downsample.conv -> encoder.down_blocks.i.downsamplers.0.conv,
  decoder.up.(L-1-i).block.j -> decoder.up_blocks.i.resnets.j   (reversed level order),
  decoder.up.(L-1-i).upsample.conv -> decoder.up_blocks.i.upsamplers.0.conv,
  mid.block_{1,2} -> mid_block.resnets.{0,1},  nin_shortcut -> conv_shortcut,
  mid.attn_1.{norm,q,k,v,proj_out} -> mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0},
  with the attention's 1x1-conv weights [C, C, 1, 1] stored as Linear weights [C, C] in diffusers.
The maps are pure: tensors are passed through (the attention weights as reshape views), never copied."""

from __future__ import annotations

from typing import Any

import torch

from xldm.config import VAEConfig

_RESBLOCK_PARAMS = ("norm1", "conv1", "norm2", "conv2")
# original attention parameter -> diffusers name
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_LINEARS = ("q", "k", "v", "proj_out")


def _resblock_pairs(original: str, diffusers: str, has_shortcut: bool) -> list[tuple[str, str]]:
    names = [(p, p) for p in _RESBLOCK_PARAMS]
    if has_shortcut:
        names.append(("nin_shortcut", "conv_shortcut"))
    return [(f"{original}.{o}", f"{diffusers}.{d}") for o, d in names]


def _mid_pairs(part: str) -> list[tuple[str, str]]:
    pairs = []
    for i in (1, 2):
        pairs += _resblock_pairs(f"{part}.mid.block_{i}", f"{part}.mid_block.resnets.{i - 1}", False)
    for o, d in _ATTENTION_NAMES.items():
        pairs.append((f"{part}.mid.attn_1.{o}", f"{part}.mid_block.attentions.0.{d}"))
    return pairs


def vae_module_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(original, diffusers) module names of every VAE layer for `cfg`; each has a `.weight` and a `.bias`."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    levels = len(widths)
    pairs: list[tuple[str, str]] = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_out", f"{part}.conv_out"),
                  (f"{part}.norm_out", f"{part}.conv_norm_out")]
        pairs += _mid_pairs(part)
    pairs += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]

    # ldm Encoder: level i maps ch*in_ch_mult[i] -> widths[i], in_ch_mult = (1,) + ch_mult.
    width_in = cfg.ch
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs += _resblock_pairs(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                     width_in != widths[i])
            width_in = widths[i]
        if i != levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))

    # ldm Decoder: levels run from the last to 0; diffusers numbers them in run order.
    width_in = widths[-1]
    for i in reversed(range(levels)):
        up_block = levels - 1 - i
        for j in range(cfg.num_res_blocks + 1):
            pairs += _resblock_pairs(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up_block}.resnets.{j}",
                                     width_in != widths[i])
            width_in = widths[i]
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up_block}.upsamplers.0.conv"))
    return pairs


def _key_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    return [(f"{o}.{p}", f"{d}.{p}") for o, d in vae_module_pairs(cfg) for p in ("weight", "bias")]


def _is_attention_linear_weight(original_key: str) -> bool:
    return any(original_key.endswith(f".mid.attn_1.{name}.weight") for name in _ATTENTION_LINEARS)


def _check_all_map(sd: dict[str, Any], table: dict[str, str], direction: str) -> None:
    unmapped = sorted(k for k in sd if k not in table)
    if unmapped:
        shown = ", ".join(unmapped[:20]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 20 else "")
        raise ValueError(f"VAE {direction}: keys that do not map for this config: {shown}")


def vae_original_to_diffusers(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Original (ldm/sgm, no `first_stage_model.` prefix) VAE state dict -> diffusers `AutoencoderKL` state dict."""
    table = dict(_key_pairs(cfg))
    _check_all_map(sd, table, "original -> diffusers")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_attention_linear_weight(key) and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                raise ValueError(f"{key}: expected a 1x1 conv weight [C, C, 1, 1], found {tuple(value.shape)}")
            value = value.reshape(value.shape[0], value.shape[1])  # conv 1x1 -> Linear, a view
        out[table[key]] = value
    return out


def vae_diffusers_to_original(sd: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Diffusers `AutoencoderKL` state dict -> original (ldm/sgm, no prefix) VAE state dict."""
    table = {d: o for o, d in _key_pairs(cfg)}
    _check_all_map(sd, table, "diffusers -> original")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        original = table[key]
        if _is_attention_linear_weight(original) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear -> conv 1x1, a view
        out[original] = value
    return out


_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


def vae_diffusers_config(cfg: VAEConfig, sample_size: int = 1024) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config.json dict for `cfg` (`sample_size` is the image size
    the VAE was trained for, 1024 for SDXL, 512 for SD 1.x, and only affects diffusers' tiling)."""
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "latent_channels": cfg.z_channels, "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks, "down_block_types": [_DOWN_BLOCK] * levels,
        "up_block_types": [_UP_BLOCK] * levels, "norm_num_groups": cfg.norm_groups, "act_fn": "silu",
        "sample_size": sample_size, "scaling_factor": cfg.scaling_factor, "shift_factor": None,
        "latents_mean": None, "latents_std": None,
        # The SDXL VAE overflows in fp16; diffusers upcasts it to fp32 when this is set (AutoencoderKL `force_upcast`).
        "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    }


def vae_config_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    """A diffusers `AutoencoderKL` config dict -> VAEConfig. Missing entries take diffusers' class defaults;
    variants this VAE does not implement (other block types, no quant convs, shifted latents) raise ValueError."""
    block_out = list(d.get("block_out_channels", (64,)))
    levels = len(block_out)
    for key, block in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
        found = list(d.get(key, (block,)))
        if found != [block] * levels:
            raise ValueError(f"{key}: expected {[block] * levels}, found {found}")
    unsupported = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                   "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
    for key, expected in unsupported.items():
        if (found := d.get(key, expected)) != expected:
            raise ValueError(f"{key}: expected {expected!r}, found {found!r}")
    ch = block_out[0]
    if any(w % ch for w in block_out):
        raise ValueError(f"block_out_channels {block_out} are not all multiples of the first ({ch})")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     z_channels=d.get("latent_channels", 4), ch=ch, ch_mult=tuple(w // ch for w in block_out),
                     num_res_blocks=d.get("layers_per_block", 1), norm_groups=d.get("norm_num_groups", 32),
                     scaling_factor=float(d.get("scaling_factor", 0.18215)))
