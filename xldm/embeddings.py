"""Textual-inversion embeddings for SD 1.x and SDXL text encoders, used by file name in the prompt (A1111).

Files are safetensors, read as A1111 modules/textual_inversion/textual_inversion.py does: SDXL ones hold `clip_l`
(n, 768) and `clip_g` (n, 1280) (kohya sd-scripts `sdxl_train_textual_inversion.py`), SD 1.x ones one (n, width)
tensor, `emb_params` (sd-scripts `train_textual_inversion.py`) or any single key (diffusers `learned_embeds`).
Vectors go to the encoders by width; the tokenizer puts n placeholder ids where the name stands, and the embedding layer looks them up
(`CLIPTextEmbeddings.set_extra_tokens`), so pooling and the vocabulary stay as they are."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from xldm.errors import EmbeddingError
from xldm.weights.io import open_checkpoint

SDXL_KEYS = ("clip_l", "clip_g")
_WIDTH_USES = {768: "CLIP ViT-L: SD 1.x, SDXL clip_l", 1024: "OpenCLIP ViT-H: SD 2.x",
               1280: "OpenCLIP bigG: SDXL clip_g"}


@dataclass(frozen=True)
class Embedding:
    """`name` (what the prompt says, the file stem) and `vectors`: file key -> (n, width) float32."""

    name: str
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def _width_text(width: int) -> str:
    use = _WIDTH_USES.get(width)
    return f"width {width}" + (f" ({use})" if use else "")


def read_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """An embedding file (safetensors); its name is `name` or the file stem (A1111: "<stem>" in the prompt)."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    keys = ckpt.keys()
    if any(k in keys for k in SDXL_KEYS):
        chosen = [k for k in SDXL_KEYS if k in keys]
    elif "emb_params" in keys or len(keys) == 1:
        chosen = ["emb_params" if "emb_params" in keys else keys[0]]
    else:
        raise EmbeddingError(f"{path}: expected an embedding file with 'clip_l'/'clip_g' (SDXL), 'emb_params' or "
                             f"a single tensor (SD 1.x), found {len(keys)} tensors {keys[:10]}")
    vectors = {}
    for key in chosen:
        shape, dtype = ckpt.shape(key), ckpt.dtype(key)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0 or not dtype.is_floating_point:
            raise EmbeddingError(f"{path}: tensor {key!r} must be a 2-D float (n vectors, width) with n >= 1, "
                                 f"found shape {tuple(shape)} of {dtype}")
        vectors[key] = ckpt.tensor(key, dtype=torch.float32)
        if not torch.isfinite(vectors[key]).all():
            raise EmbeddingError(f"{path}: tensor {key!r} holds NaN or infinite values")
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise EmbeddingError(f"{path}: 'clip_l' and 'clip_g' must hold as many vectors, found "
                             f"{[tuple(v.shape) for v in vectors.values()]}")
    name = path.stem if name is None else name
    if not name.strip():
        raise EmbeddingError(f"{path}: an embedding needs a name the prompt can use, found {name!r}")
    return Embedding(name, vectors)


def _layers(components) -> list:
    return [te.text_model.embeddings for te in components.text_encoders]


def vectors_per_encoder(config, emb: Embedding) -> list[torch.Tensor]:
    """The vectors of `emb` for each text encoder of a model of `config` (by width), or EmbeddingError."""
    by_width = {v.shape[1]: v for v in emb.vectors.values()}
    out = []
    for index, cfg in enumerate(config.text_encoders):
        if cfg.width not in by_width:
            found = ", ".join(f"{k!r} of {_width_text(v.shape[1])}" for k, v in emb.vectors.items())
            raise EmbeddingError(f"embedding {emb.name!r}: text encoder {index + 1} of {config.kind} needs vectors "
                                 f"of {_width_text(cfg.width)}, the file has {found}; it is for another model")
        out.append(by_width[cfg.width])
    return out


def add_embeddings(components, embeddings: Embedding | Iterable[Embedding]) -> None:
    """Attach embeddings to every text encoder of `components` (its vectors of that encoder's width; an SDXL
    embedding on the refiner uses clip_g only).  All are checked before any is attached; a name already attached
    is replaced.  `components.tokenizers()` then knows them."""
    embeddings = [embeddings] if isinstance(embeddings, Embedding) else list(embeddings)
    if not components.text_encoders:
        raise EmbeddingError(f"{components.kind}: no text encoders are loaded to attach embeddings to")
    layers = _layers(components)
    tables = [dict(layer.extra_tokens) for layer in layers]
    for emb in embeddings:
        for table, vectors in zip(tables, vectors_per_encoder(components.config, emb)):
            table[emb.name] = vectors
    for layer, table in zip(layers, tables):
        layer.set_extra_tokens(table)


def remove_embeddings(components, names: str | Iterable[str] | None = None) -> list[str]:
    """Detach embeddings by name (None: all); returns the names removed.  Unknown names are refused."""
    layers = _layers(components)
    attached = list(dict.fromkeys(name for layer in layers for name in layer.extra_tokens))
    names = attached if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in attached]
    if unknown:
        raise EmbeddingError(f"cannot remove embeddings {unknown}: not attached; attached are {attached}")
    for layer in layers:
        layer.set_extra_tokens({k: v for k, v in layer.extra_tokens.items() if k not in names})
    return names


def attached_embeddings(components) -> list[str]:
    """Names of the embeddings attached to `components`' text encoders, in attachment order."""
    return list(dict.fromkeys(name for layer in _layers(components) for name in layer.extra_tokens))
