"""What a checkpoint holds, from headers only: kind, components, parameter counts, dtypes."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xldm.config import PRESETS, ModelConfig
from xldm.models.components import text_encoder_name
from xldm.weights.detect import TEXT_ENCODER_LAYOUTS, UNET_PREFIX, VAE_PREFIX, detect_config, is_ignorable
from xldm.weights.io import open_checkpoint


@dataclass
class ComponentInfo:
    name: str
    parameters: int
    tensors: int
    dtypes: dict[str, int]  # dtype name -> number of tensors
    layout: str = ""


@dataclass
class ModelInfo:
    source: str
    format: str  # "single-file", "diffusers" or "preset"
    config: ModelConfig
    components: list[ComponentInfo] = field(default_factory=list)
    ignored_keys: int = 0

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)

    def lines(self) -> list[str]:
        cfg = self.config
        out = [
            f"source      {self.source}", f"format      {self.format}", f"kind        {cfg.kind}",
            f"prediction  {cfg.prediction_type}" + (", zero-terminal-SNR schedule" if cfg.zero_terminal_snr else ""),
            f"unet        widths {list(cfg.unet.block_out_channels)}, "
            f"transformer depth {list(cfg.unet.transformer_depth)} / mid {cfg.unet.transformer_depth_middle}, "
            f"context {cfg.unet.context_dim}, vector {cfg.unet.adm_in_channels}",
            f"vae         {cfg.vae.ch} channels x {list(cfg.vae.ch_mult)}, latent {cfg.vae.z_channels} channels, "
            f"scale {cfg.vae.scaling_factor}",
        ]
        for i, te in enumerate(cfg.text_encoders):
            out.append(f"{text_encoder_name(cfg, i):<12}width {te.width}, {te.layers} layers, {te.heads} heads, "
                       f"{te.activation}, {te.layer} layer, projection {te.projection_dim or 'none'}")
        if cfg.micro_conditioning:
            out.append(f"conditioning {', '.join(cfg.micro_conditioning)} (Fourier {cfg.micro_conditioning_dim}-d each)")
        out += ["", f"{'component':<16}{'parameters':>16}{'tensors':>9}  dtypes"]
        for c in self.components:
            dtypes = ", ".join(f"{d} x{n}" for d, n in sorted(c.dtypes.items()))
            out.append(f"{c.name:<16}{c.parameters:>16,}{c.tensors:>9}  {dtypes}")
        out.append(f"{'total':<16}{self.parameters:>16,}")
        if self.ignored_keys:
            out.append(f"({self.ignored_keys} non-inference keys ignored: EMA copies, schedule buffers, ...)")
        return out


def _summarize(name: str, entries: list[tuple[tuple[int, ...], torch.dtype]], layout: str = "") -> ComponentInfo:
    return ComponentInfo(name=name, parameters=sum(math.prod(shape) for shape, _ in entries), tensors=len(entries),
                         dtypes=dict(Counter(str(d).removeprefix("torch.") for _, d in entries)), layout=layout)


def single_file_info(path: str | os.PathLike, *, allow_pickle: bool = False) -> ModelInfo:
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    config = detect_config(shapes, ckpt.metadata)
    info = ModelInfo(source=str(path), format="single-file", config=config)
    groups = [("unet", UNET_PREFIX, ""), ("vae", VAE_PREFIX, "")]
    groups += [(text_encoder_name(config, i), prefix, layout)
               for i, (prefix, layout) in enumerate(TEXT_ENCODER_LAYOUTS[config.kind])]
    for name, prefix, layout in groups:
        entries = [(shapes[k], ckpt.dtype(k)) for k in shapes if k.startswith(prefix) and not is_ignorable(k)]
        if entries:
            info.components.append(_summarize(name, entries, layout))
    info.ignored_keys = sum(1 for k in shapes if is_ignorable(k))
    return info


def diffusers_info(folder: str | os.PathLike, *, allow_pickle: bool = False) -> ModelInfo:
    from xldm.weights.load import component_weights, diffusers_config

    folder = Path(folder)
    config = diffusers_config(folder)
    info = ModelInfo(source=str(folder), format="diffusers", config=config)
    names = ["unet", "vae"] + [text_encoder_name(config, i) for i in range(len(config.text_encoders))]
    for name in [n for n in names if (folder / n).is_dir()]:
        ckpt = open_checkpoint(component_weights(folder, name), allow_pickle=allow_pickle)
        entries = [(ckpt.shape(k), ckpt.dtype(k)) for k in ckpt.keys() if not is_ignorable("." + k)]
        info.components.append(_summarize(name, entries))
    return info


def preset_info(name: str) -> ModelInfo:
    """A preset's structure, built on the meta device (no memory, no weights)."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet
    from xldm.models.vae import AutoencoderKL

    config = PRESETS[name]
    info = ModelInfo(source=f"preset {name}", format="preset", config=config)
    with torch.device("meta"):
        modules = [("unet", UNet(config.unet)), ("vae", AutoencoderKL(config.vae))]
        modules += [(text_encoder_name(config, i), CLIPTextModel(te)) for i, te in enumerate(config.text_encoders)]
    for comp, module in modules:
        info.components.append(_summarize(comp, [(tuple(t.shape), t.dtype) for t in module.state_dict().values()]))
    return info


def model_info(path: str | os.PathLike, *, allow_pickle: bool = False) -> ModelInfo:
    """Describe a single file, a diffusers folder, or (given a preset name) a preset."""
    p = Path(path)
    if str(path) in PRESETS and not p.exists():
        return preset_info(str(path))
    if p.is_dir():
        return diffusers_info(p, allow_pickle=allow_pickle)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint or preset: {path} (presets: {', '.join(PRESETS)})")
    return single_file_info(p, allow_pickle=allow_pickle)
