"""`ModelHandle`: one model's networks, already loaded or loaded from its file on use; in low-memory mode each is
kept near the device (pinned host copies on a GPU, mapped file pages on a CPU, `xldm.weights.offload`) and
brought in only while it runs."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from xldm.config import ModelConfig
from xldm.lora import LoraSet
from xldm.models.components import Components
from xldm.models.quantize import check_quantize
from xldm.weights.offload import DeviceSwap, MappedPages, file_signature, trim_heap


class ModelHandle:
    """One model's networks: already loaded, or loaded from a path on use.  In low-memory mode with files, each
    network is read once and kept near the device (`xldm.weights.offload`): on a GPU in (pinned) host RAM, moved to
    the device for each use and off it after; on a CPU as views of the memory-mapped file whose pages go back to
    the page cache after each use (a network that needs a cast from the file's dtype is freed after each use and
    read again).  A kept network whose file changed is read again; a removed file is an error."""

    def __init__(self, source: Components | str | Path, *, dtype: torch.dtype, device: torch.device,
                 low_memory: bool = False, vae: str | Path | None = None, unet: str | Path | None = None,
                 file: str | Path | None = None, quantize: str | None = None) -> None:
        self.dtype, self.device, self.low_memory = dtype, device, low_memory
        self.quantize = check_quantize(quantize)
        # low memory with files: the networks read once and kept near the device (xldm.weights.offload), by
        # component: (the source's file_signature, DeviceSwaps on a GPU, MappedPages on a CPU or None)
        self._near: dict[str, tuple[tuple, list, Any]] = {}
        self.source_file = None if file is None else Path(file)  # the file loaded Components came from
        self.vae_path = None if vae is None else Path(vae)
        self.unet_path = None if unet is None else Path(unet)
        if isinstance(source, Components):
            self.path: Path | None = None
            self.loaded = source.to(device=device, dtype=dtype)
            self.config: ModelConfig = source.config
            if self.quantize and source.unet is not None:
                from xldm.models.quantize import quantize_weights

                quantize_weights(source.unet)
        else:
            from xldm.weights.info import model_info

            self.path = Path(source)
            self.loaded = Components(config=model_info(self.path).config)
            self.config = self.loaded.config
        self.name = self.path.name if self.path else self.source_file.name if self.source_file else self.config.kind
        self.loras = LoraSet(self.config)
        self.embeddings: list = []  # xldm.embeddings.Embedding, attached whenever the text encoders are in use
        for component, override in (("vae", self.vae_path), ("unet", self.unet_path)):
            if override is not None:
                self.loaded = replace(self.loaded, **{component: None})  # the caller's Components keep theirs
                if not low_memory:
                    self._load(component)
        if self.unet_path is not None:
            self.name = self.unet_path.name
        self._hashes: dict[Path, str | None] = {}

    @property
    def file(self) -> Path | None:
        """The file the model's name comes from (the --unet file when its UNet replaces the model's); None for
        networks given already loaded."""
        return self.unet_path or self.path or self.source_file

    def short_hash(self, path: Path | None) -> str | None:
        """A1111's short hash of a file (`xldm.hashes`), computed once per handle (and cached across runs)."""
        if path is None:
            return None
        if path not in self._hashes:
            from xldm.hashes import short_hash

            self._hashes[path] = short_hash(path)
        return self._hashes[path]

    def _source(self, component: str) -> Path | None:
        """The file (or folder) a component is read from."""
        if component == "vae" and self.vae_path is not None:
            return self.vae_path
        if component == "unet" and self.unet_path is not None:
            return self.unet_path
        return self.path

    def _maps(self, component: str) -> bool:
        """Low memory on a CPU: whether the component's file holds its floating tensors in the dtype it runs in,
        so that they can stay views of the mapped file (`xldm.weights.offload.MappedPages`)."""
        from xldm.weights.io import open_checkpoint
        from xldm.weights.info import model_info

        source = self._source(component)
        try:
            if source == self.path:
                wanted = ("text_encoder",) if component == "text_encoders" else (component,)
                names = {d for c in model_info(source).components if c.name.startswith(wanted) for d in c.dtypes}
            else:
                ckpt = open_checkpoint(source)
                names = {str(ckpt.dtype(k)).removeprefix("torch.") for k in ckpt.keys()}
        except (OSError, ValueError):
            return False
        floating = {getattr(torch, n) for n in names if getattr(torch, n).is_floating_point}
        return floating == {self.dtype}

    def _load(self, component: str) -> None:
        from xldm.weights.load import load_model, load_vae

        near = self.low_memory and self.path is not None
        host = near and self.device.type != "cpu"  # read into host RAM once, moved to the device per use
        mapped = near and not host and self._maps(component)
        source = self._source(component)
        signature = file_signature(source) if near else None
        device = torch.device("cpu") if host else self.device
        if component == "vae" and self.vae_path is not None:  # --vae: another file's autoencoder
            scale = self.config.vae.scaling_factor if self.config.vae is not None else None
            vae = load_vae(self.vae_path, scaling_factor=scale, dtype=self.dtype, device=device, mapped=mapped)
            if vae.cfg.z_channels != self.config.latent_channels:
                raise ValueError(f"--vae {self.vae_path.name} makes {vae.cfg.z_channels}-channel latents, the model "
                                 f"takes {self.config.latent_channels}")
            self.loaded.vae = vae
        elif component == "unet" and self.unet_path is not None:  # --unet: another file's UNet (a student)
            unet = load_model(self.unet_path, components=["unet"], dtype=self.dtype, device=device,
                              mapped=mapped).unet
            if unet is None or unet.config != self.config.unet:
                raise ValueError(f"--unet {self.unet_path.name} holds no UNet of this model's architecture")
            self.loaded.unet = unet
        else:
            part = load_model(self.path, components=[component], dtype=self.dtype, device=device, mapped=mapped)
            setattr(self.loaded, component, getattr(part, component))
        files = [Path(f[0]) for f in signature] if mapped else []
        if component == "unet" and self.quantize:
            from xldm.models.quantize import quantize_weights

            floats = MappedPages([self.loaded.unet], files) if mapped else None
            quantize_weights(self.loaded.unet)
            if floats is not None:  # the float weights the int8 ones replace: their pages go back now
                floats.release()
            del floats
        modules = self._networks(component)
        pages = MappedPages(modules, files) if mapped else None
        if host:
            self._near[component] = (signature, [DeviceSwap(m, pin=torch.cuda.is_available()) for m in modules],
                                     None)
        elif mapped:
            self._near[component] = (signature, [], pages)

    def _networks(self, component: str) -> list[torch.nn.Module]:
        value = getattr(self.loaded, component)
        return list(value) if isinstance(value, tuple) else [] if value is None else [value]

    def _check_near(self, component: str) -> None:
        """A kept network whose file changed since it was read is dropped (read again on use); a removed file is
        an error that says so."""
        if component not in self._near:
            return
        source = self._source(component)
        try:
            signature = file_signature(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"{source}: the model file was removed after its {component} was loaded; "
                                    f"restore it or load the model again") from None
        if signature != self._near[component][0]:
            self._drop(component)

    def _drop(self, component: str) -> None:
        self._near.pop(component, None)
        setattr(self.loaded, component, () if component == "text_encoders" else None)
        gc.collect()
        trim_heap()

    def _sync_embeddings(self) -> None:
        from xldm.embeddings import add_embeddings, attached_embeddings, remove_embeddings

        if attached_embeddings(self.loaded) != [e.name for e in self.embeddings]:
            remove_embeddings(self.loaded)
            add_embeddings(self.loaded, self.embeddings)

    def has(self, component: str) -> bool:
        """Whether the model has this component (loaded, or in its file)."""
        if component == "vae" and (self.loaded.vae is not None or self.vae_path is not None):
            return True
        if self.path is None:
            return False
        from xldm.weights.info import model_info

        return any(c.name == component for c in model_info(self.path).components)

    @contextmanager
    def use(self, component: str) -> Iterator[Components]:
        """Components with `component` ("unet", "vae" or "text_encoders") present for the block's duration."""
        near = self.low_memory and self.path is not None
        if near:
            self._check_near(component)
        if getattr(self.loaded, component) in (None, ()):
            if self.path is None:
                raise ValueError(f"{self.name}: the model has no {component} and no file to load it from")
            self._load(component)
        kept = self._near.get(component)
        try:
            for swap in kept[1] if kept else ():
                swap.to_device(self.device)
            if component != "vae":
                self.loras.sync(self.loaded)
            if component == "text_encoders":
                self._sync_embeddings()
            yield self.loaded
        finally:
            if near:
                if kept is None:  # (not kept near: freed, read again on the next use)
                    self._drop(component)
                else:
                    for swap in kept[1]:
                        swap.to_host()
                    trim_heap()  # this network's freed activations go back before the next network runs
                    if kept[2] is not None:
                        kept[2].release()
