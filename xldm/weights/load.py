"""Load a whole model, or some of its components, from an original single file or a diffusers folder.

Loading is strict: every key of the file must be used by a component or be a known non-inference key
(`detect.is_ignorable`), and every parameter of a component must come from the file.  A component's config
(detected, or claimed by a config.json or the header metadata) is checked against the header's shapes before
any tensor is read or parameter allocated, so a config claiming a bigger network than the file holds is refused.
Tensors are then assigned in place as they are read, in the requested dtype: a model never exists twice in memory."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from xldm.config import ModelConfig, TextEncoderConfig, UNetConfig
from xldm.errors import CheckpointError, UnknownModelError
from xldm.models.components import Components, text_encoder_name
from xldm.weights.detect import (TEXT_ENCODER_LAYOUTS, UNET_PREFIX, VAE_PREFIX, detect_config, detect_text_encoder,
                                 detect_vae, is_ignorable)
from xldm.weights.io import Checkpoint, load_strict, open_checkpoint

COMPONENTS = ("unet", "vae", "text_encoders")
Header = dict[str, torch.Tensor]  # a file's tensors as meta tensors of the header's shapes
Reader = Callable[[], dict[str, torch.Tensor]]
Convert = Callable[[dict], dict]  # a key map from the file's layout to the module's


def _wanted(components: Iterable[str] | None) -> set[str]:
    if components is None:
        return set(COMPONENTS)
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected a subset of {list(COMPONENTS)}")
    return wanted


def _build(factory, config, header: Header, read: Reader, component: str, convert: Convert | None = None,
           meta: bool = True):
    """`factory(config)` filled from `convert(read())`.  Built on the meta device, its shapes are first compared
    with `convert(header)` (the file's keys as meta tensors), so a config that disagrees with the file is
    refused before `read` allocates anything."""
    convert = convert or (lambda sd: sd)
    with torch.device("meta" if meta else "cpu"):
        module = factory(config)
    if meta:
        load_strict(module, convert(header), component=component)
    load_strict(module, convert(read()), component=component)
    return module.eval().requires_grad_(False)


def build_unet(cfg: UNetConfig, header: Header, read: Reader, convert: Convert | None = None):
    from xldm.models.unet import UNet

    # Every ResBlock holds 10 tensors and every transformer block 20 (models/layers.py): a config with more
    # blocks than that is refused before its (possibly huge) meta network is built.
    per_level = 2 * cfg.num_res_blocks + 1
    blocks = 10 * (cfg.num_levels * per_level + 2)
    blocks += 20 * (per_level * sum(cfg.transformer_depth) + cfg.transformer_depth_middle)
    if blocks > len(header):
        raise CheckpointError(f"UNet: the config describes a network of at least {blocks} tensors, the file has "
                              f"{len(header)}")
    return _build(UNet, cfg, header, read, "UNet", convert)


def build_vae(cfg, header: Header, read: Reader, convert: Convert | None = None):
    from xldm.models.vae import AutoencoderKL

    return _build(AutoencoderKL, cfg, header, read, "VAE", convert)


# Below this many parameters a text encoder is built with ordinary (CPU) initialisation: building one on the meta
# device costs a one-off ~1.2 s (nn.Embedding's normal_ init has no fast meta kernel).  Its size was checked first.
META_BUILD_MIN_PARAMS = 16 * 2**20
_TEXT_ENCODER_SHAPE_FIELDS = ("width", "layers", "intermediate_size", "vocab_size", "max_positions", "projection_dim")


def build_text_encoder(te: TextEncoderConfig, header: Header, read: Reader, name: str, layout: str):
    """A text encoder from `read()` in `layout` ("hf" or "open_clip"), its config checked against `header`."""
    from xldm.models.clip import CLIPTextModel
    from xldm.weights.keys_clip import hf_normalize_keys, open_clip_to_hf

    # (detected without the kept ids: a table of another length is then a vocab_size mismatch, reported below)
    found = detect_text_encoder({k: tuple(v.shape) for k, v in header.items()}, layout, replace(te, kept_tokens=()))
    wrong = {f: (getattr(te, f), getattr(found, f)) for f in _TEXT_ENCODER_SHAPE_FIELDS
             if getattr(te, f) != getattr(found, f)}
    if wrong:
        raise CheckpointError(f"{name}: the config does not match the weights' shapes (config, weights): {wrong}")
    meta = sum(v.numel() for v in header.values()) >= META_BUILD_MIN_PARAMS
    convert = (lambda sd: open_clip_to_hf(sd, te)) if layout == "open_clip" else hf_normalize_keys
    return _build(CLIPTextModel, te, header, read, name, convert, meta=meta)


def _float_dtype(ckpt: Checkpoint, key: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """Cast floating tensors to `dtype`; integer tensors keep theirs."""
    return dtype if dtype is not None and ckpt.dtype(key).is_floating_point else None


def _part(ckpt: Checkpoint, prefix: str, dtype, device, ignorable=is_ignorable) -> tuple[Header, Reader]:
    """`ckpt`'s keys under `prefix` (prefix stripped, ignorable keys dropped) as meta tensors of the header's
    shapes, and a reader of their tensors."""
    keys = [k for k in ckpt.keys() if k.startswith(prefix) and not ignorable(k)]

    def read() -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: ckpt.tensor(k, dtype=_float_dtype(ckpt, k, dtype), device=device) for k in keys}

    return {k[len(prefix):]: torch.empty(ckpt.shape(k), device="meta") for k in keys}, read


def _file_config(path, ckpt: Checkpoint) -> ModelConfig:
    """The config of a single file (its `xldm.config` metadata, or detected from shapes), named by `path` when
    it cannot be used."""
    try:
        config = detect_config({k: ckpt.shape(k) for k in ckpt.keys()}, ckpt.metadata)
    except UnknownModelError:
        raise
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.kind not in TEXT_ENCODER_LAYOUTS:
        raise CheckpointError(f"{path}: the header's metadata names model kind {config.kind!r:.60}; expected one "
                              f"of {sorted(TEXT_ENCODER_LAYOUTS)}")
    if len(config.text_encoders) != len(TEXT_ENCODER_LAYOUTS[config.kind]):
        raise CheckpointError(f"{path}: a {config.kind} model has {len(TEXT_ENCODER_LAYOUTS[config.kind])} text "
                              f"encoder(s), the header's metadata describes {len(config.text_encoders)}")
    return config


def load_single_file(path: str | os.PathLike, *, components: Iterable[str] | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     allow_pickle: bool = False, config: ModelConfig | None = None, mapped: bool = False) -> Components:
    """Load an original-layout checkpoint (sgm / ldm single file: `model.diffusion_model.` ...)."""
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle, mapped=mapped)
    keys = list(ckpt.keys())
    config = config or _file_config(path, ckpt)
    layouts = TEXT_ENCODER_LAYOUTS[config.kind]
    prefixes = [UNET_PREFIX, VAE_PREFIX] + [p for p, _ in layouts]
    unknown = [k for k in keys if not k.startswith(tuple(prefixes)) and not is_ignorable(k)]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} keys belong to no component of a {config.kind} checkpoint "
                              f"(expected prefixes {prefixes}): {sorted(unknown)[:10]}")
    wanted = _wanted(components)

    def need(name: str, prefix: str) -> bool:
        if name not in wanted:
            return False
        if any(k.startswith(prefix) for k in keys):
            return True
        if components is not None:
            raise CheckpointError(f"{path}: asked for the {name}, but the file has no '{prefix}*' keys")
        return False

    result = Components(config=config, ignored_keys=tuple(sorted(k for k in keys if is_ignorable(k))))
    if need("unet", UNET_PREFIX):
        result.unet = build_unet(config.unet, *_part(ckpt, UNET_PREFIX, dtype, device))
    if need("vae", VAE_PREFIX):
        result.vae = build_vae(config.vae, *_part(ckpt, VAE_PREFIX, dtype, device))
    if "text_encoders" in wanted:
        encoders = []
        for i, ((prefix, layout), te) in enumerate(zip(layouts, config.text_encoders)):
            if not need("text_encoders", prefix):
                break
            encoders.append(build_text_encoder(te, *_part(ckpt, prefix, dtype, device), text_encoder_name(config, i),
                                               layout))
        result.text_encoders = tuple(encoders)
    return result


WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def _inside(folder: Path, path: Path) -> Path:
    """`path` resolved, refusing anything that escapes `folder` (`..`, absolute paths, symlinks)."""
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


def component_weights(folder: Path, sub: str, *, variant: str | None = None, base: str | None = None) -> Path:
    """The weights file of a diffusers component folder `folder/sub`: `<base>[.variant].safetensors`, a sharded
    `<base>.safetensors.index.json`, or a pickle `.bin` (refused later unless allowed)."""
    base = base or WEIGHT_NAMES[sub]
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
    from xldm.config import PRESETS
    from xldm.weights.keys_clip import clip_config_from_hf
    from xldm.weights.keys_unet import unet_config_from_diffusers
    from xldm.weights.keys_vae import vae_config_from_diffusers

    folder = Path(folder)
    kind = _diffusers_kind(_read_json(folder, "model_index.json"), folder)
    preset = PRESETS[kind]
    unet_json = _read_json(folder, "unet/config.json")
    encoders = []
    for i, base in enumerate(preset.text_encoders):
        hf = clip_config_from_hf(_read_json(folder, f"{text_encoder_name(preset, i)}/config.json"))
        te = replace(base, **{f: getattr(hf, f) for f in (
            "width", "layers", "heads", "intermediate_size", "vocab_size", "max_positions", "activation",
            "projection_dim", "layer_norm_eps")})
        if not kind.startswith("sdxl"):
            # diffusers' StableDiffusionPipeline reads the last hidden state (+ final LN); for SD 2.x it
            # stores OpenCLIP-H without its last block, so that equals ldm's penultimate layer.
            te = replace(te, layer="last", final_norm_on_hidden=True)
        encoders.append(te)
    prediction, ztsnr = preset.prediction_type, False
    if (folder / "scheduler" / "scheduler_config.json").exists():
        scheduler = _read_json(folder, "scheduler/scheduler_config.json")
        prediction = "v" if scheduler.get("prediction_type", "epsilon") == "v_prediction" else "epsilon"
        ztsnr = scheduler.get("rescale_betas_zero_snr") is True
    return replace(preset, unet=unet_config_from_diffusers(unet_json),
                   vae=vae_config_from_diffusers(_read_json(folder, "vae/config.json")),
                   text_encoders=tuple(encoders), prediction_type=prediction, zero_terminal_snr=ztsnr,
                   micro_conditioning_dim=unet_json.get("addition_time_embed_dim") or preset.micro_conditioning_dim)


def load_diffusers(folder: str | os.PathLike, *, components: Iterable[str] | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   allow_pickle: bool = False, variant: str | None = None, mapped: bool = False) -> Components:
    """Load a diffusers-format folder (model_index.json, unet/, vae/, text_encoder*/)."""
    from xldm.weights.keys_unet import unet_diffusers_to_original
    from xldm.weights.keys_vae import vae_diffusers_to_original

    folder = Path(folder)
    config = diffusers_config(folder)
    wanted = _wanted(components)
    result = Components(config=config)

    def part(sub: str) -> tuple[Header, Reader]:
        ckpt = open_checkpoint(component_weights(folder, sub, variant=variant), allow_pickle=allow_pickle,
                               mapped=mapped)
        return _part(ckpt, "", dtype, device, lambda k: is_ignorable("." + k))

    if "unet" in wanted:
        result.unet = build_unet(config.unet, *part("unet"), lambda sd: unet_diffusers_to_original(sd, config.unet))
    if "vae" in wanted:
        result.vae = build_vae(config.vae, *part("vae"), lambda sd: vae_diffusers_to_original(sd, config.vae))
    if "text_encoders" in wanted:
        names = [text_encoder_name(config, i) for i in range(len(config.text_encoders))]
        result.text_encoders = tuple(build_text_encoder(te, *part(name), name, "hf")
                                     for name, te in zip(names, config.text_encoders))
    return result


def load_model(path: str | os.PathLike, *, components: Iterable[str] | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, allow_pickle: bool = False,
               mapped: bool = False) -> Components:
    """Load a single-file checkpoint or a diffusers folder, whichever `path` is.  `components`: any of "unet", "vae",
    "text_encoders" (default: all the source has).  `dtype`: cast floating weights as they are read (default: keep
    the file's dtype).  `mapped`: safetensors files memory-mapped, tensors of the file's dtype left as views of
    the mapping (`xldm.weights.io`)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise CheckpointError(f"{path} is a folder without model_index.json; not a diffusers model folder")
        return load_diffusers(path, components=components, dtype=dtype, device=device, allow_pickle=allow_pickle,
                              mapped=mapped)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return load_single_file(path, components=components, dtype=dtype, device=device, allow_pickle=allow_pickle,
                            mapped=mapped)


def load_vae(path: str | os.PathLike, *, scaling_factor: float | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, allow_pickle: bool = False, mapped: bool = False):
    """Load a VAE on its own: a bare VAE file (`encoder.*`, `decoder.*`, as `sdxl_vae.safetensors`), a full single
    file (its `first_stage_model.*`), or a diffusers `vae/` folder (config.json).  `scaling_factor` overrides the
    latent scale (SDXL 0.13025, SD 1.x/2.x 0.18215); by default it comes from the diffusers config or the detected
    model family (bare files: SDXL's)."""
    from xldm.config import SDXL_VAE
    from xldm.weights.keys_vae import vae_config_from_diffusers, vae_diffusers_to_original

    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").exists():
            return load_diffusers(path, components=["vae"], dtype=dtype, device=device, allow_pickle=allow_pickle,
                                  mapped=mapped).vae
        vae_cfg = vae_config_from_diffusers(_read_json(path, "config.json"))
        weights = component_weights(path, ".", base=WEIGHT_NAMES["vae"])
        header, read = _part(open_checkpoint(weights, allow_pickle=allow_pickle, mapped=mapped), "", dtype, device,
                             lambda k: False)
        convert = lambda sd: vae_diffusers_to_original(sd, vae_cfg)  # noqa: E731
    else:
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle, mapped=mapped)
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in ckpt.keys()) else ""
        scale = SDXL_VAE.scaling_factor  # bare VAE files: SDXL's
        if prefix:
            vae = _file_config(path, ckpt).vae
            scale = vae.scaling_factor if vae is not None else scale
        (header, read), convert = _part(ckpt, prefix, dtype, device), None
        vae_cfg = detect_vae({k: tuple(v.shape) for k, v in header.items()}, scale)
    if scaling_factor is not None:
        vae_cfg = replace(vae_cfg, scaling_factor=scaling_factor)
    return build_vae(vae_cfg, header, read, convert)


def load_controlnet(path: str | os.PathLike, model: ModelConfig | None = None, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, allow_pickle: bool = False):
    """Load a ControlNet strictly: a diffusers folder (config.json + diffusion_pytorch_model.safetensors), a single
    diffusers-layout file, or an original-layout file (cldm names, optionally under `control_model.`).  With
    `model` (the base it will steer) it is checked to fit before any tensor is read (`check_controlnet_fits`:
    an SD 1.5 ControlNet on an SDXL base is refused), and a single file takes the base's head layout."""
    from xldm.errors import ControlNetError
    from xldm.models.controlnet import ControlNet, check_controlnet_fits
    from xldm.weights.detect import detect_controlnet
    from xldm.weights.keys_controlnet import controlnet_config_from_diffusers, controlnet_diffusers_to_original

    path = Path(path)
    if path.is_dir():
        settings = _read_json(path, "config.json")
        if settings.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise UnknownModelError(f"{path}/config.json names {settings.get('_class_name')!r}, not a ControlNetModel")
        try:
            config = controlnet_config_from_diffusers(settings)
        except ValueError as e:
            raise CheckpointError(f"{path}/config.json: {e}") from None
        ckpt = open_checkpoint(component_weights(path, ".", base="diffusion_pytorch_model"), allow_pickle=allow_pickle)
        layout, prefix = "diffusers", ""
    elif not path.exists():
        raise FileNotFoundError(f"no such ControlNet file: {path}")
    else:
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
        try:
            config, layout, prefix = detect_controlnet({k: ckpt.shape(k) for k in ckpt.keys()},
                                                       model.unet if model is not None else None)
        except UnknownModelError as e:
            raise UnknownModelError(f"{path.name}: {e}") from None
    if model is not None:
        check_controlnet_fits(config, model, path.name)
    header, read = _part(ckpt, prefix, dtype, device)
    convert = (lambda sd: controlnet_diffusers_to_original(sd, config)) if layout == "diffusers" else None
    try:
        return _build(ControlNet, config, header, read, "ControlNet", convert)
    except ValueError as e:  # keys outside the detected network
        if isinstance(e, CheckpointError):
            raise
        raise ControlNetError(f"{path.name}: {e}") from None
