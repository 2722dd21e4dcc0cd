"""A loaded model: its config and whichever networks were asked for."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xldm.config import ModelConfig


@dataclass
class Components:
    """The networks of one latent diffusion model (absent ones None / empty); `text_encoders` follow
    `config.text_encoders` in order (SDXL base: CLIP ViT-L, then OpenCLIP bigG)."""

    config: ModelConfig
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    text_encoders: tuple[nn.Module, ...] = ()
    # Keys of the source file that belong to no inference component (EMA copies, schedule buffers ...).
    ignored_keys: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        return self.config.kind

    def modules(self) -> dict[str, nn.Module]:
        """Present networks by name: unet, vae, text_encoder, text_encoder_2 (diffusers' names)."""
        named = {name: m for name, m in (("unet", self.unet), ("vae", self.vae)) if m is not None}
        return named | {text_encoder_name(self.config, i): te for i, te in enumerate(self.text_encoders)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Components":
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def tokenizers(self) -> tuple:
        """One tokenizer per `config.text_encoders`, knowing the embeddings attached to its encoder
        (xldm.embeddings.add_embeddings)."""
        from xldm.tokenizer import CLIPTokenizer

        encoders = self.text_encoders or (None,) * len(self.config.text_encoders)
        layers = [getattr(getattr(te, "text_model", None), "embeddings", None) for te in encoders]
        return tuple(CLIPTokenizer.for_encoder(cfg, getattr(layer, "placeholder_ids", dict)())
                     for cfg, layer in zip(self.config.text_encoders, layers))


def prune_text_encoders(model: Components, kept_tokens) -> Components:
    """`model` with every text encoder's vocabulary pruned to `kept_tokens` (xldm.models.clip.prune_vocabulary)
    and the config saying so; the UNet and VAE are the same objects."""
    from dataclasses import replace

    from xldm.models.clip import prune_vocabulary

    if len(model.text_encoders) != len(model.config.text_encoders):
        raise ValueError(f"pruning needs the model's {len(model.config.text_encoders)} text encoders, "
                         f"{len(model.text_encoders)} are loaded")
    encoders = tuple(prune_vocabulary(te, kept_tokens) for te in model.text_encoders)
    config = replace(model.config, text_encoders=tuple(te.cfg for te in encoders))
    return Components(config=config, unet=model.unet, vae=model.vae, text_encoders=encoders,
                      ignored_keys=model.ignored_keys)


def text_encoder_name(config: ModelConfig, index: int) -> str:
    """diffusers' folder name of text encoder `index`: the SDXL refiner's only encoder is text_encoder_2."""
    if config.kind == "sdxl-refiner":
        return "text_encoder_2"
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
