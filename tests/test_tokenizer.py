"""xldm.tokenizer vs transformers' CLIPTokenizer set up as the SDXL pipeline has it.

Oracle: transformers.CLIPTokenizer built from the same BPE file with its own vocabulary construction
(transformers' bytes_to_unicode), model_max_length=77, pad_token="!" for tokenizer 2, called with
padding="max_length", truncation=True. Comparison is exact equality of every id.
"""

from __future__ import annotations

import gzip
import random
import time
from importlib import resources

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPTokenizer as HFCLIPTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

import xldm.tokenizer as xtok  # noqa: E402
from xldm.config import OPENCLIP_BIGG, SDXL_BASE, TINY_CLIP_L, TINY_OPENCLIP_BIGG  # noqa: E402
from xldm.tokenizer import CLIPTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def oracle_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = resources.files("xldm").joinpath("data").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as raw, gzip.open(raw) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def hf_tokenizers(oracle_vocab_merges):
    vocab, merges = oracle_vocab_merges
    tok1 = HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok2 = HFCLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    return tok1, tok2


WORDS = [
    "a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "Cinematic", "LIGHTING", "4k", "8K",
    "hdr", "ultra-detailed", "masterpiece", "portrait", "woman's", "it's", "don't", "we're", "they've", "I'm",
    "you'll", "he'd", "ROCK'N'ROLL", "café", "naïve", "Ångström", "façade", "crème", "brûlée", "Straße", "Ελληνικά",
    "русский", "東京", "猫", "かわいい", "한국어", "日本語の文章", "🙂", "🚀🌌", "👩‍🚀", "❤️", "∑", "π", "½", "x²", "°C",
    "1234567", "3.14159", "1,000,000", "#hashtag", "@user", "user@example.com", "https://example.com/a?b=c&d=e",
    "(best quality:1.2)", "[cat|dog]", "{a,b}", "<lora:x:0.8>", "--ar", "16:9", "C++", "f(x)=y", "ЁЖ", "İstanbul",
    "e\u0301", "A\u030a", "ﬁ", "Ⅻ", "wow!", "hey!!", "!!", "!", "!?", "?!", "..!..", "!wow", "<|endoftext|>",
    "<|startoftext|>", "<|ENDOFTEXT|>", "a'b", "'s", "tab\there", "new\nline", "nbsp\u00a0space", "ideo\u3000space",
]
SEPARATORS = [" ", " ", " ", ", ", "  ", "\t", "\n", "   ", "! ", "!", " !! ", "...", "; ", "\u00a0", " - "]


def _varied_prompts() -> list[str]:
    rng = random.Random(1234)
    prompts = [
        "", " ", "   ", "!", "!!", "!!!", "wow!! amazing!", "wow!", "Hello, World!", "a photo of a cat",
        "A PHOTO OF A CAT", "  leading and trailing  ", "multiple     spaces\t\ttabs\n\nnewlines",
        "emoji only 🐱🐶🦄", "中文提示词，高质量，杰作", "日本語のプロンプト！", "full-width！exclamation",
        "numbers 0123456789 and 3.5mm, 2024-01-01", "it's what we've done, they'll say I'd", "<|endoftext|>!",
        "!leading bang", "trailing bang!", "mid!dle", "a!b!c!d", "! ! ! !", "!?!?!?", "wow!!!!!!!!!!!!!!!!",
        " ".join(["word"] * 80), " ".join(["beautiful!"] * 40), "!" * 100, "x" * 500,
        ", ".join(WORDS), "".join(WORDS),
    ]
    while len(prompts) < 240:
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        parts = []
        for _ in range(n):
            word = rng.choice(WORDS)
            if rng.random() < 0.2:
                word = word.upper() if rng.random() < 0.5 else word.title()
            parts.append(word + rng.choice(SEPARATORS))
        prompts.append("".join(parts))
    return prompts


PROMPTS = _varied_prompts()


def test_vocab_and_merges_equal_oracle(oracle_vocab_merges):
    vocab, merges = oracle_vocab_merges
    mine_vocab, mine_merges = xtok._load_vocab_and_merges()
    assert len(mine_vocab) == 49408 and len(mine_merges) == 48894
    assert mine_vocab == vocab
    assert mine_merges == merges
    assert mine_vocab["<|startoftext|>"] == 49406 and mine_vocab["<|endoftext|>"] == 49407 and mine_vocab["!"] == 0


def test_prompt_set_is_varied():
    assert len(PROMPTS) >= 200
    assert "" in PROMPTS
    assert sum("!" in p for p in PROMPTS) >= 50
    assert sum("!!" in p for p in PROMPTS) >= 10


@pytest.mark.parametrize("variant", [0, 1])
def test_padded_ids_equal_transformers(hf_tokenizers, variant):
    hf = hf_tokenizers[variant]
    mine = CLIPTokenizer(pad_token_id=(49407, 0)[variant])
    expected = hf(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    got = mine(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    mismatched = [PROMPTS[i] for i in range(len(PROMPTS)) if not torch.equal(got[i], expected[i])]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    # Some prompts were truncated (EOS in the last slot) and some padded: both paths exercised.
    assert int((got[:, -1] == 49407).sum()) > 10 and int((got[:, -1] == (49407, 0)[variant]).sum()) > 10


@pytest.mark.parametrize("variant", [0, 1])
def test_unpadded_tokenize_equals_transformers(hf_tokenizers, variant):
    hf = hf_tokenizers[variant]
    mine = CLIPTokenizer(pad_token_id=(49407, 0)[variant])
    expected = hf(PROMPTS, add_special_tokens=False, truncation=False).input_ids
    assert mine.tokenize_batch(PROMPTS) == expected
    assert [mine.tokenize(p) for p in PROMPTS[:40]] == expected[:40]
    assert max(len(ids) for ids in expected) > 200  # long prompts are not truncated by tokenize()


def test_bang_quirk_known_ids():
    # diffusers issue #4153: tokenizer 2 splits every "!" into id 0.
    tok1, tok2 = CLIPTokenizer(49407), CLIPTokenizer(0)
    assert tok2("wow!! amazing!")[0, :8].tolist() == [49406, 2781, 0, 0, 1370, 0, 49407, 0]
    assert tok1("wow!! amazing!")[0, :7].tolist() == [49406, 2781, 748, 1370, 256, 49407, 49407]
    assert tok1("")[0].tolist() == [49406] + [49407] * 76
    assert tok2("")[0].tolist() == [49406, 49407] + [0] * 75


def test_for_encoder_and_errors():
    assert CLIPTokenizer.for_encoder(TINY_CLIP_L).pad_token_id == 49407
    assert CLIPTokenizer.for_encoder(TINY_OPENCLIP_BIGG).pad_token_id == 0
    assert [CLIPTokenizer.for_encoder(te).pad_token_id for te in SDXL_BASE.text_encoders] == [49407, 0]
    assert CLIPTokenizer.for_encoder(OPENCLIP_BIGG)("a")[0, 3].item() == 0
    with pytest.raises(ValueError, match="49407"):
        CLIPTokenizer(pad_token_id=1)
    with pytest.raises(ValueError, match="non-empty"):
        CLIPTokenizer()([])
    with pytest.raises(TypeError):
        CLIPTokenizer().tokenize(None)  # type: ignore[arg-type]


def test_build_time_is_small():
    # Start-up cost: reading the BPE file and building both backends from scratch, once per process.
    xtok._bpe_model.cache_clear()
    xtok._backend.cache_clear()
    start = time.perf_counter()
    CLIPTokenizer(49407)
    CLIPTokenizer(0)
    built = time.perf_counter() - start
    start = time.perf_counter()
    CLIPTokenizer(0)
    cached = time.perf_counter() - start
    print(f"tokenizer build {built * 1e3:.1f} ms, cached construction {cached * 1e6:.1f} us")
    assert built < 2.0 and cached < 0.01
