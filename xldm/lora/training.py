"""A new LoRA to train: kohya's layer choice and initialisation, attached to a model, exported as a kohya file.

Layers (kohya sd-scripts `networks/lora.py` for SDXL): every Linear of the UNet's transformers (attention, feed-forward,
proj_in/out); with `conv`, also the convolutions of its resblocks, down/upsamplers and conv_in/out (LoCon, kohya's
`conv_dim`); with `text_encoders`, the attention and MLP layers of the text encoders.  `lora_down` is Kaiming-uniform
(a = sqrt 5, nn.Linear's default) and `lora_up` zero, so a new LoRA changes nothing (Hu et al. 2022, Sec. 4.1)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from xldm.lora.files import kohya_name, layer_names, write_kohya
from xldm.lora.network import Adapter, set_adapter
from xldm.models.components import Components

TRAINING_KEY = "training"
_TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")


def _chosen(component: str, path: str, shape: tuple[int, ...], text_encoders: bool, conv: bool) -> bool:
    if component != "unet":
        return text_encoders and path.endswith(_TEXT_LAYERS)
    if len(shape) == 4:
        return conv
    return ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out"))


class LoraNetwork(nn.Module):
    """The trained adapters by kohya name (`adapters`), and the (component, layer) each one adapts (`targets`)."""

    def __init__(self, model: Components, rank: int, alpha: float, *, text_encoders: bool = False,
                 conv: bool = False) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.targets: dict[str, tuple[str, str]] = {}
        adapters = {}
        seen = set()
        for component, path, shape in layer_names(model.config).values():
            if (component, path) in seen or not _chosen(component, path, shape, text_encoders, conv):
                continue
            seen.add((component, path))
            down = torch.empty(rank, *shape[1:]) if len(shape) == 4 else torch.empty(rank, shape[1])
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            up = torch.zeros(shape[0], rank, 1, 1) if len(shape) == 4 else torch.zeros(shape[0], rank)
            name = kohya_name(model.config, component, path)
            adapters[name] = Adapter({"lora_down": down, "lora_up": up}, trainable=True)
            adapters[name].alpha = float(alpha)
            self.targets[name] = (component, path)
        self.adapters = nn.ModuleDict(adapters)

    def attach(self, model: Components) -> None:
        """Hook every adapter onto its layer of `model` (weight 1, unfused)."""
        modules = model.modules()
        for name, (component, path) in self.targets.items():
            set_adapter(modules[component].get_submodule(path), TRAINING_KEY, self.adapters[name])

    def save(self, path: str | os.PathLike, config, metadata: dict[str, str]) -> Path:
        adapters = {self.targets[name]: adapter for name, adapter in self.adapters.items()}
        return write_kohya(path, config, adapters, metadata)
