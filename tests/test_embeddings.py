"""Textual-inversion embeddings (xldm.embeddings) against diffusers' `load_textual_inversion`, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import random_components

from xldm.conditioning import encode_prompts, sampling_conditioning
from xldm.config import TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.embeddings import (
    EmbeddingError,
    add_embeddings,
    attached_embeddings,
    read_embedding,
    remove_embeddings,
)
from xldm.errors import CheckpointError
from xldm.prompt_weighting import apply_token_weights
from xldm.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, CLIPTokenizer
from xldm.weights.save import save_diffusers

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # fp32 parity tolerance, max abs difference
PROMPTS = ["a photo of myemb on a table", "myemb, a red cat!"]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def write(path, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def sdxl_vectors(seed: int = 7, n: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(n, 32, generator=g) * 0.5, "clip_g": torch.randn(n, 48, generator=g) * 0.5}


def pool_at_real_eos(*text_encoders) -> None:
    """The hub SDXL/SD configs say eos_token_id 2, so transformers pools at argmax(ids), which is an added token's
    id once an embedding is loaded.  With 49407 it pools at the first real EOS, as xldm and A1111 do."""
    for te in text_encoders:
        te.config.eos_token_id = EOS_ID
        for m in te.modules():
            if hasattr(m, "eos_token_id"):
                m.eos_token_id = EOS_ID


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    model = random_components(TINY_SDXL_BASE)
    return model, save_diffusers(model, tmp_path_factory.mktemp("base"))


def sdxl_pipe(folder, vectors, token="myemb"):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_textual_inversion(vectors["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pool_at_real_eos(pipe.text_encoder, pipe.text_encoder_2)
    return pipe


def test_read_embedding_formats(tmp_path):
    vectors = sdxl_vectors()
    emb = read_embedding(write(tmp_path / "myemb.safetensors", vectors))
    assert emb.name == "myemb" and emb.num_vectors == 2 and set(emb.vectors) == {"clip_l", "clip_g"}
    assert torch.equal(emb.vectors["clip_g"], vectors["clip_g"])
    half = read_embedding(write(tmp_path / "half.safetensors", {"emb_params": vectors["clip_l"].half()}))
    assert half.vectors["emb_params"].dtype == torch.float32 and half.num_vectors == 2
    single = read_embedding(write(tmp_path / "cat-toy.safetensors", {"<cat-toy>": vectors["clip_l"][:1]}))
    assert single.name == "cat-toy" and single.vectors["<cat-toy>"].shape == (1, 32)
    assert read_embedding(tmp_path / "myemb.safetensors", name="other").name == "other"


def test_sdxl_embedding_matches_diffusers(base_folder, tmp_path):
    model, folder = base_folder
    vectors = sdxl_vectors()
    pipe = sdxl_pipe(folder, vectors)
    with torch.no_grad():
        before = encode_prompts(model.text_encoders, model.tokenizers(), model.config, PROMPTS)
        keys = set(model.text_encoders[1].state_dict())
        add_embeddings(model, read_embedding(write(tmp_path / "myemb.safetensors", vectors)))
        try:
            assert attached_embeddings(model) == ["myemb"]
            assert set(model.text_encoders[1].state_dict()) == keys  # the table is no parameter or buffer
            tok1, tok2 = model.tokenizers()
            for ours_tok, ref_tok in ((tok1, pipe.tokenizer), (tok2, pipe.tokenizer_2)):
                assert ours_tok.tokenize("myemb") == [VOCAB_SIZE, VOCAB_SIZE + 1]
                ref_ids = ref_tok(pipe.maybe_convert_prompt(PROMPTS, ref_tok), padding="max_length", max_length=77,
                                  truncation=True, return_tensors="pt").input_ids
                assert torch.equal(ours_tok(PROMPTS), ref_ids)
            ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
            ours = encode_prompts(model.text_encoders, model.tokenizers(), model.config, PROMPTS)
            assert maxdiff(ours.context, ref) <= TOL and maxdiff(ours.pooled, ref_pooled) <= TOL
            assert maxdiff(ours.context, before.context) > 1e-2  # the vectors did change the prompt
            negatives = ["blurry", "myemb"]
            ref_pos, ref_neg, ref_pos_pooled, ref_neg_pooled = pipe.encode_prompt(
                PROMPTS, do_classifier_free_guidance=True, negative_prompt=negatives)
            cond = sampling_conditioning(model, PROMPTS, negatives, height=64, width=64)
            assert maxdiff(cond.context, torch.cat([ref_neg, ref_pos])) <= TOL
            assert maxdiff(cond.vector[:, :48], torch.cat([ref_neg_pooled, ref_pos_pooled])) <= TOL
        finally:
            assert remove_embeddings(model) == ["myemb"]
        after = encode_prompts(model.text_encoders, model.tokenizers(), model.config, PROMPTS)
    assert attached_embeddings(model) == []
    assert torch.equal(after.context, before.context) and torch.equal(after.pooled, before.pooled)
    assert model.tokenizers()[0].tokenize("myemb") == CLIPTokenizer().tokenize("myemb")


def test_sdxl_embedding_on_the_refiner_uses_clip_g(tmp_path):
    model = random_components(TINY_SDXL_REFINER, seed=1)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        save_diffusers(model, tmp_path / "refiner"), local_files_only=True, requires_aesthetics_score=True)
    vectors = sdxl_vectors(seed=3)
    pipe.load_textual_inversion(vectors["clip_g"], token="myemb", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pool_at_real_eos(pipe.text_encoder_2)
    add_embeddings(model, read_embedding(write(tmp_path / "myemb.safetensors", vectors)))
    assert torch.equal(model.text_encoders[0].text_model.embeddings.extra_tokens["myemb"], vectors["clip_g"])
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        ours = encode_prompts(model.text_encoders, model.tokenizers(), model.config, PROMPTS)
    assert maxdiff(ours.context, ref) <= TOL and maxdiff(ours.pooled, ref_pooled) <= TOL


@pytest.mark.parametrize("key", ["emb_params", "<sd-emb>"])
def test_sd15_single_tensor_embedding_matches_diffusers(tmp_path, key):
    model = random_components(TINY_SD15, seed=2)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        save_diffusers(model, tmp_path / "sd15"), local_files_only=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    pipe.load_textual_inversion(vectors, token="sdemb")
    pool_at_real_eos(pipe.text_encoder)
    add_embeddings(model, read_embedding(write(tmp_path / "sdemb.safetensors", {key: vectors})))
    prompts = ["sdemb style, a house", "a dog by sdemb"]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        ours = encode_prompts(model.text_encoders, model.tokenizers(), model.config, prompts)
    assert ours.pooled is None and maxdiff(ours.context, ref) <= TOL


def test_whole_words_only_and_both_padding_variants():
    ids = [VOCAB_SIZE, VOCAB_SIZE + 1]
    for pad in (EOS_ID, 0):
        plain, tok = CLIPTokenizer(pad), CLIPTokenizer(pad, embeddings={"myemb": ids, "my": [VOCAB_SIZE + 2]})
        assert tok.tokenize("MyEmb, cat") == ids + plain.tokenize(", cat")  # lowercased like every prompt
        assert tok.tokenize("wow! myemb") == plain.tokenize("wow!") + ids
        for text in ("myembx cat", "xmyemb", "mye mb", "cat"):
            assert tok.tokenize(text) == plain.tokenize(text)
        assert tok.tokenize("my myemb") == [VOCAB_SIZE + 2] + ids
        assert tok.tokenize_batch(["cat myemb", "dog"]) == [plain.tokenize("cat") + ids, plain.tokenize("dog")]
    with pytest.raises(ValueError, match="placeholder ids >= 49408"):
        CLIPTokenizer(embeddings={"myemb": [5]})


def test_weighted_and_chunked_embedding(base_folder, tmp_path):
    model, _ = base_folder
    add_embeddings(model, read_embedding(write(tmp_path / "myemb.safetensors", sdxl_vectors())))
    try:
        tok1, tok2 = model.tokenizers()
        te1, te2 = model.text_encoders
        with torch.no_grad():
            ours = encode_prompts(model.text_encoders, model.tokenizers(), model.config, ["(myemb:1.5), a cat"],
                                  weighting=True)
            hidden = []
            for tok, te, pad in ((tok1, te1, EOS_ID), (tok2, te2, 0)):
                body = [VOCAB_SIZE, VOCAB_SIZE + 1] + tok.tokenize(", a cat")
                ids = torch.tensor([[BOS_ID, *body, EOS_ID] + [pad] * (75 - len(body))])
                weights = torch.ones(1, 77)
                weights[0, 1:3] = 1.5
                hidden.append(apply_token_weights(te(ids).hidden_states[-2], weights))
            assert maxdiff(ours.context, torch.cat(hidden, -1)) <= 1e-6
            long = "cat " * 74 + "myemb"  # the name's two vectors straddle the 75-token chunk boundary
            chunked = encode_prompts(model.text_encoders, model.tokenizers(), model.config, [long],
                                     long_prompts="chunk")
            second = te2(torch.tensor([[BOS_ID, VOCAB_SIZE + 1, EOS_ID] + [0] * 74])).hidden_states[-2]
            assert chunked.context.shape == (1, 154, 80) and maxdiff(chunked.context[0, 77:, 32:], second[0]) <= 1e-6
    finally:
        remove_embeddings(model, "myemb")


def test_range_check_allows_only_attached_ids(base_folder, tmp_path):
    model, _ = base_folder
    te = model.text_encoders[0]
    with pytest.raises(ValueError, match=r"\[0, 49407\] \(the vocabulary\)"):
        te(torch.tensor([[BOS_ID, VOCAB_SIZE, EOS_ID]]))
    add_embeddings(model, read_embedding(write(tmp_path / "myemb.safetensors", sdxl_vectors())))
    try:
        te(torch.tensor([[BOS_ID, VOCAB_SIZE + 1, EOS_ID]]))
        with pytest.raises(ValueError, match="and 2 attached embedding ids"):
            te(torch.tensor([[BOS_ID, VOCAB_SIZE + 2, EOS_ID]]))
        te.to(torch.float64)  # the table follows the layer's dtype
        assert te(torch.tensor([[BOS_ID, VOCAB_SIZE, EOS_ID]])).pooled.dtype == torch.float64
    finally:
        te.to(torch.float32)
        remove_embeddings(model)


def test_bad_files_and_names_are_refused(base_folder, tmp_path):
    model, _ = base_folder
    sd1 = read_embedding(write(tmp_path / "sd1emb.safetensors", {"emb_params": torch.randn(2, 32)}))
    with pytest.raises(EmbeddingError, match=r"'sd1emb': text encoder 2 of sdxl-base needs vectors of width 48, "
                                             r"the file has 'emb_params' of width 32; it is for another model"):
        add_embeddings(model, sd1)
    big = read_embedding(write(tmp_path / "big.safetensors", {"emb_params": torch.randn(1, 768)}))
    with pytest.raises(EmbeddingError, match=r"width 768 \(CLIP ViT-L: SD 1.x, SDXL clip_l\)"):
        add_embeddings(model, [big])
    assert attached_embeddings(model) == []  # nothing attached when one fails
    nan = torch.randn(2, 48)
    nan[1, 3] = float("nan")
    cases = {
        "nan": ({"clip_l": torch.randn(2, 32), "clip_g": nan}, "'clip_g' holds NaN or infinite values"),
        "inf": ({"emb_params": torch.full((1, 32), float("inf"))}, "NaN or infinite"),
        "3d": ({"emb_params": torch.randn(1, 2, 32)}, r"2-D float .* found shape \(1, 2, 32\)"),
        "rows": ({"emb_params": torch.randn(0, 32)}, r"n >= 1, found shape \(0, 32\)"),
        "int": ({"emb_params": torch.zeros(2, 32, dtype=torch.int64)}, "of torch.int64"),
        "count": ({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(3, 48)}, "as many vectors"),
        "empty": ({}, "found 0 tensors"),
        "keys": ({"a": torch.randn(1, 32), "b": torch.randn(1, 32)}, r"found 2 tensors \['a', 'b'\]"),
    }
    for case, (tensors, message) in cases.items():
        with pytest.raises(EmbeddingError, match=message):
            read_embedding(write(tmp_path / f"{case}.safetensors", tensors))
    assert issubclass(EmbeddingError, CheckpointError)
    add_embeddings(model, read_embedding(write(tmp_path / "myemb.safetensors", sdxl_vectors())))
    with pytest.raises(EmbeddingError, match=r"\['nope'\]: not attached; attached are \['myemb'\]"):
        remove_embeddings(model, ["myemb", "nope"])
    assert remove_embeddings(model, "myemb") == ["myemb"]
