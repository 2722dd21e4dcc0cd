"""Optional on-disk cache of VAE posteriors and text embeddings for diffusion training (`cache_dir=DIR`).

With the VAE and text encoders frozen (SDXL's default), their outputs for a sample never change: they are computed
once and read back in later epochs.  Cached per image row: the VAE posterior's parameters `cat(mean, logvar)` (fp32),
*not* a sampled latent: every step still draws z = mean + std * eps with that step's per-sample generator
(`xldm.train.diffusion.sample_generators`), so a cached run trains on exactly the latents an uncached run would
(tests/test_train_cache.py checks the losses); per caption: the text encoders' context sequence and pooled vector
(fp32).  Entries live in `DIR/latents-<vae fingerprint>/` and `DIR/text-<text fingerprint>/`, one safetensors file
each (no pickles), named by a hash of their key, read and written (atomically) by `xldm.weights.io`.  A latent entry
is keyed by the sample key, its bucket (target size), the crop, the original size and a digest of the cropped pixels
(an image edited under the same name is a miss, not a stale hit); a text entry by the caption.  Each file repeats
its key and fingerprint in its metadata and is used only if they match; an unreadable file (truncated, corrupt) is
ignored with a warning, recomputed and rewritten.

Invalidation: the VAE fingerprint covers its architecture (VAEConfig), every weight tensor's name, shape, dtype and
contents, the mixed-precision setting and the encoder's device type; the text fingerprint the same for the text
encoders (and their configs, which fix the tokenizers).  Any change gives another folder, so nothing computed under
other weights or precision is ever read.  Contents enter through two 64-bit integer checksums of each tensor's raw
bits (`tensor_checksum`): the plain and a position-weighted sum of the bit patterns read as integers, modulo 2**64.
Every element enters both sums (a strided sample could miss a one-weight edit), in exact integer arithmetic: any one
changed weight, even in its last bit, changes the plain sum; to go unnoticed, many elements' changes would have to
cancel exactly in both sums, which training or loading another checkpoint does not do (not a security boundary: it
guards against mistakes, not adversarially crafted weights).  Cost: one pass over the weights on their own device at
start-up (no copy to the CPU, no cryptographic hash of gigabytes).

Crops: a cache only helps if a sample's crop is the same each time, so with `cache_dir` set the data takes one crop
per sample: the centre crop with `center_crop=True`, else a random crop seeded by (seed, sample key)
(`TrainingBatches(fixed_crops=True)`), not a fresh one per epoch; the micro-conditioning still reports the crop taken.
Images are still decoded every step; the cache saves the VAE encoder and the text encoders.  It is off when the text
encoders are trained (their outputs change every step; latents are still cached then)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from xldm.weights.io import open_checkpoint, save_file

CACHE_FORMAT = 1
_CHECKSUM_CHUNK = 1 << 24  # elements per pass of the checksum (bounds its temporary int64 memory)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_checksum(t: Tensor) -> tuple[int, int]:
    """(sum of bits, sum of bits * (index mod 65521 + 1)) of the tensor's elements read as signed integers of
    their own width, in int64 arithmetic (wrapping modulo 2**64), computed on the tensor's device."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    plain = torch.zeros((), dtype=torch.int64, device=flat.device)
    weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHECKSUM_CHUNK):
        part = bits[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        position = torch.arange(start, start + part.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
        plain += part.sum()
        weighted += (part * position).sum()
    return int(plain), int(weighted)


def modules_fingerprint(modules: Sequence[nn.Module], settings: dict) -> str:
    """Hex digest over `settings` (JSON) and every state-dict tensor's name, shape, dtype and checksums."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str).encode())
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict().items():
            plain, weighted = tensor_checksum(tensor)
            digest.update(f"{index}.{name}|{tuple(tensor.shape)}|{tensor.dtype}|{plain}|{weighted};".encode())
    return digest.hexdigest()


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:40]


class EmbeddingCache:
    """Read-through cache of the frozen VAE's posteriors and the frozen text encoders' embeddings."""

    def __init__(self, root: str | os.PathLike, model, *, mixed_precision: str, device: torch.device,
                 cache_text: bool = True) -> None:
        self.root = Path(root)
        precision = {"mixed_precision": mixed_precision, "device": torch.device(device).type}
        self.vae_fingerprint = modules_fingerprint([model.vae], {"vae": asdict(model.config.vae), **precision})
        self.latent_dir = self.root / f"latents-{self.vae_fingerprint[:16]}"
        self.text_fingerprint = self.text_dir = None
        if cache_text:
            self.text_fingerprint = modules_fingerprint(
                list(model.text_encoders), {"text_encoders": [asdict(c) for c in model.config.text_encoders],
                                            "model_kind": model.config.kind, **precision})
            self.text_dir = self.root / f"text-{self.text_fingerprint[:16]}"
        self.stats = {"latent_hits": 0, "latent_misses": 0, "text_hits": 0, "text_misses": 0, "corrupt": 0}

    def _read(self, path: Path, identity: dict) -> dict[str, Tensor] | None:
        if not path.exists():
            return None
        try:
            entry = open_checkpoint(path)
            tensors, stored = entry.tensors(), json.loads(entry.metadata["xldm.cache"])
        except (OSError, KeyError, ValueError) as e:  # truncated or corrupt (xldm's CheckpointError is a ValueError)
            self.stats["corrupt"] += 1
            warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}: {e}); recomputing it",
                          RuntimeWarning, stacklevel=3)
            return None
        return tensors if stored == identity else None  # a name collision or an entry of another key

    @staticmethod
    def _write(path: Path, tensors: dict[str, Tensor], identity: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}, path,
                  metadata={"xldm.cache": json.dumps(identity), "format": "pt"})

    def _latent_identity(self, batch: dict, row: int) -> dict:
        pixels = batch["pixels"][row].detach().to("cpu", torch.float32).contiguous()
        return {"key": str(batch["keys"][row]), "target_size": batch["target_size"][row].tolist(),
                "crop_top_left": batch["crop_top_left"][row].tolist(),
                "original_size": batch["original_size"][row].tolist(),
                "pixels": hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest(),
                "vae": self.vae_fingerprint}

    @torch.no_grad()
    def posterior_moments(self, vae: nn.Module, pixels: Tensor, batch: dict) -> Tensor:
        """(B, 2 z_channels, h, w) = cat(mean, logvar) of q(z|x) per row, from the cache or the VAE."""
        identities = [self._latent_identity(batch, i) for i in range(pixels.shape[0])]
        paths = [self.latent_dir / f"{_digest(identity)}.safetensors" for identity in identities]
        found = [self._read(path, identity) for path, identity in zip(paths, identities)]
        rows: list[Tensor | None] = [f["moments"].to(pixels.device) if f is not None else None for f in found]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.stats["latent_hits"] += len(rows) - len(missing)
        self.stats["latent_misses"] += len(missing)
        if missing:
            posterior = vae.encode(pixels[missing])
            moments = torch.cat([posterior.mean, posterior.logvar], dim=1).float()
            for j, i in enumerate(missing):
                rows[i] = moments[j]
                self._write(paths[i], {"moments": moments[j]}, identities[i])
        return torch.stack(rows)

    def latents(self, vae: nn.Module, pixels: Tensor, batch: dict, generators) -> Tensor:
        """What `vae.encode_latents(pixels, generator=generators)` returns, the posterior read from the cache."""
        from xldm.models.vae import DiagonalGaussian

        return DiagonalGaussian(self.posterior_moments(vae, pixels, batch)).sample(generators) * vae.cfg.scaling_factor

    @torch.no_grad()
    def text_embeddings(self, text_encoders, tokenizers, config, captions: Sequence[str]):
        """`encode_prompts(text_encoders, tokenizers, config, captions)`, per caption from the cache."""
        from xldm.conditioning import TextEmbeddings, encode_prompts

        if self.text_dir is None:
            raise RuntimeError("this cache does not hold text embeddings (the text encoders are trained)")
        identities = [{"caption": str(c), "text": self.text_fingerprint} for c in captions]
        paths = [self.text_dir / f"{_digest(identity)}.safetensors" for identity in identities]
        found = [self._read(path, identity) for path, identity in zip(paths, identities)]
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats["text_hits"] += len(found) - len(missing)
        self.stats["text_misses"] += len(missing)
        if missing:
            emb = encode_prompts(text_encoders, tokenizers, config, [captions[i] for i in missing])
            for j, i in enumerate(missing):
                entry = {"context": emb.context[j]}
                if emb.pooled is not None:
                    entry["pooled"] = emb.pooled[j]
                found[i] = {k: v.float() for k, v in entry.items()}
                self._write(paths[i], entry, identities[i])
        like = next(iter(text_encoders[-1].parameters()))  # encode_prompts' output dtype and device
        context = torch.stack([f["context"] for f in found]).to(like.device, like.dtype)
        pooled = torch.stack([f["pooled"] for f in found]).to(like.device, like.dtype) if "pooled" in found[0] else None
        return TextEmbeddings(context=context, pooled=pooled)


def open_cache(config, model, device: torch.device) -> EmbeddingCache | None:
    """The run's cache, or None when `config.cache_dir` is empty or the task is not diffusion."""
    if not getattr(config, "cache_dir", "") or config.task != "diffusion":
        return None
    return EmbeddingCache(config.cache_dir, model, mixed_precision=config.mixed_precision, device=device,
                          cache_text=not (config.train_text_encoders or config.lora_text_encoders))
