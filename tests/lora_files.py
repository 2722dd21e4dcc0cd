"""Random adapter files in each format, for the tests (tiny models)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from torch import nn

from xldm.lora.files import kohya_name, layer_names

UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(config, *, text: bool = True, conv: bool = False) -> list[tuple[str, str, tuple[int, ...]]]:
    """(component, layer, weight shape) of the layers kohya's SDXL LoRA trains (attention, feed-forward,
    projections; `text`: the encoders' attention and MLP; `conv`: LoCon's resblock and in/out convolutions)."""
    seen, out = set(), []
    for component, layer, shape in layer_names(config).values():
        if (component, layer) in seen:
            continue
        seen.add((component, layer))
        if component == "unet":
            wanted = layer.endswith(UNET_LAYERS) or (conv and len(shape) == 4)
        else:
            wanted = text and layer.endswith(TEXT_LAYERS)
        if wanted:
            out.append((component, layer, shape))
    return out


def random_lora(config, rank: int = 4, *, seed: int = 0, alpha: float | None = None, text: bool = True,
                conv: bool = False, scale: float = 0.3) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, layer) -> {"lora_down", "lora_up", "alpha"} with random values (both factors nonzero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for component, layer, shape in targets(config, text=text, conv=conv):
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        out[(component, layer)] = {"lora_down": torch.randn(down_shape, generator=g) * scale,
                                   "lora_up": torch.randn(up_shape, generator=g) * scale,
                                   "alpha": torch.tensor(float(alpha if alpha is not None else rank))}
    return out


def save_kohya(path, config, lora) -> None:
    tensors = {}
    for (component, layer), t in lora.items():
        name = kohya_name(config, component, layer)
        tensors[f"{name}.lora_down.weight"] = t["lora_down"].contiguous()
        tensors[f"{name}.lora_up.weight"] = t["lora_up"].contiguous()
        tensors[f"{name}.alpha"] = t["alpha"]
    save_file(tensors, str(path))


def diffusers_path(config, component: str, layer: str) -> str:
    """The module path diffusers (and so peft) gives an xldm layer."""
    from xldm.weights.keys_unet import unet_original_to_diffusers

    if component != "unet":
        return layer
    return next(iter(unet_original_to_diffusers({f"{layer}.weight": 0}, config.unet))).removesuffix(".weight")


def save_peft(path, config, lora, *, lora_alpha: float | None = None, metadata: dict | None = None) -> None:
    """diffusers `save_lora_weights` layout: `unet.<diffusers layer>.lora_A.weight`, `text_encoder(_2).<layer>...`,
    `lora_magnitude_vector` for a `dora_scale`, the rank (the most common one) and alpha in the
    `lora_adapter_metadata` JSON, updated with `metadata` (`unet.alpha_pattern`, ...)."""
    tensors, ranks, layers = {}, [], {}
    for (component, layer), t in lora.items():
        layer = diffusers_path(config, component, layer)
        layers.setdefault(component, []).append(layer)
        tensors[f"{component}.{layer}.lora_A.weight"] = t["lora_down"].contiguous()
        tensors[f"{component}.{layer}.lora_B.weight"] = t["lora_up"].contiguous()
        if "dora_scale" in t:
            tensors[f"{component}.{layer}.lora_magnitude_vector"] = t["dora_scale"].contiguous()
        ranks.append(t["lora_down"].shape[0])
    rank = max(ranks, key=ranks.count)
    config_fields = {}
    for component in sorted({c for c, _ in lora}):
        config_fields[f"{component}.r"] = rank
        config_fields[f"{component}.lora_alpha"] = lora_alpha if lora_alpha is not None else rank
        suffixes = UNET_LAYERS if component == "unet" else TEXT_LAYERS  # PEFT matches module-name suffixes
        config_fields[f"{component}.target_modules"] = sorted({s for s in suffixes for layer in layers[component]
                                                               if layer.endswith("." + s)})
    config_fields.update(metadata or {})
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config_fields), "format": "pt"})


def reference_update(adapter_tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The LoRA / LoCon / LoHa / LoKr update written out plainly (the formulas of the LoRA, LoHa and LyCORIS
    papers), for checking xldm's Adapter against."""
    t = {k: v.double() for k, v in adapter_tensors.items()}
    shape = weight.shape
    if "lora_down" in t:
        r = t["lora_down"].shape[0]
        delta = t["lora_up"].reshape(shape[0], r) @ t["lora_down"].reshape(r, -1)
    elif "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        w1 = t["lokr_w1"]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        r = t["lokr_w2_b"].shape[0]
        blocks = [[w1[i, j] * w2 for j in range(w1.shape[1])] for i in range(w1.shape[0])]
        delta = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    alpha = float(t["alpha"]) if "alpha" in t else r
    return delta.reshape(shape) * (alpha / r)


def linear_and_conv():
    return nn.Linear(12, 10), nn.Conv2d(6, 8, 3, padding=1)
