"""Key maps for CLIP text encoders: open_clip <-> xldm/HF layout, HF key normalization, HF config.json.

The xldm layout (`xldm.models.clip.CLIPTextModel`) is the HF transformers layout as the original SDXL
single file stores CLIP-L under `conditioner.embedders.0.transformer.`:

    text_model.embeddings.{token_embedding,position_embedding}.weight
    text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                                  (only with a projection)

The open_clip text tower (SDXL file: `conditioner.embedders.1.model.` base / `.0.model.` refiner; sgm
`FrozenOpenCLIPEmbedder2`):

    token_embedding.weight, positional_embedding            (no ".weight")
    transformer.resblocks.N.{ln_1, attn.in_proj_weight [3W, W] / in_proj_bias [3W] (q|k|v along dim 0),
                             attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}.{weight,bias}
    ln_final.{weight,bias}, text_projection [W, P] used as x @ P  (HF weight = P.T), logit_scale (dropped)

All functions take and return dicts of tensors with the prefixes above already stripped; they never copy
tensor data except where the layouts force it (q|k|v concatenation; the projection transpose, which is made
contiguous so the result can be written to safetensors directly). The q/k/v splits are views."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import torch

from xldm.config import TextEncoderConfig

# open_clip names -> HF names inside one residual block (open_clip transformer.py ResidualAttentionBlock;
# HF CLIPEncoderLayer); the q/k/v split of in_proj is handled separately.
_BLOCK_OPEN_CLIP_TO_HF = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK_HF_TO_OPEN_CLIP = {hf: oc for oc, hf in _BLOCK_OPEN_CLIP_TO_HF.items()}
_TOP_OPEN_CLIP_TO_HF = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                        "positional_embedding": "text_model.embeddings.position_embedding.weight",
                        "ln_final.weight": "text_model.final_layer_norm.weight",
                        "ln_final.bias": "text_model.final_layer_norm.bias"}
_TOP_HF_TO_OPEN_CLIP = {hf: oc for oc, hf in _TOP_OPEN_CLIP_TO_HF.items()}
# Keys of the open_clip text tower that have no HF counterpart and are dropped.
_OPEN_CLIP_IGNORED = {"logit_scale", "attn_mask"}

_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OC_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")

_HF_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")


def _check_layer(index: int, cfg: TextEncoderConfig, key: str) -> None:
    if index >= cfg.layers:
        raise ValueError(f"{key}: block {index} does not exist in a {cfg.layers}-layer text encoder")


def open_clip_to_hf(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """open_clip text tower (prefix stripped) -> xldm/HF layout. Unknown keys raise ValueError."""
    w = cfg.width
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in _OPEN_CLIP_IGNORED or key.endswith("position_ids"):
            continue
        if key in _TOP_OPEN_CLIP_TO_HF:
            out[_TOP_OPEN_CLIP_TO_HF[key]] = value
        elif key == "text_projection":
            if cfg.projection_dim <= 0:
                raise ValueError(f"{key} found, but the config has no projection (projection_dim=0)")
            if tuple(value.shape) != (w, cfg.projection_dim):
                raise ValueError(f"{key}: expected shape {(w, cfg.projection_dim)} ([width, proj]), "
                                 f"found {tuple(value.shape)}")
            # open_clip: x @ P, nn.Linear: x @ W.T; W = P.T (diffusers single_file_utils convert_open_clip_checkpoint)
            out["text_projection.weight"] = value.t().contiguous()
        elif (m := _OC_IN_PROJ.match(key)) is not None:
            layer, kind = int(m.group(1)), m.group(2)
            _check_layer(layer, cfg, key)
            expected = (3 * w, w) if kind == "weight" else (3 * w,)
            if tuple(value.shape) != expected:
                raise ValueError(f"{key}: expected shape {expected} (q|k|v stacked), found {tuple(value.shape)}")
            base = f"text_model.encoder.layers.{layer}.self_attn"
            # Rows [0:W] = q, [W:2W] = k, [2W:3W] = v (torch nn.MultiheadAttention in_proj); slices are views.
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{base}.{name}.{kind}"] = value[i * w : (i + 1) * w]
        elif (m := _OC_BLOCK.match(key)) is not None and m.group(2) in _BLOCK_OPEN_CLIP_TO_HF:
            layer = int(m.group(1))
            _check_layer(layer, cfg, key)
            out[f"text_model.encoder.layers.{layer}.{_BLOCK_OPEN_CLIP_TO_HF[m.group(2)]}.{m.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} unknown open_clip text keys, e.g. {sorted(unknown)[:5]}")
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """xldm/HF layout (after `hf_normalize_keys`) -> open_clip text tower (no prefix, no logit_scale).

    Each block needs all of q/k/v weight and bias to build `in_proj_*`; a missing part raises ValueError."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP_HF_TO_OPEN_CLIP:
            out[_TOP_HF_TO_OPEN_CLIP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()  # [proj, width] -> P [width, proj]
        elif (m := _HF_BLOCK.match(key)) is not None:
            layer, name, kind = int(m.group(1)), m.group(2), m.group(3)
            _check_layer(layer, cfg, key)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[name[-6]] = value
            elif name in _BLOCK_HF_TO_OPEN_CLIP:
                out[f"transformer.resblocks.{layer}.{_BLOCK_HF_TO_OPEN_CLIP[name]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} unknown HF CLIP text keys, e.g. {sorted(unknown)[:5]}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"block {layer}: {kind} of q/k/v projections incomplete, found only {sorted(parts)}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def hf_normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys -> xldm layout: add the `text_model.` prefix where missing and drop `position_ids`.

    transformers-5 `CLIPTextModel` saves `embeddings.*` / `encoder.*` / `final_layer_norm.*` without the prefix,
    as do old SD 1.x files (`cond_stage_model.transformer.embeddings...` once the caller strips its prefix).
    Other keys (e.g. `text_projection.weight`) pass through unchanged, so a strict load reports strays."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        out["text_model." + key if key.startswith(_HF_TOP_LEVEL) else key] = value
    return out


def clip_hf_config(cfg: TextEncoderConfig) -> dict[str, Any]:
    """A transformers `CLIPTextConfig` config.json dict for this encoder, as the SDXL hub files have it.

    bos/eos/pad = 0/2/1 as in the hub configs (pre transformers PR #24773), which makes transformers pool at
    argmax(input_ids), like xldm. Encoders with a projection are `CLIPTextModelWithProjection`; without one,
    `CLIPTextModel` with projection_dim = width (unused; openai/clip-vit-large-patch14 has 768)."""
    with_projection = cfg.projection_dim > 0
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "hidden_act": cfg.activation, "hidden_size": cfg.width, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size, "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_positions, "num_attention_heads": cfg.heads,
        "num_hidden_layers": cfg.layers, "projection_dim": cfg.projection_dim if with_projection else cfg.width,
        "vocab_size": cfg.vocab_size,
    }


def clip_config_from_hf(d: dict[str, Any], **overrides: Any) -> TextEncoderConfig:
    """transformers CLIPTextConfig dict -> TextEncoderConfig.

    config.json does not say how a pipeline uses the encoder; defaults are SDXL's (penultimate layer, no final
    LN on it). The tokenizer padding follows the model family: OpenCLIP (gelu) towers go with "!" padding
    (id 0), OpenAI CLIP (quick_gelu) with EOS. Pass e.g. `layer="last", final_norm_on_hidden=True` for SD 1.x."""
    architectures = d.get("architectures") or ["CLIPTextModel"]
    with_projection = any(a.endswith("WithProjection") for a in architectures)
    # transformers' CLIPTextConfig defaults apply to keys missing from the file (hidden_act quick_gelu, ...).
    activation = d.get("hidden_act", "quick_gelu")
    cfg = TextEncoderConfig(
        width=int(d.get("hidden_size", 512)), layers=int(d.get("num_hidden_layers", 12)),
        heads=int(d.get("num_attention_heads", 8)), intermediate_size=int(d.get("intermediate_size", 2048)),
        vocab_size=int(d.get("vocab_size", 49408)), max_positions=int(d.get("max_position_embeddings", 77)),
        activation=activation, projection_dim=int(d.get("projection_dim", 512)) if with_projection else 0,
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)), pad_token_id=0 if activation == "gelu" else 49407,
    )
    return replace(cfg, **overrides) if overrides else cfg
