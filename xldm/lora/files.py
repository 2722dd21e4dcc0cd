"""Adapter files: the layer names each format uses, reading them into `Adapter`s, writing kohya files.

Formats read (safetensors; the layer name and tensor name are split at the layer names the model has):
* kohya / A1111 / Civitai: `lora_unet_<layer>` with `.` replaced by `_`, the layer named in the original (sgm)
  layout, as kohya's SDXL scripts train it, or in diffusers' layout; `lora_te1_` (CLIP ViT-L), `lora_te2_` (OpenCLIP
  bigG), `lora_te_` (the one encoder of SD 1.x/2.x), transformers' layer names; tensors `lora_down.weight`,
  `lora_up.weight`, `alpha`, LyCORIS `hada_*`, `lokr_*`, `diff`, `dora_scale`.
* diffusers / PEFT (`save_lora_weights`): `unet.<diffusers layer>.lora_A.weight` / `lora_B.weight`,
  `text_encoder.` / `text_encoder_2.`, `lora_magnitude_vector` (DoRA); the scale `lora_alpha / r` from the
  `lora_adapter_metadata` JSON (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`,
  `unet.use_rslora`; no metadata: alpha = r; a field the metadata lacks: peft's default), the patterns matched against diffusers' module path as peft does,
  and diffusers' older `.lora.down.weight` / `.processor.to_q_lora.down.weight` names.

A file whose tensors or metadata are malformed (no values, impossible or contradicting shapes, metadata fields of the
wrong type) is refused with LoraError naming the file and the tensor or field, before anything is applied."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from xldm.errors import LoraError
from xldm.lora.network import Adapter, MalformedAdapterError
from xldm.config import ModelConfig
from xldm.models.components import Components
from xldm.weights.io import open_checkpoint, save_file, tensor_data_sha256
from xldm.weights.keys_unet import unet_original_to_diffusers

KOHYA_COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
_PEFT_TENSORS = {"lora_A.weight": "lora_down", "lora_B.weight": "lora_up", "lora_magnitude_vector": "dora_scale",
                 "lora.down.weight": "lora_down", "lora.up.weight": "lora_up", "alpha": "alpha",
                 "lora_linear_layer.down.weight": "lora_down", "lora_linear_layer.up.weight": "lora_up"}
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")
# the cross-attention key width a file's attn2.to_k input reveals -> what the file was trained for
_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL base", 1280: "SDXL refiner"}


def _kohya_prefix(config: ModelConfig, component: str) -> str:
    if component != "unet" and len(config.text_encoders) == 1 and config.kind != "sdxl-refiner":
        return "lora_te_"
    return KOHYA_COMPONENT_PREFIX[component]


def kohya_name(config: ModelConfig, component: str, path: str) -> str:
    return _kohya_prefix(config, component) + path.replace(".", "_")


@lru_cache(maxsize=8)
def layer_names(config: ModelConfig) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Every name a file may give an adaptable layer (Linear / Conv2d) of the UNet and text encoders ->
    (component, module path, weight shape), read from the networks built on the meta device."""
    from xldm.models.clip import CLIPTextModel
    from xldm.models.unet import UNet

    with torch.device("meta"):
        model = Components(config=config, unet=UNet(config.unet),
                           text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders))
    names: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for component, module in model.modules().items():
        layers = {p: tuple(m.weight.shape) for p, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        diffusers = dict(zip(layers, layers))
        if component == "unet":
            renamed = unet_original_to_diffusers({f"{p}.weight": p for p in layers}, config.unet)
            diffusers = {p: k.removesuffix(".weight") for k, p in renamed.items()}
        for path, shape in layers.items():
            target = (component, path, shape)
            names.setdefault(kohya_name(config, component, path), target)
            names.setdefault(kohya_name(config, component, diffusers[path]), target)
            names.setdefault(f"{component}.{diffusers[path]}", target)
    return names


def _split_key(key: str) -> tuple[str, str] | None:
    """(layer name, tensor name) of a file key, or None when it is no adapter tensor."""
    if key.startswith("lora_"):  # kohya: one dot separates the layer from the tensor
        layer, _, tensor = key.partition(".")
        return layer, tensor.removesuffix(".weight")
    old = _OLD_PROCESSOR.search(key)
    if old:
        projection = "to_out.0" if old.group(1) == "to_out" else old.group(1)
        return f"{key[:old.start()]}.{projection}", "lora_down" if old.group(2) == "down" else "lora_up"
    for suffix, tensor in _PEFT_TENSORS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], tensor
    return None


# peft `tuners/lora/config.py` LoraConfig: r and lora_alpha both default to 8 (diffusers builds the config from the
# metadata alone, `utils/peft_utils.py` `_create_lora_config`)
PEFT_DEFAULT = 8


@dataclass(frozen=True)
class PeftSettings:
    """The fields of one component's PEFT `LoraConfig` that set a layer's scale (peft `tuners/lora/config.py`)."""

    component: str
    r: int | None
    lora_alpha: float | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_rslora: bool
    use_dora: bool


def _is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pattern_field(config: dict, key: str, valid, expected: str, where: str) -> dict:
    patterns = config.get(key, {})
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise LoraError(f"{where} field {key} must be a JSON object of pattern -> value, found {patterns!r}")
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as e:
            raise LoraError(f"{where} field {key}: {pattern!r} is not a valid regular expression ({e.msg})") from None
        if not valid(value):
            raise LoraError(f"{where} field {key}: {pattern!r} must map to {expected}, found {value!r}")
    return patterns


def peft_settings(metadata: dict, component: str, where: str) -> PeftSettings | None:
    """`component`'s PEFT settings from the `lora_adapter_metadata` JSON (None: the file has none for it); LoraError
    naming the field when one has the wrong type (`where`: the file, for the message)."""
    if PEFT_METADATA_KEY not in metadata:
        return None
    where = f"{where}: {PEFT_METADATA_KEY}"
    try:
        config = json.loads(metadata[PEFT_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise LoraError(f"{where} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"{where} must be a JSON object, found {type(config).__name__} {str(config)[:80]}")
    if not any(key.startswith(component + ".") for key in config):
        return None
    r, alpha, rslora, dora = (config.get(f"{component}.{key}") for key in ("r", "lora_alpha", "use_rslora", "use_dora"))
    if f"{component}.r" in config and not _is_rank(r):
        raise LoraError(f"{where} field {component}.r must be a positive integer, found {r!r}")
    if f"{component}.lora_alpha" in config and not _is_number(alpha):
        raise LoraError(f"{where} field {component}.lora_alpha must be a finite number, found {alpha!r}")
    for key, value in (("use_rslora", rslora), ("use_dora", dora)):
        if f"{component}.{key}" in config and not isinstance(value, bool):
            raise LoraError(f"{where} field {component}.{key} must be true or false, found {value!r}")
    return PeftSettings(component, r, None if alpha is None else float(alpha),
                        _pattern_field(config, f"{component}.rank_pattern", _is_rank, "a positive integer", where),
                        _pattern_field(config, f"{component}.alpha_pattern", _is_number, "a finite number", where),
                        bool(rslora), bool(dora))


def pattern_key(patterns: dict, module: str) -> str | None:
    """The first pattern that names `module` (a diffusers / transformers module path), as peft
    `utils/other.py` `get_pattern_key` matches `rank_pattern` and `alpha_pattern`."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def peft_alpha(settings: PeftSettings, module: str, rank: int, where: str) -> float:
    """The alpha that gives `module` peft's scale `lora_alpha / r` (rsLoRA, Kalajdzievski 2023:
    `lora_alpha / sqrt(r)`), from peft `tuners/lora/model.py` `_create_and_replace`; LoraError when the config's
    rank for the module is not the tensors' (peft could not load the file)."""
    rank_key, alpha_key = pattern_key(settings.rank_pattern, module), pattern_key(settings.alpha_pattern, module)
    configured = settings.rank_pattern[rank_key] if rank_key is not None else settings.r or PEFT_DEFAULT
    if configured != rank:
        source = (f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r" if settings.r is not None
                  else f"r (absent: peft's default {PEFT_DEFAULT})")
        raise LoraError(f"{where}: {PEFT_METADATA_KEY} field {settings.component}.{source} gives {module} rank "
                        f"{configured}; its tensors have rank {rank}")
    alpha = (settings.alpha_pattern[alpha_key] if alpha_key is not None
             else settings.lora_alpha if settings.lora_alpha is not None else PEFT_DEFAULT)
    return alpha * math.sqrt(rank) if settings.use_rslora else alpha


def _guess_target(grouped: dict[str, dict[str, torch.Tensor]]) -> str:
    """What the file seems made for, from its names and its cross-attention width."""
    clues = ["SD 1.x/2.x (kohya lora_te_ keys)"] if any(name.startswith("lora_te_") for name in grouped) else []
    for name, tensors in grouped.items():
        down = tensors.get("lora_down", tensors.get("hada_w1_b"))
        if ("attn2_to_k" in name or "attn2.to_k" in name) and down is not None and down.dim() == 2:
            width = down.shape[1]
            clues.append(_CONTEXT_WIDTHS.get(width, "another model") + f" (cross-attention width {width})")
            break
    return ", ".join(clues) or "another model"


@dataclass
class LoraFile:
    """An adapter file read for one model: its adapters by (component, layer path)."""

    path: Path
    adapters: dict[tuple[str, str], Adapter]
    metadata: dict[str, str] = field(default_factory=dict)
    short_hash: str = ""  # A1111 "AutoV3": sha256 of the tensor data after the header, 12 hex digits

    @property
    def name(self) -> str:
        return self.path.stem

    def components(self) -> set[str]:
        return {component for component, _ in self.adapters}


def read_lora(path: str | os.PathLike, config: ModelConfig) -> LoraFile:
    """Read an adapter file for a model of `config`: every tensor must land on a layer of the right shape, else
    LoraError with the unmatched names and what the file seems to be for (nothing is applied); malformed tensors or
    PEFT metadata: LoraError naming the file's key or the metadata field."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}  # layer name -> tensor name -> the file's key, for messages
    foreign = []
    for key in ckpt.keys():
        split = _split_key(key)
        if split is None:
            foreign.append(key)
            continue
        tensor = ckpt.tensor(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoraError(f"{path}: tensor {key} holds NaN/inf values; refusing the file")
        grouped.setdefault(split[0], {})[split[1]] = tensor
        keys.setdefault(split[0], {})[split[1]] = key
    if foreign or not grouped:
        shown = ", ".join(foreign[:10]) + (f" ... ({len(foreign)} in all)" if len(foreign) > 10 else "")
        raise LoraError(f"{path}: not a LoRA/LyCORIS file: " +
                        (f"{len(foreign)} keys of no adapter format ({shown})" if foreign else "it holds no tensors"))
    names = layer_names(config)
    adapters: dict[tuple[str, str], Adapter] = {}
    unmatched, mismatched = [], []
    settings: dict[str, PeftSettings | None] = {}
    for name, tensors in grouped.items():
        if name not in names:
            unmatched.append(name)
            continue
        component, layer, shape = names[name]
        try:
            adapter = Adapter(tensors)
            peft = not name.startswith("lora_")
            if adapter.kind == "lora" and peft:  # PEFT: the scale comes from the config, DoRA follows peft
                if component not in settings:
                    settings[component] = peft_settings(ckpt.metadata, component, str(path))
                if settings[component] is not None:
                    module = name.removeprefix(component + ".")  # the module path peft's patterns are matched on
                    adapter.alpha = peft_alpha(settings[component], module, adapter.rank, str(path))
                    if "dora_scale" in adapter.factors and not settings[component].use_dora:
                        # diffusers builds LoraConfig(use_dora=False) and leaves the magnitudes unloaded
                        raise LoraError(f"{path}: {keys[name]['dora_scale']}: a DoRA magnitude, but the "
                                        f"{PEFT_METADATA_KEY} field {component}.use_dora is not true; diffusers "
                                        f"would ignore it, so the file's meaning is unclear (set use_dora, or drop "
                                        f"the lora_magnitude_vector tensors)")
                adapter.multiplier_inside_norm = "dora_scale" in adapter.factors
            adapter.check_shape(shape)
        except MalformedAdapterError as e:
            raise LoraError(f"{path}: {keys[name].get(e.tensor) or f'layer {name}'}: {e}") from None
        except LoraError:
            raise
        except ValueError as e:
            mismatched.append(f"{name} ({e})")
            continue
        adapters[(component, layer)] = adapter
    if unmatched or mismatched:
        listing = ", ".join((unmatched + mismatched)[:12])
        more = len(unmatched) + len(mismatched) - 12
        raise LoraError(
            f"{path}: this adapter does not fit the {config.kind} model: it looks made for {_guess_target(grouped)}; "
            f"{len(unmatched)} layer names not in the model and {len(mismatched)} of the wrong shape: {listing}"
            + (f" ... ({more} more)" if more > 0 else "") + "; nothing was applied")
    return LoraFile(path, adapters, dict(ckpt.metadata), tensor_data_sha256(path)[:12])


def describe_lora(path: str | os.PathLike) -> list[str] | None:
    """`xldm info` lines for an adapter file, from its header alone (None: not an adapter file)."""
    ckpt = open_checkpoint(path)
    split = [_split_key(k) for k in ckpt.keys()]
    if not split or any(s is None for s in split):
        return None
    layers: dict[str, set[str]] = {}
    for layer, tensor in split:
        layers.setdefault(layer, set()).add(tensor)
    kinds = {"LoRA" if "lora_down" in t else "LoHa" if "hada_w1_a" in t else "LoKr" if any(n.startswith("lokr")
             for n in t) else "full" for t in layers.values()}
    downs = [k for k, s in zip(ckpt.keys(), split) if s[1] == "lora_down"]
    ranks = sorted({ckpt.shape(k)[0] for k in downs if ckpt.shape(k)})
    prefixes = sorted({layer.split("_")[1] if layer.startswith("lora_") else layer.split(".")[0] for layer in layers})
    widths = [ckpt.shape(k)[1] for k in ckpt.keys() if ("attn2_to_k.lora_down" in k or "attn2.to_k.lora_A" in k)
              and len(ckpt.shape(k)) == 2]
    meta = ckpt.metadata
    lines = [f"adapter file: {', '.join(sorted(kinds))}, {len(layers)} layers ({', '.join(prefixes)}), "
             f"ranks {ranks or '-'}", "kind: " + ("DoRA " if any("dora_scale" in t for t in layers.values()) else "")
             + ("PEFT/diffusers layout" if not next(iter(layers)).startswith("lora_") else "kohya layout")]
    if widths:
        lines.append(f"made for: {_CONTEXT_WIDTHS.get(widths[0], 'another model')} (cross-attention width {widths[0]})")
    lines += [f"{key}: {meta[key]}" for key in ("ss_base_model_version", "ss_network_dim", "ss_network_alpha",
                                                 "ss_sd_model_name", "ss_resolution", "ss_steps") if key in meta]
    return lines


def write_kohya(path: str | os.PathLike, config: ModelConfig, adapters: dict[tuple[str, str], Adapter],
                metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """A kohya-format file (`lora_unet_*.lora_down.weight` ..., original-layout UNet names) that diffusers'
    `load_lora_weights`, A1111 and ComfyUI load."""
    tensors = {}
    for (component, layer), adapter in adapters.items():
        for tensor_name, value in adapter.file_tensors().items():
            suffix = "" if tensor_name in ("alpha", "dora_scale") else ".weight"
            value = value.to(dtype) if dtype is not None and value.dim() > 0 else value
            tensors[f"{kohya_name(config, component, layer)}.{tensor_name}{suffix}"] = value.contiguous()
    save_file(tensors, path, metadata=metadata or {})
    return Path(path)
