"""Which adapter files are active on a model, at what weights, and `<lora:NAME:W>` prompt tags.

`LoraSet` is a model's list of (file, UNet weight, text-encoder weight): `sync(components)` brings the networks
that are loaded in line with it (networks loaded later, as in low-memory mode, get it when they are synced), so
files can be added, reweighted and removed without reloading the model.  Unfused, the base weights are never
written; fused, they are rewritten once per change and restored bit for bit when the files are removed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xldm.config import ModelConfig
from xldm.lora.files import LoraError, LoraFile, read_lora
from xldm.lora.network import set_adapter
from xldm.models.components import Components

# A1111 extra networks (`modules/extra_networks.py` re_extra_net): <lora:name:te:unet>, <lyco:...> (the
# LyCORIS extension's name), named `te=`/`unet=` too.
_TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>")


@dataclass(frozen=True)
class LoraUse:
    """One active file: `weight` multiplies the UNet's adapters, `text_weight` the text encoders' (None: same)."""

    path: Path
    weight: float = 1.0
    text_weight: float | None = None

    def multiplier(self, component: str) -> float:
        return self.weight if component == "unet" or self.text_weight is None else self.text_weight


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float, float | None]]]:
    """The prompt without its `<lora:NAME[:TE[:UNET]]>` tags, and (name, unet weight, text weight or None) per tag.
    As A1111's Lora extension (extensions-builtin/Lora/extra_networks_lora.py, `activate`): one number is both
    weights, two are text encoder then UNet; `te=` / `unet=` named.  Its third value / `dyn=` (dyn_dim, a rank cut)
    and any other name are a ValueError, never dropped."""
    found = []

    def take(match: re.Match) -> str:
        name, fields = match.group(2).strip(), [f.strip() for f in match.group(3).split(":")[1:]]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        positional = [f for f in fields if "=" not in f]
        if len(positional) > 2 or "dyn" in named:
            what = "dyn_dim (a third value or dyn=) is not supported" if len(positional) < 4 else \
                f"{len(positional)} values, at most 2 expected"
            raise ValueError(f"{match.group(0)}: {what}; give <lora:NAME:WEIGHT> or "
                             f"<lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        if unknown := sorted(set(named) - {"te", "unet"}):
            raise ValueError(f"{match.group(0)}: unknown field(s) {', '.join(unknown)}; expected te= and unet=")
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"{match.group(0)}: the weights must be numbers (<lora:NAME:WEIGHT>)") from None
        found.append((name, unet, None if te == unet else te))
        return ""

    return _TAG.sub(take, prompt), found


def resolve_lora_name(name: str, lora_dir: str | os.PathLike | None) -> Path:
    """`DIR/NAME.safetensors` for a prompt tag (only names inside the folder)."""
    from xldm.weights.io import resolve_inside

    if lora_dir is None:
        raise ValueError(f"<lora:{name}:...> in the prompt, but no LoRA folder is set (--lora-dir DIR)")
    path = resolve_inside(lora_dir, name if name.endswith(".safetensors") else f"{name}.safetensors")
    if not path.is_file():
        known = sorted(p.stem for p in Path(lora_dir).glob("*.safetensors"))[:20]
        raise ValueError(f"<lora:{name}>: no {path.name} in {lora_dir} (found: {', '.join(known) or 'none'})")
    return path


class LoraSet:
    """The adapter files active on one model, read once per file and kept (the active ones, and up to KEEP_FILES
    files in all: a server that sees many LoRAs does not keep them all)."""

    KEEP_FILES = 16

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.uses: tuple[LoraUse, ...] = ()
        self.fused = False
        self._files: dict[tuple[Path, int, int], LoraFile] = {}

    def file(self, path: str | os.PathLike) -> LoraFile:
        """The file read for this model (cached by path, size and modification time)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such LoRA file: {path}")
        stat = path.stat()
        key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = read_lora(path, self.config)
            active = {use.path.resolve() for use in self.uses}
            stale = [k for k in self._files if k[0] not in active and k != key]
            for old in stale[: max(0, len(self._files) - self.KEEP_FILES)]:  # oldest first
                del self._files[old]
        return self._files[key]

    def set(self, uses, *, fused: bool | None = None) -> None:
        """Make `uses` (LoraUse, path, or (path, weight[, text_weight])) the active list; every file is read and
        checked before anything changes."""
        normal = tuple(u if isinstance(u, LoraUse) else LoraUse(Path(u)) if isinstance(u, (str, os.PathLike))
                       else LoraUse(Path(u[0]), *map(float, u[1:])) for u in uses)
        for use in normal:
            self.file(use.path)
        self.uses = normal
        if fused is not None:
            self.fused = fused

    def active(self) -> list[tuple[LoraUse, LoraFile]]:
        return [(use, self.file(use.path)) for use in self.uses]

    def sync(self, model: Components) -> None:
        """Bring the loaded networks of `model` in line with the active list."""
        wanted = {}
        for index, (use, lora) in enumerate(self.active()):
            for (component, layer), adapter in lora.adapters.items():
                wanted[(component, layer, f"{index}:{use.path}")] = (adapter, use.multiplier(component))
        modules = model.modules()
        for component, module in modules.items():
            state = module.__dict__.setdefault("_adapter_state", {})
            mine = {k: v for k, v in wanted.items() if k[0] == component}
            for key, (adapter, multiplier, fused) in list(state.items()):
                if key not in mine or mine[key] != (adapter, multiplier) or fused != self.fused:
                    set_adapter(module.get_submodule(key[1]), key[2], None)
                    del state[key]
            for key, (adapter, multiplier) in mine.items():
                if key not in state:
                    set_adapter(module.get_submodule(key[1]), key[2], adapter, multiplier, self.fused)
                    state[key] = (adapter, multiplier, self.fused)

    def clear(self, model: Components | None = None) -> None:
        self.uses = ()
        if model is not None:
            self.sync(model)


def lora_infotext(uses: list[tuple[LoraUse, LoraFile]]) -> str:
    """A1111's `Lora hashes: "name: hash, ..."` value (without the quotes)."""
    return ", ".join(f"{lora.name}: {lora.short_hash}" for _, lora in uses)

