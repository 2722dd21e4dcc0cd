"""The on-disk latent / text-embedding cache (xldm.train.cache) on tiny models (CPU, fp32)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.config import TINY_SDXL_BASE
from xldm.conditioning import encode_prompts
from xldm.train.cache import EmbeddingCache, tensor_checksum
from xldm.train.config import preset
from xldm.train.loop import train
from xldm.train.diffusion import sample_generators

torch.set_num_threads(1)
# A hit returns the stored fp32 values of the same computation: exact (tolerance 0) within one batch layout.
# Across epochs a cached row was encoded beside other rows than the uncached run encodes it with; CPU kernels
# may then round differently, so whole-run losses are compared at 1e-6 relative (measured: identical).
LOSS_RTOL = 1e-6


def _batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"pixels": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, "keys": [f"k{i}" for i in range(n)],
            "captions": [f"a blue square number {i}" for i in range(n)],
            "target_size": torch.tensor([[64, 64]] * n), "crop_top_left": torch.zeros(n, 2, dtype=torch.int64),
            "original_size": torch.tensor([[64, 64]] * n)}


def _model():
    from tests.tiny_models import random_components

    return random_components(TINY_SDXL_BASE)


def _cache(tmp_path, model, precision: str = "no") -> EmbeddingCache:
    return EmbeddingCache(tmp_path / "cache", model, mixed_precision=precision, device=torch.device("cpu"))


def test_cache_returns_what_the_encoders_compute(tmp_path):
    model, batch = _model(), _batch()
    cache = _cache(tmp_path, model)
    gens = sample_generators(0, 3, range(3))
    first = cache.latents(model.vae, batch["pixels"], batch, gens)
    again = _cache(tmp_path, model).latents(model.vae, batch["pixels"], batch, sample_generators(0, 3, range(3)))
    with torch.no_grad():
        direct = model.vae.encode_latents(batch["pixels"], generator=sample_generators(0, 3, range(3)))
    assert (first - direct).abs().max().item() == 0.0 and (again - direct).abs().max().item() == 0.0
    reader = _cache(tmp_path, model)
    emb = reader.text_embeddings(model.text_encoders, model.tokenizers(), model.config, batch["captions"])
    emb = reader.text_embeddings(model.text_encoders, model.tokenizers(), model.config, batch["captions"])
    with torch.no_grad():
        ref = encode_prompts(model.text_encoders, model.tokenizers(), model.config, batch["captions"])
    assert (emb.context - ref.context).abs().max().item() == 0.0
    assert (emb.pooled - ref.pooled).abs().max().item() == 0.0
    assert reader.stats["text_misses"] == 3 and reader.stats["text_hits"] == 3
    assert len(list(cache.latent_dir.glob("*.safetensors"))) == 3  # one file per sample, no leftovers
    assert not list(cache.latent_dir.glob(".*.tmp"))


def test_one_weight_or_precision_change_invalidates(tmp_path):
    model, batch = _model(), _batch()
    base = _cache(tmp_path, model)
    base.posterior_moments(model.vae, batch["pixels"], batch)
    hit = _cache(tmp_path, model)
    hit.posterior_moments(model.vae, batch["pixels"], batch)
    assert hit.stats["latent_hits"] == 3 and hit.stats["latent_misses"] == 0
    # the smallest possible change of one VAE weight: its last bit
    weight = model.vae.decoder.conv_out.weight
    with torch.no_grad():
        weight.view(-1)[7] = torch.nextafter(weight.view(-1)[7], torch.tensor(1.0))
    changed = _cache(tmp_path, model)
    assert changed.vae_fingerprint != base.vae_fingerprint and changed.latent_dir != base.latent_dir
    assert changed.text_fingerprint == base.text_fingerprint  # the text encoders did not change
    changed.posterior_moments(model.vae, batch["pixels"], batch)
    assert changed.stats["latent_hits"] == 0 and changed.stats["latent_misses"] == 3
    bf16 = _cache(tmp_path, model, precision="bf16")
    assert bf16.vae_fingerprint != changed.vae_fingerprint and bf16.text_fingerprint != changed.text_fingerprint
    with torch.no_grad():
        te = model.text_encoders[0].state_dict()
        name = next(k for k in te if k.endswith("weight"))
        te[name].view(-1)[0] += 1e-3
    assert _cache(tmp_path, model).text_fingerprint != changed.text_fingerprint
    # a different crop or different pixels under the same key is a miss, not a stale hit
    moved = {**batch, "crop_top_left": torch.tensor([[0, 8]] * 3)}
    edited = {**batch, "pixels": batch["pixels"].clone()}
    edited["pixels"][0, 0, 0, 0] += 0.5
    other = _cache(tmp_path, model)
    other.posterior_moments(model.vae, moved["pixels"], moved)
    other.posterior_moments(model.vae, edited["pixels"], edited)
    assert other.stats["latent_hits"] == 2 and other.stats["latent_misses"] == 4  # rows 1, 2 of `edited` hit


def test_checksum_sees_every_element():
    t = torch.randn(1000)
    base = tensor_checksum(t)
    for index in (0, 1, 499, 999):  # a strided sample would miss most of these
        u = t.clone()
        u[index] = torch.nextafter(u[index], torch.tensor(10.0))
        assert tensor_checksum(u) != base
    swapped = t.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert tensor_checksum(swapped)[0] == base[0] and tensor_checksum(swapped)[1] != base[1]  # order counts


def test_corrupt_file_is_ignored_and_rebuilt(tmp_path):
    model, batch = _model(), _batch()
    cache = _cache(tmp_path, model)
    good = cache.posterior_moments(model.vae, batch["pixels"], batch)
    files = sorted(cache.latent_dir.glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    files[1].write_bytes(b"\x00" * 64)  # garbage
    again = _cache(tmp_path, model)
    with pytest.warns(RuntimeWarning, match="ignoring unreadable cache file"):
        rebuilt = again.posterior_moments(model.vae, batch["pixels"], batch)
    assert again.stats["corrupt"] == 2 and again.stats["latent_misses"] == 2 and again.stats["latent_hits"] == 1
    assert (rebuilt - good).abs().max().item() <= 1e-6  # re-encoded as a 2-row batch; measured 0
    third = _cache(tmp_path, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third.posterior_moments(model.vae, batch["pixels"], batch)
    assert third.stats["latent_hits"] == 3  # rewritten files read back without warnings


def test_cached_run_trains_like_uncached_run(tmp_path):
    from shapes_dataset import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", 4, size=64)
    base = preset("tiny-sdxl-base", data=str(data), steps=6, batch_size=2, checkpoint_every=100, device="cpu",
                  text_dropout=0.3, center_crop=True)  # 2 batches per epoch: epochs 2 and 3 hit the cache
    seen = {}
    plain = train(base.replace(out=str(tmp_path / "plain")), progress=False)
    cached = train(base.replace(out=str(tmp_path / "cached"), cache_dir=str(tmp_path / "cache")), progress=False,
                   on_step=lambda step, run: seen.update(run.cache.stats))
    assert seen["latent_hits"] == 8 and seen["latent_misses"] == 4  # 12 rows: 4 samples x 3 epochs
    assert seen["text_hits"] == 8 and seen["text_misses"] == 4
    assert np.allclose(cached.losses, plain.losses, rtol=LOSS_RTOL, atol=0), (cached.losses, plain.losses)
    assert cached.losses[-1] < cached.losses[0]


def test_fixed_crops_are_the_same_every_epoch(tmp_path):
    from xldm.train.data import TrainingBatches

    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # 96x64 images in a 64x64 bucket: the crop's left edge is free in [0, 32]
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"image {i}")
    buckets = [(64, 64)]
    crops: dict[str, set] = {}
    for fixed in (True, False):
        batches = iter(TrainingBatches(str(folder), buckets=buckets, batch_size=2, seed=3, fixed_crops=fixed))
        crops = {}
        for _ in range(8):  # 4 epochs
            b = next(batches)
            for key, crop in zip(b["keys"], b["crop_top_left"].tolist()):
                crops.setdefault(key, set()).add(tuple(crop))
        if fixed:
            assert all(len(c) == 1 for c in crops.values()), crops  # one crop per sample
            assert len({next(iter(c)) for c in crops.values()}) > 1  # seeded per sample, not one shared crop
        else:
            assert any(len(c) > 1 for c in crops.values())  # default: a fresh crop each epoch
