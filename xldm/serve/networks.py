"""The server's folders of extra files: LoRAs (`--lora-dir`), VAEs (`--vae-dir`), embeddings (`--embeddings-dir`),
listed in AUTOMATIC1111's shapes (`extensions-builtin/Lora/network.py` NetworkOnDisk, `modules/sd_vae.py`,
`modules/textual_inversion/textual_inversion.py`).  Files are named relative to their folder; the folders
themselves are never disclosed."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xldm.weights.io import open_checkpoint

log = logging.getLogger("xldm.serve")


def stays_inside(path: Path, root: Path) -> Path | None:
    """`path` resolved, or None (with a warning) when it is a broken link or leads outside `root`."""
    try:
        real = path.resolve(strict=True)
        real.relative_to(root)
        return real
    except (OSError, ValueError):
        log.warning("skipping %s: it leads outside %s", path.name, root)
        return None


def files_inside(folder: Path | None, suffixes: tuple[str, ...], *, recursive: bool = True) -> list[Path]:
    """Files with one of `suffixes` under `folder`, sorted; links that lead outside it are skipped."""
    if folder is None or not folder.is_dir():
        return []
    root = folder.resolve()
    found = []
    for path in sorted(root.rglob("*") if recursive else root.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        real = stays_inside(path, root)
        if real is not None and real.is_file():
            found.append(path)
    return found


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file, with values that look like JSON objects parsed (A1111
    `sd_models.read_metadata_from_safetensors`); {} when the file cannot be read (A1111 logs it and goes on)."""
    try:
        metadata = open_checkpoint(path).metadata
    except Exception as e:  # noqa: BLE001 - one broken file does not hide the others
        log.warning("reading the metadata of %s: %s", path.name, str(e)[:300])
        return {}
    parsed: dict[str, Any] = {}
    for key, value in metadata.items():
        parsed[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                parsed[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return parsed


@dataclass(frozen=True)
class LoraEntry:
    name: str  # what a prompt tag names: the path under the folder, without ".safetensors"
    path: Path
    metadata: dict[str, Any]

    def api_json(self) -> dict[str, Any]:
        """A1111 `lora_script.py` create_lora_json; `path` is the file under the folder (no server paths)."""
        alias = self.metadata.get("ss_output_name") or self.name
        return {"name": self.name, "alias": alias, "path": f"{self.name}.safetensors", "metadata": self.metadata}


def scan_loras(folder: Path | None) -> dict[str, LoraEntry]:
    """The LoRA files of the folder (`*.safetensors`, subfolders too), by name."""
    if folder is None:
        return {}
    root = folder.resolve()
    entries = {}
    for path in files_inside(folder, (".safetensors",)):
        name = path.relative_to(root).with_suffix("").as_posix()
        entries[name] = LoraEntry(name, path, safetensors_metadata(path))
    return entries


def scan_vaes(folder: Path | None) -> dict[str, Path]:
    """VAE files of the folder (`*.safetensors`; pickled files are not loaded), by name with extension."""
    root = folder.resolve() if folder is not None else None
    return {path.relative_to(root).as_posix(): path for path in files_inside(folder, (".safetensors",))}


def vae_latent_channels(path: Path) -> int:
    """The latent channels a VAE file makes, from its header (a bare VAE or a full checkpoint's
    `first_stage_model.*`); ValueError when the file holds no KL autoencoder."""
    from xldm.weights.detect import VAE_PREFIX

    ckpt = open_checkpoint(path)
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in ckpt.keys()) else ""
    if f"{prefix}post_quant_conv.weight" not in ckpt:
        raise ValueError(f"{path.name} holds no VAE (no post_quant_conv.weight)")
    return ckpt.shape(f"{prefix}post_quant_conv.weight")[0]


def _embedding_shape(path: Path) -> tuple[int | None, int | None]:
    """(width, vectors) from the header, no tensor read: A1111 sums SDXL's `clip_g` + `clip_l` widths."""
    if path.suffix.lower() != ".safetensors":
        return None, None  # a pickle is never opened
    ckpt = open_checkpoint(path)
    if "clip_g" in ckpt and "clip_l" in ckpt:
        return ckpt.shape("clip_g")[-1] + ckpt.shape("clip_l")[-1], ckpt.shape("clip_g")[0]
    if "emb_params" in ckpt:
        shape = ckpt.shape("emb_params")
        return shape[-1], shape[0] if len(shape) > 1 else 1
    keys = ckpt.keys()
    if len(keys) == 1:  # a file of one tensor (A1111 takes its only value)
        shape = ckpt.shape(keys[0])
        return shape[-1], shape[0] if len(shape) > 1 else 1
    return None, None


def list_embeddings(folder: Path | None) -> dict[str, Any]:
    """`/sdapi/v1/embeddings` (A1111 `api.py` get_embeddings): files that cannot be read are "skipped"."""
    loaded, skipped = {}, {}
    for path in files_inside(folder, (".safetensors", ".pt")):
        entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        try:
            entry["shape"], entry["vectors"] = _embedding_shape(path)
        except Exception as e:  # noqa: BLE001
            log.warning("reading embedding %s: %s", path.name, str(e)[:300])
            skipped[path.stem] = entry
            continue
        loaded[path.stem] = entry
    return {"loaded": loaded, "skipped": skipped}


def legacy_model_hash(path: Path) -> str:
    """The 8-digit hash sd-webui-controlnet shows in its model names ("name [hash]"): A1111's legacy
    `sd_models.model_hash`, the SHA-256 of the 64 KiB at offset 1 MiB of the file (of the weights file of a
    diffusers folder)."""
    import hashlib

    if path.is_dir():
        candidates = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not candidates:
            return "00000000"
        path = candidates[0]
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetEntry:
    name: str  # the file's path under the folder without its extension, or the diffusers folder's name
    path: Path
    short_hash: str

    @property
    def title(self) -> str:  # what /controlnet/model_list shows and units name
        return f"{self.name} [{self.short_hash}]"


def scan_controlnets(folder: Path | None) -> dict[str, ControlNetEntry]:
    """The ControlNets of the folder, by name: `*.safetensors` files (subfolders too) and diffusers folders
    (`config.json` beside `diffusion_pytorch_model.safetensors`)."""
    if folder is None or not folder.is_dir():
        return {}
    root = folder.resolve()
    found: dict[str, Path] = {}
    for path in files_inside(folder, (".safetensors",)):
        if path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file():
            if stays_inside(path.parent, root) is not None and path.parent != root:
                found[path.parent.relative_to(root).as_posix()] = path.parent
            continue
        found[path.relative_to(root).with_suffix("").as_posix()] = path
    return {name: ControlNetEntry(name, path, legacy_model_hash(path)) for name, path in sorted(found.items())}


def find_controlnet(entries: dict[str, ControlNetEntry], name: str) -> ControlNetEntry:
    """A unit's `model`: "name [hash]" or "name" (with or without the extension); KeyError when absent."""
    bare = name.strip()
    if bare.endswith("]") and " [" in bare:
        bare = bare.rsplit(" [", 1)[0]
    for candidate in (bare, bare.removesuffix(".safetensors")):
        if candidate in entries:
            return entries[candidate]
    raise KeyError(name)
