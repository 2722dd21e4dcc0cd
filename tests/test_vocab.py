"""Pruned text-encoder vocabularies (TextEncoderConfig.kept_tokens, xldm.models.clip.prune_vocabulary): CLIP ids in,
kept ids exact, every other id onto the fallback row, strict and self-describing in a single file."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from xldm.conditioning import encode_prompts
from xldm.config import TINY_CLIP_L, TINY_OPENCLIP_BIGG, TINY_SDXL_BASE, TextEncoderConfig
from xldm.embeddings import add_embeddings, read_embedding
from xldm.errors import CheckpointError
from xldm.lora.files import layer_names
from xldm.models.clip import CLIPTextModel, prune_vocabulary
from xldm.models.components import Components, prune_text_encoders
from xldm.tokenizer import BANG_ID, BOS_ID, EOS_ID, VOCAB_SIZE, CLIPTokenizer, kept_token_ids
from xldm.weights.detect import METADATA_KEY
from xldm.weights.io import open_checkpoint, save_file as save_weights
from xldm.weights.load import load_model
from xldm.weights.save import save_diffusers, save_single_file

CAPTIONS = ["red heart, twitter style", "grinning face with big eyes, google style",
            "waving hand, medium skin tone, twitter style, at the top left", "wow!! a red heart"]
KNOWN = ["a red heart", "waving hand, google style", "big red eyes!!", "wow!!"]  # every word among CAPTIONS'


def outputs_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states)) and torch.equal(a.pooled, b.pooled)


def random_text_encoders(seed: int) -> Components:
    """The tiny SDXL base's two text encoders, every tensor random (no UNet or VAE: fast)."""
    torch.manual_seed(seed)
    encoders = tuple(CLIPTextModel(te).eval().requires_grad_(False) for te in TINY_SDXL_BASE.text_encoders)
    with torch.no_grad():
        for p in (p for te in encoders for p in te.parameters()):
            p.copy_(torch.randn_like(p) * 0.05)
    return Components(config=TINY_SDXL_BASE, text_encoders=encoders)


@pytest.fixture(scope="module")
def model():
    return random_text_encoders(seed=3)


@pytest.fixture(scope="module")
def pruned(model):
    return prune_text_encoders(model, kept_token_ids(CAPTIONS))


def test_kept_ids_cover_both_padding_variants():
    kept = kept_token_ids(CAPTIONS)
    assert kept == sorted(set(kept)) and {BOS_ID, EOS_ID, BANG_ID} <= set(kept)
    for pad in (EOS_ID, BANG_ID):  # "!!" is one BPE token with EOS padding, two "!" (id 0) with "!" padding
        assert set(CLIPTokenizer(pad).tokenize("wow!!")) <= set(kept)
    assert len(kept) < 40


def test_pruned_outputs_are_bit_identical_on_kept_tokens(model, pruned):
    for full, small in zip(model.text_encoders, pruned.text_encoders):
        assert small.text_model.embeddings.token_embedding.num_embeddings == len(small.cfg.kept_tokens) + 1
        ids = CLIPTokenizer.for_encoder(full.cfg)(KNOWN)
        assert set(ids.unique().tolist()) <= set(small.cfg.kept_tokens)
        with torch.no_grad():
            assert outputs_equal(full(ids), small(ids))
    with torch.no_grad():  # the whole SDXL conditioning, both encoders, both paddings
        a = encode_prompts(model.text_encoders, model.tokenizers(), model.config, KNOWN)
        b = encode_prompts(pruned.text_encoders, pruned.tokenizers(), pruned.config, KNOWN)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_unknown_words_map_to_the_fallback_row(model, pruned):
    full, small = model.text_encoders[1], pruned.text_encoders[1]
    tok = CLIPTokenizer.for_encoder(small.cfg)
    ids_a = tok(["a zebra heart"])
    emb = small.text_model.embeddings
    fallback = emb.token_embedding.num_embeddings - 1
    unknown = [i for i in tok.tokenize("zebra xylophone") if i not in small.cfg.kept_tokens]
    assert unknown and emb.rows_of(torch.tensor(unknown)).tolist() == [fallback] * len(unknown)
    kept_rows = emb.token_embedding.weight[:-1]
    assert torch.allclose(emb.token_embedding.weight[-1], kept_rows.mean(0), atol=1e-6)
    with torch.no_grad():
        words = ("zebra", "tractor", "violin", "giraffe", "penguin", "hammer", "castle", "robot", "guitar", "pencil")
        singles = [w for w in words if len(t := tok.tokenize(w)) == 1 and t[0] not in small.cfg.kept_tokens]
        assert len(singles) >= 2, singles
        one, other = tok([f"a {singles[0]} heart"]), tok([f"a {singles[1]} heart"])
        assert (one != other).sum() == 1  # one unknown token each, in the same place: the same output
        assert outputs_equal(small(one), small(other))
        assert not torch.equal(small(ids_a).pooled, full(ids_a).pooled)  # the full table has zebra's own row
        any_ids = torch.randint(0, VOCAB_SIZE, (4, 77), generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(small(any_ids).pooled).all()  # no CLIP id is an error
    with pytest.raises(ValueError, match="must lie in"):
        small(torch.tensor([[BOS_ID, VOCAB_SIZE, EOS_ID]]))


def test_config_validation():
    kept = tuple(kept_token_ids(CAPTIONS))
    cfg = replace(TINY_OPENCLIP_BIGG, kept_tokens=kept, vocab_size=len(kept) + 1)
    assert cfg.input_vocab_size == VOCAB_SIZE and TINY_OPENCLIP_BIGG.input_vocab_size == VOCAB_SIZE
    with pytest.raises(ValueError, match="embedding rows"):
        replace(cfg, vocab_size=len(kept))
    with pytest.raises(ValueError, match="ascending"):
        replace(cfg, kept_tokens=kept[::-1])
    with pytest.raises(ValueError, match=r"lacks \[49407\]"):
        replace(cfg, kept_tokens=kept[:-1], vocab_size=len(kept))
    with pytest.raises(ValueError, match=r"lacks \[0\]"):  # "!" pads bigG
        replace(cfg, kept_tokens=kept[1:], vocab_size=len(kept))
    assert TextEncoderConfig(**dict(vars(cfg), kept_tokens=list(kept))) == cfg  # a JSON list becomes the tuple


def test_textual_inversion_on_a_pruned_encoder(model, pruned, tmp_path):
    g = torch.Generator().manual_seed(5)
    vectors = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 48, generator=g)}
    save_file(vectors, str(tmp_path / "myemb.safetensors"))
    emb = read_embedding(tmp_path / "myemb.safetensors")
    prompts = ["a myemb heart", "myemb, red heart!!"]
    full, small = random_text_encoders(seed=3), prune_text_encoders(model, kept_token_ids(CAPTIONS))
    add_embeddings(full, emb)
    add_embeddings(small, emb)
    for tok in small.tokenizers():  # placeholder ids follow CLIP's ids, as for the full vocabulary
        assert tok.tokenize("myemb") == [VOCAB_SIZE, VOCAB_SIZE + 1]
    with torch.no_grad():
        a = encode_prompts(full.text_encoders, full.tokenizers(), full.config, prompts)
        b = encode_prompts(small.text_encoders, small.tokenizers(), small.config, prompts)
        plain = encode_prompts(pruned.text_encoders, pruned.tokenizers(), pruned.config, prompts)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    assert not torch.equal(b.context, plain.context)  # the vectors are used
    # pruning an encoder with attached vectors keeps them
    again = prune_vocabulary(small.text_encoders[0], small.config.text_encoders[0].kept_tokens)
    assert list(again.text_model.embeddings.extra_tokens) == ["myemb"]


def test_lora_layer_names_unchanged(model, pruned):
    assert layer_names(pruned.config) == layer_names(model.config)


def test_single_file_round_trip_is_strict(model, pruned, tmp_path):
    path = save_single_file(pruned, tmp_path / "pruned.safetensors")
    stored = json.loads(open_checkpoint(path).metadata[METADATA_KEY])
    assert [te["kept_tokens"] for te in stored["text_encoders"]] == [list(c.kept_tokens)
                                                                      for c in pruned.config.text_encoders]
    loaded = load_model(path)
    assert loaded.config == pruned.config
    ids = CLIPTokenizer.for_encoder(TINY_CLIP_L)(KNOWN + ["zebra"])
    with torch.no_grad():
        assert outputs_equal(loaded.text_encoders[0](ids), pruned.text_encoders[0](ids))
    # a full-vocabulary file's header has no kept_tokens, as before
    full = save_single_file(model, tmp_path / "full.safetensors")
    assert "kept_tokens" not in open_checkpoint(full).metadata[METADATA_KEY]
    assert load_model(full).config == model.config
    # a header whose kept list disagrees with the table is refused before any tensor is read
    ckpt = open_checkpoint(path)
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys()}
    for te in stored["text_encoders"]:
        te["kept_tokens"], te["vocab_size"] = te["kept_tokens"][1:], te["vocab_size"] - 1
    bad = tmp_path / "bad.safetensors"
    save_weights(tensors, bad, metadata={METADATA_KEY: json.dumps(stored), "format": "pt"})
    with pytest.raises(CheckpointError, match="lacks|vocab_size"):
        load_model(bad)
    for te, c in zip(stored["text_encoders"], pruned.config.text_encoders):  # a consistent config, one row more
        te["kept_tokens"], te["vocab_size"] = sorted({1, *c.kept_tokens}), c.vocab_size + 1
    save_weights(tensors, bad, metadata={METADATA_KEY: json.dumps(stored), "format": "pt"})
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no diffusers form"):
        save_diffusers(pruned, tmp_path / "folder")
    assert not (tmp_path / "folder").exists()


def test_prune_further_and_refuse_lost_ids(pruned):
    te = pruned.text_encoders[1]
    smaller = prune_vocabulary(te, kept_token_ids(CAPTIONS[:1]))
    ids = CLIPTokenizer.for_encoder(te.cfg)(["red heart, twitter style"])
    with torch.no_grad():
        assert outputs_equal(smaller(ids), te(ids))
    with pytest.raises(ValueError, match="already pruned"):
        prune_vocabulary(te, kept_token_ids(["zebra"]))


def test_bundled_model_pruned_is_identical_on_kept_prompts(tmp_path):
    from conftest import load_script

    from xldm.config import DEFAULT_MODEL_PATH

    if not DEFAULT_MODEL_PATH.exists():
        pytest.skip("no bundled default model")
    script = load_script("scripts/default_model.py", "default_model_script")
    metadata = tmp_path / "data" / "metadata.jsonl"
    metadata.parent.mkdir()
    metadata.write_text("".join(json.dumps({"file_name": f"{i}.png", "text": t}) + "\n" for i, t in enumerate(CAPTIONS)))
    kept = kept_token_ids(script.vocabulary_texts(metadata.parent))
    sizes = script.prune_vocab([DEFAULT_MODEL_PATH], tmp_path / "out", kept)
    assert sizes["base.safetensors"] < DEFAULT_MODEL_PATH.stat().st_size
    full = load_model(DEFAULT_MODEL_PATH, components=["text_encoders"])
    small = load_model(tmp_path / "out" / "base.safetensors", components=["text_encoders"])
    assert [te.kept_tokens for te in small.config.text_encoders] == [tuple(kept)] * 2
    with torch.no_grad():
        a = encode_prompts(full.text_encoders, full.tokenizers(), full.config, KNOWN)
        b = encode_prompts(small.text_encoders, small.tokenizers(), small.config, KNOWN)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_v2_presets_fit_the_budget():
    from conftest import load_script

    from xldm.config import PRESETS

    script = load_script("scripts/default_model.py", "default_model_script")
    kept = 4467  # kept_token_ids of the default build's captions and every CLDR name and keyword
    sizes = {k: script.fp16_bytes(script.with_pruned_vocabulary(PRESETS[k], kept))
             for k in ("default-base", "default-refiner", "default-base-v2", "default-refiner-v2")}
    turbo_v2 = 2 * script.parameter_counts(PRESETS["default-base-v2"])["unet"]
    assert sizes["default-base-v2"] + sizes["default-refiner-v2"] + turbo_v2 < 40e6
    assert script.parameter_counts(PRESETS["default-base-v2"])["unet"] > 2 * script.parameter_counts(
        PRESETS["default-base"])["unet"]
    full = script.fp16_bytes(PRESETS["default-base"]) + script.fp16_bytes(PRESETS["default-refiner"])
    assert full - sizes["default-base"] - sizes["default-refiner"] > 11e6  # what pruning frees


def test_chunked_training_dry_run(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(root / "scripts" / "train_gpu_chunks.sh"), "--dry-run", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("--preset default-base-v2 ", "--preset default-refiner-v2-ft ", "prune-vocab",
                   "compose default-base-v2", "base-ft: not started", "dry run: nothing was run"):
        assert needle in out, needle
    assert not (tmp_path / "o" / "base").exists() and (tmp_path / "o" / "train.log").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pruned_encoder_on_cuda(model, pruned):
    full, small = model.text_encoders[1], pruned.text_encoders[1]
    ids = CLIPTokenizer.for_encoder(full.cfg)(KNOWN + ["a zebra"])
    with torch.no_grad():
        expected = small(ids)  # CPU
        small.cuda()
        got = small(ids.cuda())
        small.cpu()
    assert got.pooled.device.type == "cuda" and small.text_model.embeddings.rows_of(ids.cuda()).device.type == "cuda"
    assert torch.allclose(got.pooled.cpu(), expected.pooled, atol=1e-5)
