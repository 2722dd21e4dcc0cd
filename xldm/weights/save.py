"""Save a model as an original-layout single file or as a diffusers folder; convert between them."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from xldm.config import ModelConfig
from xldm.errors import CheckpointError
from xldm.models.components import Components, text_encoder_name
from xldm.weights.detect import (MARKER_V_PREDICTION, MARKER_ZERO_TERMINAL_SNR, METADATA_KEY, TEXT_ENCODER_LAYOUTS,
                                 UNET_PREFIX, VAE_PREFIX, model_config_to_dict)
from xldm.weights.io import save_file


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def single_file_state_dict(model: Components) -> dict[str, torch.Tensor]:
    """All present components in the original (sgm / ldm) single-file key layout."""
    from xldm.weights.keys_clip import hf_to_open_clip

    out: dict[str, torch.Tensor] = {}
    if model.unet is not None:
        out.update({UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()})
    if model.vae is not None:
        out.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    layouts = TEXT_ENCODER_LAYOUTS[model.config.kind]
    for (prefix, layout), te, te_cfg in zip(layouts, model.text_encoders, model.config.text_encoders):
        sd = te.state_dict()
        if layout == "open_clip":
            sd = hf_to_open_clip(sd, te_cfg)
        out.update({prefix + k: v for k, v in sd.items()})
    if model.config.kind.startswith("sdxl"):  # the marker keys other tools read (detect.MARKER_*)
        if model.config.prediction_type == "v":
            out[MARKER_V_PREDICTION] = torch.empty(0)
        if model.config.zero_terminal_snr:
            out[MARKER_ZERO_TERMINAL_SNR] = torch.empty(0)
    return out


def save_single_file(model: Components, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write an original-layout `.safetensors` that xldm, diffusers `from_single_file`, ComfyUI and A1111 read; the
    exact config goes into the header metadata (`xldm.config`), so tiny models round-trip exactly."""
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps(model_config_to_dict(model.config)), "format": "pt"}
    save_file(_cast(single_file_state_dict(model), dtype), path, metadata=metadata)
    return path


# SDXL / SD scheduler as the hub folders configure it (sdxl-base scheduler/scheduler_config.json: leading
# spacing, offset 1; clip_sample=false and set_alpha_to_one=false are for DDIM, which picks them up via from_config).
def scheduler_config(config: ModelConfig) -> dict:
    return {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type": "linear",
        "prediction_type": "v_prediction" if config.prediction_type == "v" else "epsilon",
        "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": False, "clip_sample": False,
        "set_alpha_to_one": False, "sample_max_value": 1.0, "skip_prk_steps": True, "trained_betas": None,
        **({"rescale_betas_zero_snr": True} if config.zero_terminal_snr else {}),
    }


_PIPELINES = {"sdxl-base": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}


def model_index(model: Components) -> dict:
    config = model.config
    index: dict = {"_class_name": _PIPELINES.get(config.kind, "StableDiffusionPipeline"),
                   "_diffusers_version": "0.42.1"}
    if model.unet is not None:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if model.vae is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    for i, te in enumerate(config.text_encoders):
        name = text_encoder_name(config, i)
        cls = "CLIPTextModelWithProjection" if te.projection_dim and config.kind.startswith("sdxl") else "CLIPTextModel"
        if i < len(model.text_encoders):
            index[name] = ["transformers", cls]
            index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if not config.kind.startswith("sdxl"):
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    if config.kind == "sdxl-refiner":
        # the hub refiner (stable-diffusion-xl-refiner-1.0 model_index.json): bigG only, aesthetic score on,
        # "" encoded for the negative
        index.update(text_encoder=[None, None], tokenizer=[None, None],
                     requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif config.kind == "sdxl-base":
        index["force_zeros_for_empty_prompt"] = True
    return index


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_diffusers(model: Components, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers-format folder that `DiffusionPipeline.from_pretrained(folder)` loads offline."""
    from xldm.tokenizer import CLIPTokenizer
    from xldm.weights.keys_clip import clip_hf_config
    from xldm.weights.keys_unet import unet_diffusers_config, unet_original_to_diffusers
    from xldm.weights.keys_vae import vae_diffusers_config, vae_original_to_diffusers

    config = model.config
    pruned = [text_encoder_name(config, i) for i, te in enumerate(config.text_encoders) if te.kept_tokens]
    if pruned:
        # transformers' CLIPTextModel indexes its table with the CLIP ids directly and has no id -> row map
        raise CheckpointError(f"{', '.join(pruned)}: a pruned vocabulary (kept_tokens) has no diffusers form; save "
                              f"the model as a single file, whose header carries the kept ids")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.unet is not None:
        unet_cfg = unet_diffusers_config(config.unet, addition_time_embed_dim=config.micro_conditioning_dim)
        _write_json(folder / "unet" / "config.json", unet_cfg)
        sd = unet_original_to_diffusers(model.unet.state_dict(), config.unet)
        save_file(_cast(sd, dtype), folder / "unet" / "diffusion_pytorch_model.safetensors")
    if model.vae is not None:
        _write_json(folder / "vae" / "config.json", vae_diffusers_config(config.vae))
        sd = vae_original_to_diffusers(model.vae.state_dict(), config.vae)
        save_file(_cast(sd, dtype), folder / "vae" / "diffusion_pytorch_model.safetensors")
    for i, (te, te_cfg) in enumerate(zip(model.text_encoders, config.text_encoders)):
        name = text_encoder_name(config, i)
        state = te.state_dict()
        if te_cfg.layer == "penultimate" and te_cfg.final_norm_on_hidden:
            # SD 2.x: diffusers keeps OpenCLIP-H without its last block and reads the last hidden state
            # (+ final LN), which is ldm's penultimate layer; the dropped block is never used.
            last = te_cfg.layers - 1
            state = {k: v for k, v in state.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
            te_cfg = replace(te_cfg, layers=last, layer="last")
        _write_json(folder / name / "config.json", clip_hf_config(te_cfg))
        save_file(_cast(state, dtype), folder / name / "model.safetensors", metadata={"format": "pt"})
        CLIPTokenizer.for_encoder(te_cfg).save_pretrained(folder / name.replace("text_encoder", "tokenizer"))
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(config))
    _write_json(folder / "model_index.json", model_index(model))
    return folder


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, dtype: torch.dtype | None = None,
            allow_pickle: bool = False) -> Path:
    """Convert a checkpoint (single file, diffusers folder, or with allow_pickle a pickle) to `to`."""
    from xldm.weights.load import load_model

    if to not in ("single-file", "diffusers"):
        raise ValueError(f"--to must be 'single-file' or 'diffusers', got {to!r}")
    model = load_model(src, allow_pickle=allow_pickle)
    return (save_single_file if to == "single-file" else save_diffusers)(model, dst, dtype=dtype)
