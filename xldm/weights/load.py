"""Load a whole model, or some of its components, from an original single file or a diffusers folder.

Networks are built on the meta device and their tensors assigned in place as they are read, one at a
time, in the requested dtype: a model never exists twice in memory.  Loading is strict: every key of the
file must be used by a component or be a known non-inference key (`detect.is_ignorable`), and every
parameter of a component must come from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from xldm.config import ModelConfig, TextEncoderConfig
from xldm.errors import CheckpointError, UnknownModelError
from xldm.models.components import Components, text_encoder_name
from xldm.weights.detect import (
    TEXT_ENCODER_LAYOUTS,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_config,
    is_ignorable,
)
from xldm.weights.io import Checkpoint, load_strict, open_checkpoint

COMPONENTS = ("unet", "vae", "text_encoders")


def _wanted(components: Iterable[str] | None) -> set[str]:
    if components is None:
        return set(COMPONENTS)
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected a subset of {list(COMPONENTS)}")
    return wanted


# Below this size a network is built with ordinary (CPU) initialisation: building on the meta device
# costs a one-off ~1.5 s import of torch's meta kernels, which dominates a small model's start-up.
META_BUILD_MIN_BYTES = 64 * 2**20


def _build(factory, config, tensors: dict[str, torch.Tensor], component: str):
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    with torch.device("meta" if nbytes >= META_BUILD_MIN_BYTES else "cpu"):
        module = factory(config)
    load_strict(module, tensors, component=component)
    return module.eval().requires_grad_(False)


def build_unet(config: ModelConfig, tensors: dict[str, torch.Tensor]):
    from xldm.models.unet import UNet

    return _build(UNet, config.unet, tensors, "UNet")


def build_vae(config: ModelConfig, tensors: dict[str, torch.Tensor]):
    from xldm.models.vae import AutoencoderKL

    return _build(AutoencoderKL, config.vae, tensors, "VAE")


def build_text_encoder(te: TextEncoderConfig, tensors: dict[str, torch.Tensor], name: str):
    from xldm.models.clip import CLIPTextModel

    return _build(CLIPTextModel, te, tensors, name)


def hf_text_encoder_tensors(tensors: dict[str, torch.Tensor], layout: str, te: TextEncoderConfig) -> dict:
    """A text encoder's tensors in xldm's (transformers) layout, from either original layout."""
    from xldm.weights.keys_clip import hf_normalize_keys, open_clip_to_hf

    if layout == "open_clip":
        tensors = {k: v for k, v in tensors.items() if not is_ignorable("." + k)}
        return open_clip_to_hf(tensors, te)
    return hf_normalize_keys(tensors)


# --- original single file -------------------------------------------------------------------------


def load_single_file(
    path: str | os.PathLike,
    *,
    components: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    config: ModelConfig | None = None,
) -> Components:
    """Load an original-layout checkpoint (sgm / ldm single file: `model.diffusion_model.` ...)."""
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    config = config or detect_config(shapes, ckpt.metadata)
    layouts = TEXT_ENCODER_LAYOUTS[config.kind]
    prefixes = [UNET_PREFIX, VAE_PREFIX] + [p for p, _ in layouts]
    unknown = [k for k in shapes if not k.startswith(tuple(prefixes)) and not is_ignorable(k)]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} keys belong to no component of a {config.kind} checkpoint "
            f"(expected prefixes {prefixes}): {sorted(unknown)[:10]}"
        )
    ignored = tuple(sorted(k for k in shapes if is_ignorable(k)))
    wanted = _wanted(components)
    explicit = components is not None

    def present(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    def need(name: str, prefix: str) -> bool:
        if name not in wanted:
            return False
        if present(prefix):
            return True
        if explicit:
            raise CheckpointError(f"{path}: asked for the {name}, but the file has no '{prefix}*' keys")
        return False

    def tensors(prefix: str) -> dict[str, torch.Tensor]:
        keys = [k for k in shapes if k.startswith(prefix) and not is_ignorable(k)]
        return {k[len(prefix):]: ckpt.tensor(k, dtype=_float_dtype(ckpt, k, dtype), device=device) for k in keys}

    result = Components(config=config, ignored_keys=ignored)
    if need("unet", UNET_PREFIX):
        result.unet = build_unet(config, tensors(UNET_PREFIX))
    if need("vae", VAE_PREFIX):
        result.vae = build_vae(config, tensors(VAE_PREFIX))
    if "text_encoders" in wanted:
        encoders = []
        for i, ((prefix, layout), te) in enumerate(zip(layouts, config.text_encoders)):
            if not need("text_encoders", prefix):
                break
            name = text_encoder_name(config, i)
            encoders.append(build_text_encoder(te, hf_text_encoder_tensors(tensors(prefix), layout, te), name))
        result.text_encoders = tuple(encoders)
    return result


def _float_dtype(ckpt: Checkpoint, key: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """Cast floating tensors to `dtype`; integer tensors keep theirs."""
    if dtype is None or not ckpt.dtype(key).is_floating_point:
        return None
    return dtype


# --- diffusers folder -----------------------------------------------------------------------------

WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def _inside(folder: Path, path: Path) -> Path:
    """`path` resolved, refusing anything that escapes `folder` (RELIABILITY 3: `..`, absolute, symlinks)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{path} points outside the model folder {folder}; refusing to read it")
    return resolved


def _read_json(folder: Path, name: str) -> dict:
    path = _inside(folder, folder / name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def component_weights(folder: Path, sub: str, *, variant: str | None = None) -> Path:
    """The weights file of a diffusers component folder: `<name>[.variant].safetensors`, a sharded
    `<name>.safetensors.index.json`, or a pickle `.bin` (refused later unless allowed)."""
    base = WEIGHT_NAMES[sub]
    subdir = _inside(folder, folder / sub)
    names = []
    if variant:
        names += [f"{base}.{variant}.safetensors", f"{base}.safetensors.index.{variant}.json"]
    names += [f"{base}.safetensors", f"{base}.safetensors.index.json"]
    if not variant:
        names += [f"{base}.fp16.safetensors", f"{base}.safetensors.index.fp16.json"]
    names += [f"{base}.bin"]
    for name in names:
        candidate = subdir / name
        if candidate.exists():
            return _inside(folder, candidate)
    raise CheckpointError(f"{subdir}: no weights file (looked for {names})")


def _diffusers_kind(index: dict, folder: Path) -> str:
    cls = index.get("_class_name", "")
    if "XL" in cls:
        return "sdxl-refiner" if not index.get("text_encoder") or index["text_encoder"][0] is None else "sdxl-base"
    if cls.startswith("StableDiffusion"):
        te = _read_json(folder, "text_encoder/config.json")
        # SD 2.x uses OpenCLIP (exact gelu), SD 1.x OpenAI CLIP (quick_gelu)
        return "sd21" if te.get("hidden_act") == "gelu" else "sd15"
    raise UnknownModelError(f"{folder}: model_index.json names {cls!r}, not a Stable Diffusion pipeline")


def diffusers_config(folder: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a diffusers folder, from its config.json files (no tensor data read)."""
    from dataclasses import replace

    from xldm.config import PRESETS
    from xldm.weights.keys_clip import clip_config_from_hf
    from xldm.weights.keys_unet import unet_config_from_diffusers
    from xldm.weights.keys_vae import vae_config_from_diffusers

    folder = Path(folder)
    index = _read_json(folder, "model_index.json")
    kind = _diffusers_kind(index, folder)
    preset = PRESETS[kind]
    unet_json = _read_json(folder, "unet/config.json")
    unet = unet_config_from_diffusers(unet_json)
    vae = vae_config_from_diffusers(_read_json(folder, "vae/config.json"))
    encoders = []
    names = [text_encoder_name(preset, i) for i in range(len(preset.text_encoders))]
    for name, base in zip(names, preset.text_encoders):
        hf = clip_config_from_hf(_read_json(folder, f"{name}/config.json"))
        te = replace(base, **{f: getattr(hf, f) for f in (
            "width", "layers", "heads", "intermediate_size", "vocab_size", "max_positions", "activation",
            "projection_dim", "layer_norm_eps")})
        if not kind.startswith("sdxl"):
            # diffusers' StableDiffusionPipeline reads the last hidden state (+ final LN); for SD 2.x it
            # stores OpenCLIP-H without its last block, so that equals ldm's penultimate layer.
            te = replace(te, layer="last", final_norm_on_hidden=True)
        encoders.append(te)
    prediction = preset.prediction_type
    sched_path = folder / "scheduler" / "scheduler_config.json"
    if sched_path.exists():
        pred = _read_json(folder, "scheduler/scheduler_config.json").get("prediction_type", "epsilon")
        prediction = "v" if pred == "v_prediction" else "epsilon"
    micro_dim = unet_json.get("addition_time_embed_dim") or preset.micro_conditioning_dim
    return replace(preset, unet=unet, vae=vae, text_encoders=tuple(encoders), prediction_type=prediction,
                   micro_conditioning_dim=micro_dim)


def load_diffusers(
    folder: str | os.PathLike,
    *,
    components: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
) -> Components:
    """Load a diffusers-format folder (model_index.json, unet/, vae/, text_encoder*/)."""
    from xldm.weights.keys_clip import hf_normalize_keys
    from xldm.weights.keys_unet import unet_diffusers_to_original
    from xldm.weights.keys_vae import vae_diffusers_to_original

    folder = Path(folder)
    config = diffusers_config(folder)
    wanted = _wanted(components)
    result = Components(config=config)

    def read(sub: str) -> dict[str, torch.Tensor]:
        ckpt = open_checkpoint(component_weights(folder, sub, variant=variant), allow_pickle=allow_pickle)
        return {k: ckpt.tensor(k, dtype=_float_dtype(ckpt, k, dtype), device=device)
                for k in ckpt.keys() if not is_ignorable("." + k)}

    if "unet" in wanted:
        result.unet = build_unet(config, unet_diffusers_to_original(read("unet"), config.unet))
    if "vae" in wanted:
        result.vae = build_vae(config, vae_diffusers_to_original(read("vae"), config.vae))
    if "text_encoders" in wanted:
        encoders = []
        for i, te in enumerate(config.text_encoders):
            name = text_encoder_name(config, i)
            encoders.append(build_text_encoder(te, hf_normalize_keys(read(name)), name))
        result.text_encoders = tuple(encoders)
    return result


def load_model(
    path: str | os.PathLike,
    *,
    components: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Load a single-file checkpoint or a diffusers folder, whichever `path` is.

    `components`: any of "unet", "vae", "text_encoders" (default: all the source has).
    `dtype`: cast floating weights as they are read (default: keep the file's dtype).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path} is a folder without model_index.json; not a diffusers model folder")
        return load_diffusers(path, components=components, dtype=dtype, device=device, allow_pickle=allow_pickle)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return load_single_file(path, components=components, dtype=dtype, device=device, allow_pickle=allow_pickle)


def load_vae(
    path: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
):
    """Load a VAE on its own: a bare VAE file (`encoder.*`, `decoder.*`, as `sdxl_vae.safetensors`),
    a full single file (its `first_stage_model.*`), or a diffusers `vae/` folder (config.json).

    `scaling_factor` overrides the latent scale (SDXL 0.13025, SD 1.x/2.x 0.18215); by default it comes
    from the diffusers config or the detected model family (bare files: SDXL's).
    """
    from dataclasses import replace as _replace

    from xldm.config import SDXL_VAE
    from xldm.weights.detect import detect_vae
    from xldm.weights.keys_vae import vae_config_from_diffusers, vae_diffusers_to_original

    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").exists():
            return load_diffusers(path, components=["vae"], dtype=dtype, device=device,
                                  allow_pickle=allow_pickle).vae
        vae_cfg = vae_config_from_diffusers(_read_json(path, "config.json"))
        weights = None
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin"):
            if (path / name).exists():
                weights = _inside(path, path / name)
                break
        if weights is None:
            raise CheckpointError(f"{path}: no diffusion_pytorch_model weights in this VAE folder")
        ckpt = open_checkpoint(weights, allow_pickle=allow_pickle)
        tensors = vae_diffusers_to_original(
            {k: ckpt.tensor(k, dtype=_float_dtype(ckpt, k, dtype), device=device) for k in ckpt.keys()}, vae_cfg)
    else:
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
        keys = list(ckpt.keys())
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
        if prefix:
            scale = detect_config({k: ckpt.shape(k) for k in keys}, ckpt.metadata).vae.scaling_factor
        else:
            scale = SDXL_VAE.scaling_factor
        shapes = {k[len(prefix):]: ckpt.shape(k) for k in keys if k.startswith(prefix)}
        vae_cfg = detect_vae(shapes, scale)
        tensors = {k[len(prefix):]: ckpt.tensor(k, dtype=_float_dtype(ckpt, k, dtype), device=device)
                   for k in keys if k.startswith(prefix) and not is_ignorable(k)}
    if scaling_factor is not None:
        vae_cfg = _replace(vae_cfg, scaling_factor=scaling_factor)
    from xldm.models.vae import AutoencoderKL

    return _build(AutoencoderKL, vae_cfg, tensors, "VAE")


__all__ = ["load_vae", "load_model", "load_single_file", "load_diffusers", "diffusers_config", "COMPONENTS"]
