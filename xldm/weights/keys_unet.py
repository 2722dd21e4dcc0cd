"""UNet state-dict key maps between the original (ldm/sgm) layout and diffusers `UNet2DConditionModel`.

Pure dict -> dict renames: the tensors are passed through untouched (no copies, no reshapes; every UNet
tensor has the same shape in both layouts, SD 1.x 1x1-conv proj_in/proj_out included).  Original keys are
given WITHOUT the `model.diffusion_model.` prefix.  The rules are those of diffusers'
`convert_ldm_unet_checkpoint` (`loaders/single_file_utils.py`), written out per block from the config, with
the upsampler index quirk: `output_blocks.N.1.conv` for an up block without attention, `.2.conv` with it.

Also here: the diffusers `UNet2DConditionModel` config dict for a `UNetConfig`, and its inverse."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from xldm.config import UNetConfig

T = TypeVar("T")

# ResBlock inner names: sgm -> diffusers ResnetBlock2D (single_file_utils.update_unet_resnet_ldm_to_diffusers).
_RESNET_ORIGINAL_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_DIFFUSERS_TO_ORIGINAL = {v: k for k, v in _RESNET_ORIGINAL_TO_DIFFUSERS.items()}

# SpatialTransformer inner names are identical in both layouts; these are the ones that exist.
_ATTENTION_OUTER = re.compile(r"^(norm|proj_in|proj_out)\.(weight|bias)$")
_ATTENTION_BLOCK = re.compile(
    r"^transformer_blocks\.(\d+)\.(norm[123]\.(weight|bias)|attn[12]\.to_[qkv]\.weight"
    r"|attn[12]\.to_out\.0\.(weight|bias)|ff\.net\.0\.proj\.(weight|bias)|ff\.net\.2\.(weight|bias))$"
)
_LEAF = re.compile(r"^(weight|bias)$")

# A block: (original prefix, diffusers prefix, kind, transformer depth for kind "attention").
_Block = tuple[str, str, str, int]


def _blocks(cfg: UNetConfig) -> list[_Block]:
    """Every parameter-holding module of the UNet as (original, diffusers, kind, depth)."""
    blocks: list[_Block] = [("time_embed.0", "time_embedding.linear_1", "plain", 0),
                            ("time_embed.2", "time_embedding.linear_2", "plain", 0),
                            ("input_blocks.0.0", "conv_in", "plain", 0), ("out.0", "conv_norm_out", "plain", 0),
                            ("out.2", "conv_out", "plain", 0)]
    if cfg.adm_in_channels > 0:
        # addition_embed_type="text_time" (SDXL); sgm label_emb.0 = Sequential(Linear, SiLU, Linear).
        blocks += [("label_emb.0.0", "add_embedding.linear_1", "plain", 0),
                   ("label_emb.0.2", "add_embedding.linear_2", "plain", 0)]
    nr, last = cfg.num_res_blocks, cfg.num_levels - 1
    index = 1
    for level in range(cfg.num_levels):
        depth = cfg.transformer_depth[level]
        for j in range(nr):
            blocks.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resnet", 0))
            if depth > 0:
                blocks.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention", depth))
            index += 1
        if level != last:
            blocks.append((f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain", 0))
            index += 1
    blocks += [("middle_block.0", "mid_block.resnets.0", "resnet", 0),
               ("middle_block.1", "mid_block.attentions.0", "attention", cfg.transformer_depth_middle),
               ("middle_block.2", "mid_block.resnets.1", "resnet", 0)]
    # diffusers up block u is level (num_levels - 1 - u); it has nr + 1 resnets.
    for up in range(cfg.num_levels):
        depth = cfg.transformer_depth[last - up]
        for j in range(nr + 1):
            index = up * (nr + 1) + j
            blocks.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", "resnet", 0))
            if depth > 0:
                blocks.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", "attention", depth))
            if up != last and j == nr:
                # The Upsample follows the attention layer when there is one.
                slot = 2 if depth > 0 else 1
                blocks.append((f"output_blocks.{index}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv", "plain", 0))
    return blocks


def _inner(rest: str, kind: str, depth: int, to_diffusers: bool) -> str | None:
    """Rename the part of a key below its block, or None if no such parameter exists there."""
    if kind == "plain":
        return rest if _LEAF.match(rest) else None
    if kind == "attention":
        if _ATTENTION_OUTER.match(rest):
            return rest
        match = _ATTENTION_BLOCK.match(rest)
        return rest if match and int(match.group(1)) < depth else None
    table = _RESNET_ORIGINAL_TO_DIFFUSERS if to_diffusers else _RESNET_DIFFUSERS_TO_ORIGINAL
    module, _, leaf = rest.rpartition(".")
    if module in table and _LEAF.match(leaf):
        return f"{table[module]}.{leaf}"
    return None


def _convert(sd: Mapping[str, T], cfg: UNetConfig, to_diffusers: bool, blocks: list[_Block] | None = None,
             what: str = "UNet") -> dict[str, T]:
    """Rename every key by its block in `blocks` (default: the UNet's, `_blocks(cfg)`); unmapped keys raise."""
    prefixes = {(o if to_diffusers else d): (d if to_diffusers else o, kind, depth)
                for o, d, kind, depth in (_blocks(cfg) if blocks is None else blocks)}
    out: dict[str, T] = {}
    unmapped = []
    for key, value in sd.items():
        new_key = None
        parts = key.split(".")
        # Longest block prefix first (block prefixes are never prefixes of one another's parameters).
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in prefixes:
                target, kind, depth = prefixes[prefix]
                rest = _inner(".".join(parts[cut:]), kind, depth, to_diffusers)
                if rest is not None:
                    new_key = f"{target}.{rest}"
                break
        if new_key is None:
            unmapped.append(key)
        else:
            out[new_key] = value
    if unmapped:
        layout = "original" if to_diffusers else "diffusers"
        shown = ", ".join(unmapped[:20]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 20 else "")
        raise ValueError(f"{len(unmapped)} {what} keys do not map from the {layout} layout for this config: {shown}")
    return out


def unet_original_to_diffusers(sd: Mapping[str, T], cfg: UNetConfig) -> dict[str, T]:
    """Original (sgm/ldm, no `model.diffusion_model.` prefix) UNet keys -> diffusers keys; values untouched."""
    return _convert(sd, cfg, to_diffusers=True)


def unet_diffusers_to_original(sd: Mapping[str, T], cfg: UNetConfig) -> dict[str, T]:
    """diffusers `UNet2DConditionModel` keys -> original (sgm/ldm, unprefixed) keys; values untouched."""
    return _convert(sd, cfg, to_diffusers=False)


# Configs

# Settings of a diffusers UNet config that this UNet does not implement: key -> accepted values (the first
# is what `unet_diffusers_config` writes).  Names and defaults: diffusers `UNet2DConditionModel.__init__`.
_FIXED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,), "downsample_padding": (1,),
    "mid_block_scale_factor": (1,), "act_fn": ("silu",), "norm_eps": (1e-5,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None, "text_time"),
    "num_class_embeds": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "reverse_transformer_layers_per_block": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}


def _diffusers_depths(cfg: UNetConfig) -> int | list[int]:
    """`transformer_layers_per_block`: diffusers gives the mid block the LAST entry, so a last level
    without attention carries the mid depth; other attention-less levels get 1 (unused, as in the SDXL
    hub config [1, 2, 10]).  One shared depth is written as an int (refiner 4, SD 1.x 1)."""
    depths = list(cfg.transformer_depth)
    if {d for d in depths if d > 0} <= {cfg.transformer_depth_middle}:
        return cfg.transformer_depth_middle
    if depths[-1] > 0 and depths[-1] != cfg.transformer_depth_middle:
        raise ValueError(f"diffusers cannot express transformer_depth[-1]={depths[-1]} with a different "
                         f"transformer_depth_middle={cfg.transformer_depth_middle} (its mid block takes the last "
                         f"level's depth)")
    return [d if d > 0 else 1 for d in depths[:-1]] + [cfg.transformer_depth_middle]


def unet_diffusers_config(cfg: UNetConfig, *, addition_time_embed_dim: int = 256,
                          sample_size: int | None = None) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config (constructor kwargs / config.json body) for `cfg`.

    `attention_head_dim` is, despite its name, the number of heads per level (diffusers sets
    `num_attention_heads = num_attention_heads or attention_head_dim`): a list ([5, 10, 20] for SDXL base)
    when the head width is fixed, an int (8 for SD 1.5) when the head count is.
    `addition_time_embed_dim` is the Fourier width per micro-conditioning scalar (256 for SDXL)."""
    widths = list(cfg.block_out_channels)
    attention = [d > 0 for d in cfg.transformer_depth]
    adm = cfg.adm_in_channels if cfg.adm_in_channels > 0 else None
    return {k: v[0] for k, v in _FIXED.items()} | {
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks, "dropout": 0.0,
        "norm_num_groups": cfg.norm_groups, "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": _diffusers_depths(cfg),
        "attention_head_dim": cfg.num_heads if cfg.num_heads > 0 else [w // cfg.num_head_channels for w in widths],
        "use_linear_projection": cfg.use_linear_in_transformer, "upcast_attention": False,
        "addition_embed_type": "text_time" if adm else None,
        "addition_time_embed_dim": addition_time_embed_dim if adm else None,
        "projection_class_embeddings_input_dim": adm,
    }


def _ints(name: str, value: Any, n: int) -> list[int]:
    """A setting diffusers takes as one int or one per level -> n positive ints."""
    values = [value] * n if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name}: expected a positive int or {n} of them (one per level), found {value!r}")
    return values


def unet_config_from_diffusers(d: Mapping[str, Any]) -> UNetConfig:
    """The `UNetConfig` for a diffusers `UNet2DConditionModel` config dict (inverse of `unet_diffusers_config`).

    Missing keys take diffusers' constructor defaults (as hub config.json files rely on); settings outside
    the SD/SDXL family (other block types, per-block lists where this UNet has one value, ...) raise a
    ValueError naming them."""
    def get(key: str, default: Any) -> Any:
        value = d.get(key, default)
        return list(value) if isinstance(value, tuple) else value

    def one(key: str, default: int) -> int:
        value = d.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be one positive int, found {value!r}")
        return value

    for key, accepted in _FIXED.items():
        if key in d and d[key] not in accepted:
            raise ValueError(f"unsupported diffusers UNet setting {key}={d[key]!r}; expected one of {accepted}")
    widths = get("block_out_channels", [320, 640, 1280, 1280])
    if not isinstance(widths, list) or not widths:
        raise ValueError(f"block_out_channels must be a list of widths, one per level, found {widths!r}")
    widths = _ints("block_out_channels", widths, len(widths))
    n = len(widths)
    down = get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    if len(down) != n or len(up) != n:
        raise ValueError(f"expected {n} down and up block types (one per level), found {len(down)} and {len(up)}")
    unknown = [b for b in down if b not in ("CrossAttnDownBlock2D", "DownBlock2D")]
    if unknown:
        raise ValueError(f"unsupported down block type {unknown[0]!r}")
    attention = [b == "CrossAttnDownBlock2D" for b in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if up != expected_up:
        raise ValueError(f"up_block_types: expected {expected_up} (mirror of the down blocks), found {up}")
    depths = _ints("transformer_layers_per_block", get("transformer_layers_per_block", 1), n)

    heads_setting = get("attention_head_dim", 8)  # the head COUNT per level, see unet_diffusers_config
    heads = _ints("attention_head_dim", heads_setting, n)
    head_widths = {w // h for w, h in zip(widths, heads)}
    if isinstance(heads_setting, int):
        num_heads, num_head_channels = heads_setting, -1
    elif len(head_widths) == 1 and all(w % h == 0 for w, h in zip(widths, heads)):
        num_heads, num_head_channels = -1, head_widths.pop()
    elif len(set(heads)) == 1:
        num_heads, num_head_channels = heads[0], -1
    else:
        raise ValueError(f"attention_head_dim {heads_setting} gives neither one head count nor one head width "
                         f"for block_out_channels {widths}")
    text_time = d.get("addition_embed_type") == "text_time"
    return UNetConfig(
        in_channels=one("in_channels", 4), out_channels=one("out_channels", 4), block_out_channels=tuple(widths),
        num_res_blocks=one("layers_per_block", 2),
        transformer_depth=tuple(dep if a else 0 for dep, a in zip(depths, attention)),
        transformer_depth_middle=depths[-1], num_head_channels=num_head_channels, num_heads=num_heads,
        context_dim=one("cross_attention_dim", 1280),
        adm_in_channels=one("projection_class_embeddings_input_dim", 0) if text_time else 0,
        use_linear_in_transformer=bool(get("use_linear_projection", False)), norm_groups=one("norm_num_groups", 32),
    )
