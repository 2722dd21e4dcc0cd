"""Which model a checkpoint holds, and its configuration, from key names and shapes only.

Never reads tensor data (as ComfyUI `model_detection.py` and stable-diffusion.cpp `detect_from_weights`): the
input is a mapping key -> shape, which a safetensors header gives without touching the data.  Files written by
xldm also carry their exact config in the safetensors metadata (`xldm.config`), which wins where shapes cannot
tell (head counts of tiny models)."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, fields, replace
from typing import Mapping

from xldm.config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from xldm.errors import CheckpointError, UnknownModelError
from xldm.weights.io import json_type

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
METADATA_KEY = "xldm.config"

# Where each model family keeps its text encoders in the original single file, and in which layout:
# "hf" = transformers CLIPTextModel names, "open_clip" = open_clip text tower names (sgm `encoders/modules.py`,
# ldm `FrozenCLIPEmbedder` / `FrozenOpenCLIPEmbedder`).
TEXT_ENCODER_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sdxl-base": (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "open_clip")),
    "sdxl-refiner": (("conditioner.embedders.0.model.", "open_clip"),),
    "sd15": (("cond_stage_model.transformer.", "hf"),),
    "sd21": (("cond_stage_model.model.", "open_clip"),),
}

# Keys an original checkpoint may hold that belong to no inference component: the DDPM schedule
# buffers of ldm checkpoints, EMA copies, sgm's denoiser sigmas, open_clip's logit scale.
IGNORED_EXACT = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
}
# Empty top-level tensors that v-prediction / zero-terminal-SNR SDXL fine-tunes carry (read by A1111, Forge and
# ComfyUI's model detection): the marker's presence is the flag.
MARKER_V_PREDICTION, MARKER_ZERO_TERMINAL_SNR = "v_pred", "ztsnr"
IGNORED_EXACT |= {MARKER_V_PREDICTION, MARKER_ZERO_TERMINAL_SNR}
IGNORED_PREFIXES = ("model_ema.", "denoiser.", "loss.")
IGNORED_SUFFIXES = (".position_ids", ".logit_scale", "model.attn_mask")


def is_ignorable(key: str) -> bool:
    return key in IGNORED_EXACT or key.startswith(IGNORED_PREFIXES) or key.endswith(IGNORED_SUFFIXES)


def _sub(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _count_indexed(keys, pattern: str) -> int:
    """Number of distinct integers N in keys matching `pattern` (a regex with one group)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def detect_unet(shapes: Shapes, like: UNetConfig | None = None) -> UNetConfig:
    """UNetConfig from original-layout UNet keys (no `model.diffusion_model.` prefix).  Level widths are the output
    widths of each level's first ResBlock; the head layout, which shapes do not show, is that of the official
    checkpoints: 8 heads for SD 1.x (conv proj_in, context 768; ldm v1-inference.yaml num_heads: 8), 64-wide heads
    otherwise (SD 2.x / SDXL num_head_channels: 64); `like` (a related UNet's config) supplies the head layout and
    norm groups, which shapes do not show either, where they fit these widths."""
    n_in = _count_indexed(shapes, r"input_blocks\.(\d+)\.")
    downsamples = sum(1 for k in shapes if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k))
    levels = downsamples + 1
    num_res_blocks = (n_in - 1 - downsamples) // levels
    if 1 + levels * num_res_blocks + downsamples != n_in or num_res_blocks < 1:
        raise UnknownModelError(f"UNet has {n_in} input blocks and {downsamples} downsamplers: not a UNet layout")
    firsts = [1 + level * (num_res_blocks + 1) for level in range(levels)]
    try:
        in_channels, out_channels = shapes["input_blocks.0.0.weight"][1], shapes["out.2.weight"][0]
        widths = tuple(shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in firsts)
    except KeyError as e:
        raise UnknownModelError(f"UNet keys lack {e.args[0]!r}; this is not an SD/SDXL UNet") from None
    depth = tuple(_count_indexed(shapes, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") for i in firsts)
    attn_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise UnknownModelError("UNet has no cross-attention layers (attn2.to_k): not an SD/SDXL UNet")
    context_dim = shapes[attn_keys[0]][1]
    linear = len(next(v for k, v in shapes.items() if k.endswith("proj_in.weight"))) == 2
    heads = dict(num_heads=8, num_head_channels=-1) if not linear and context_dim == 768 else {}
    cfg = UNetConfig(
        in_channels=in_channels, out_channels=out_channels, block_out_channels=widths, num_res_blocks=num_res_blocks,
        transformer_depth=depth, context_dim=context_dim, use_linear_in_transformer=linear,
        transformer_depth_middle=_count_indexed(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        adm_in_channels=shapes.get("label_emb.0.0.weight", (0, 0))[1], **heads)
    if like is not None:
        shaped = replace(cfg, num_heads=like.num_heads, num_head_channels=like.num_head_channels,
                         norm_groups=like.norm_groups)
        try:
            for width in shaped.attention_widths:
                shaped.heads_for(width)
            if any(w % shaped.norm_groups for w in shaped.block_out_channels):
                raise ValueError("norm groups")
            cfg = shaped
        except ValueError:
            pass
    try:
        for width in cfg.attention_widths:
            cfg.heads_for(width)
    except ValueError as e:
        raise UnknownModelError(f"UNet attention {e} (the official checkpoints' head layout); the head layout cannot "
                                f"be read from shapes: load this model from a diffusers folder or a file written by "
                                f"xldm (its header holds the config)") from None
    return cfg


def detect_vae(shapes: Shapes, scaling_factor: float) -> VAEConfig:
    """VAEConfig from original-layout VAE keys (no `first_stage_model.` prefix)."""
    try:
        ch = shapes["encoder.conv_in.weight"][0]
        in_channels = shapes["encoder.conv_in.weight"][1]
        z = shapes["post_quant_conv.weight"][0]
        out_channels = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise UnknownModelError(f"VAE keys lack {e.args[0]!r}; this is not a KL autoencoder") from None
    levels = _count_indexed(shapes, r"encoder\.down\.(\d+)\.")
    num_res_blocks = _count_indexed(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    return VAEConfig(in_channels=in_channels, out_channels=out_channels, z_channels=z, ch=ch, ch_mult=ch_mult,
                     num_res_blocks=num_res_blocks, scaling_factor=scaling_factor)


def detect_text_encoder(shapes: Shapes, layout: str, base: TextEncoderConfig) -> TextEncoderConfig:
    """TextEncoderConfig from one encoder's keys, in "hf" or "open_clip" layout.  `base` supplies what shapes cannot
    tell: activation, which layer feeds the UNet, padding id.  Head count is width / 64 for every released CLIP text
    tower (L: 12, H: 16, bigG: 20)."""
    if layout == "hf":
        shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
        try:
            vocab, width = shapes["embeddings.token_embedding.weight"]
            positions = shapes["embeddings.position_embedding.weight"][0]
        except KeyError as e:
            raise UnknownModelError(f"text encoder keys lack {e.args[0]!r}") from None
        layers = _count_indexed(shapes, r"encoder\.layers\.(\d+)\.")
        intermediate = shapes["encoder.layers.0.mlp.fc1.weight"][0]
        projection = shapes["text_projection.weight"][0] if "text_projection.weight" in shapes else 0
    elif layout == "open_clip":
        try:
            vocab, width = shapes["token_embedding.weight"]
            positions = shapes["positional_embedding"][0]
        except KeyError as e:
            raise UnknownModelError(f"open_clip text encoder keys lack {e.args[0]!r}") from None
        layers = _count_indexed(shapes, r"transformer\.resblocks\.(\d+)\.")
        intermediate = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = shapes["text_projection"][1] if "text_projection" in shapes else 0
    else:
        raise ValueError(f"layout must be 'hf' or 'open_clip', got {layout!r}")
    heads = width // 64 if width % 64 == 0 else base.heads
    return replace(base, width=width, layers=layers, heads=heads, intermediate_size=intermediate, vocab_size=vocab,
                   max_positions=positions, projection_dim=projection)


def detect_kind(shapes: Shapes) -> str:
    """The model family of an original single-file checkpoint, from its key prefixes."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return "sdxl-base"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("cond_stage_model.model."):
        return "sd21"
    if has("cond_stage_model.transformer."):
        return "sd15"
    if has(UNET_PREFIX) or has(VAE_PREFIX):
        # A UNet without text encoders: tell SDXL base/refiner from the vector conditioning width.
        adm = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
        if adm is not None:  # adm_in_channels 2560 (refiner) / 2816 (base): sgm sd_xl_*.yaml
            return "sdxl-refiner" if adm[1] == 2560 else "sdxl-base"
        ctx = [v for k, v in shapes.items() if k.endswith("attn2.to_k.weight")]
        return "sd21" if ctx and ctx[0][1] == 1024 else "sd15"
    raise UnknownModelError("no known component prefix (model.diffusion_model., first_stage_model., "
                            f"conditioner.embedders., cond_stage_model.) among {len(shapes)} keys; "
                            f"first keys: {sorted(keys)[:5]}")


def config_from_metadata(metadata: Mapping[str, str] | None) -> ModelConfig | None:
    """The exact ModelConfig xldm stored in a file's safetensors metadata, if any."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    try:
        return model_config_from_dict(json.loads(metadata[METADATA_KEY]))
    except RecursionError:
        raise CheckpointError(f"the header's {METADATA_KEY!r} metadata is nested too deeply to be a ModelConfig") \
            from None
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the header's {METADATA_KEY!r} metadata is not a valid ModelConfig: {e}") from None


def model_config_to_dict(cfg: ModelConfig) -> dict:
    """`cfg` as JSON-able dicts; a text encoder's `kept_tokens` only where it has a pruned vocabulary (so files of
    full-vocabulary models keep the header they always had)."""
    d = asdict(cfg)
    for te in d["text_encoders"]:
        if not te["kept_tokens"]:
            del te["kept_tokens"]
    return d


def _fields_of(cls, d, where: str, nested: frozenset = frozenset()) -> dict:
    """`d`'s entries as keyword arguments of dataclass `cls`, each checked against its default's type (lists
    become tuples); unknown or missing fields and wrong types raise a ValueError (TypeError for a non-object)
    naming the field."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a JSON object, got a JSON {json_type(d)}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown} (known: {sorted(known)})")
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{where} lacks required field(s) {missing}")
    out = dict(d)
    for name, value in d.items():
        default, ok = known[name].default, True
        if name in nested:
            continue
        if isinstance(default, tuple) or (default is MISSING and isinstance(value, list)):
            ok = isinstance(value, list) and all(type(v) in (int, float, str) for v in value)
            expected, out[name] = "a JSON array of numbers or strings", tuple(value) if ok else value
        elif isinstance(default, bool):
            ok, expected = isinstance(value, bool), "a boolean"
        elif isinstance(default, int):
            ok, expected = type(value) is int, "an integer"
        elif isinstance(default, float):
            ok, expected = type(value) in (int, float), "a number"
        elif isinstance(default, str) or name == "kind":
            ok, expected = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{where}.{name} must be {expected}, got a JSON {json_type(value)}: {value!r:.60}")
    return out


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from `model_config_to_dict`'s output; ValueError naming the field that is missing, unknown or
    of the wrong type."""
    top = _fields_of(ModelConfig, d, "config", frozenset({"unet", "vae", "text_encoders"}))
    unet = UNetConfig(**_fields_of(UNetConfig, top["unet"], "config.unet"))
    vae = None if top["vae"] is None else VAEConfig(**_fields_of(VAEConfig, top["vae"], "config.vae"))
    if not isinstance(top["text_encoders"], list):
        raise TypeError(f"config.text_encoders must be a JSON array, got a JSON {json_type(top['text_encoders'])}")
    tes = tuple(TextEncoderConfig(**_fields_of(TextEncoderConfig, te, f"config.text_encoders[{i}]"))
                for i, te in enumerate(top["text_encoders"]))
    return ModelConfig(**dict(top, unet=unet, vae=vae, text_encoders=tes))


def detect_config(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> ModelConfig:
    """ModelConfig of an original-layout single-file checkpoint, from key names and shapes; absent components keep
    the family preset's config (so a UNet-only file still says which VAE and text encoders it expects).  The
    marker keys `v_pred` and `ztsnr` set `prediction_type="v"` and `zero_terminal_snr` (`_with_markers`)."""
    stored = config_from_metadata(metadata)
    if stored is not None:
        return _with_markers(stored, shapes)
    kind = detect_kind(shapes)
    preset = PRESETS[kind]
    unet = detect_unet(sub) if (sub := _sub(shapes, UNET_PREFIX)) else preset.unet
    vae = detect_vae(sub, preset.vae.scaling_factor) if (sub := _sub(shapes, VAE_PREFIX)) else preset.vae
    encoders = [detect_text_encoder(sub, layout, base) if (sub := _sub(shapes, prefix)) else base
                for (prefix, layout), base in zip(TEXT_ENCODER_LAYOUTS[kind], preset.text_encoders)]
    micro_dim = preset.micro_conditioning_dim
    if unet.adm_in_channels and preset.micro_conditioning:
        n_scalars = sum(1 if m == "aesthetic_score" else 2 for m in preset.micro_conditioning)
        micro_dim = (unet.adm_in_channels - encoders[-1].projection_dim) // n_scalars
    return _with_markers(replace(preset, unet=unet, vae=vae, text_encoders=tuple(encoders),
                                 micro_conditioning_dim=micro_dim), shapes)


def _with_markers(config: ModelConfig, shapes: Shapes) -> ModelConfig:
    """A marker key present sets its flag (over the metadata too: tools add the markers to existing files)."""
    return replace(config, prediction_type="v" if MARKER_V_PREDICTION in shapes else config.prediction_type,
                   zero_terminal_snr=config.zero_terminal_snr or MARKER_ZERO_TERMINAL_SNR in shapes)


# ControlNets (xldm.models.controlnet): original layout (cldm names, optionally under `control_model.`) or diffusers
# `ControlNetModel` names.
CONTROLNET_PREFIX = "control_model."
CONTROLNET_LAYOUTS = ("original", "diffusers")


def controlnet_layout(shapes: Shapes) -> tuple[str, str]:
    """(layout, key prefix) of a ControlNet state dict, from key names: "original" (cldm `input_hint_block.*`,
    maybe under `control_model.`) or "diffusers" (`controlnet_cond_embedding.*`)."""
    keys = shapes.keys()
    if any(k.endswith((".up", ".down")) or k == "lora_controlnet" for k in keys):
        raise UnknownModelError("this is a ControlNet-LoRA (control-lora) file; xldm loads full ControlNets only")
    for prefix in ("", CONTROLNET_PREFIX):
        if prefix + "input_hint_block.0.weight" in keys:
            return "original", prefix
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers", ""
    raise UnknownModelError(f"no ControlNet keys (input_hint_block.*, controlnet_cond_embedding.*) among {len(keys)} "
                            f"keys; first keys: {sorted(keys)[:5]}")


def _hint_widths(shapes: Shapes, conv_keys: list[str]) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, hint widths) from the hint network's convolutions in order: the first conv, then
    (conv, stride-2 conv) pairs, then the output conv."""
    if len(conv_keys) < 2 or len(conv_keys) % 2:
        raise UnknownModelError(f"the ControlNet hint network has {len(conv_keys)} convolutions; expected an even "
                                f"number >= 2")
    first = shapes[conv_keys[0]]
    widths = (first[0],) + tuple(shapes[k][0] for k in conv_keys[2:-1:2])
    return first[1], widths


def detect_controlnet(shapes: Shapes, like: UNetConfig | None = None):
    """(ControlNetConfig, layout, prefix) of a ControlNet from key names and shapes only.  The head layout and norm
    groups, which shapes do not show, are those of `like` (the base UNet the ControlNet is for: SDXL ControlNets
    copy its encoder) where they fit, else the official checkpoints' (`detect_unet`)."""
    from xldm.models.controlnet import ControlNetConfig
    from xldm.weights.keys_controlnet import controlnet_diffusers_to_original

    layout, prefix = controlnet_layout(shapes)
    shapes = _sub(shapes, prefix)
    if layout == "original":
        n = _count_indexed(shapes, r"input_hint_block\.(\d+)\.weight")
        hint_keys = [f"input_hint_block.{i}.weight" for i in range(0, n, 2)]
        encoder = {k: v for k, v in shapes.items() if k.startswith(("time_embed.", "label_emb.", "input_blocks.",
                                                                   "middle_block."))}
    else:
        n = _count_indexed(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
        hint_keys = (["controlnet_cond_embedding.conv_in.weight"]
                     + [f"controlnet_cond_embedding.blocks.{j}.weight" for j in range(n)]
                     + ["controlnet_cond_embedding.conv_out.weight"])
        encoder = _diffusers_encoder_as_original(shapes)
    missing = [k for k in hint_keys if k not in shapes]
    if missing:
        raise UnknownModelError(f"ControlNet hint network lacks {missing[0]!r}")
    channels, widths = _hint_widths(shapes, hint_keys)
    if "input_blocks.0.0.weight" not in encoder:
        raise UnknownModelError("ControlNet keys lack the encoder's input convolution (input_blocks.0.0 / conv_in)")
    # detect_unet reads the output width from out.2; a ControlNet has no decoder, so give it the input width.
    in_channels = encoder["input_blocks.0.0.weight"][1]
    unet = detect_unet({**encoder, "out.2.weight": (in_channels, encoder["input_blocks.0.0.weight"][0], 3, 3)},
                       like)
    cfg = ControlNetConfig(unet=unet, conditioning_channels=channels, hint_channels=widths)
    # Every key must be one the config's network has (a partial or foreign file is refused here, by name).
    if layout == "diffusers":
        try:
            controlnet_diffusers_to_original(shapes, cfg)
        except ValueError as e:
            raise UnknownModelError(str(e)) from None
    return cfg, layout, prefix


def _diffusers_encoder_as_original(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """The shapes detect_unet reads, renamed from diffusers ControlNetModel / UNet2DConditionModel encoder names."""
    out: dict[str, tuple[int, ...]] = {}
    levels = _count_indexed(shapes, r"down_blocks\.(\d+)\.")
    nr = _count_indexed(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
    index = 1
    for level in range(levels):
        for j in range(nr):
            src = f"down_blocks.{level}.resnets.{j}.conv2.weight"
            if src in shapes:
                out[f"input_blocks.{index}.0.out_layers.3.weight"] = shapes[src]
            rx = re.compile(rf"down_blocks\.{level}\.attentions\.{j}\.(.*)$")
            for k, v in shapes.items():
                if m := rx.match(k):
                    out[f"input_blocks.{index}.1.{m.group(1)}"] = v
            index += 1
        if level != levels - 1:
            out[f"input_blocks.{index}.0.op.weight"] = shapes.get(f"down_blocks.{level}.downsamplers.0.conv.weight",
                                                                   (0,))
            index += 1
    for k, v in shapes.items():
        if k.startswith("mid_block.attentions.0."):
            out["middle_block.1." + k[len("mid_block.attentions.0."):]] = v
    if "conv_in.weight" in shapes:
        out["input_blocks.0.0.weight"] = shapes["conv_in.weight"]
    if "add_embedding.linear_1.weight" in shapes:
        out["label_emb.0.0.weight"] = shapes["add_embedding.linear_1.weight"]
    return out
