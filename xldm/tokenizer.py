"""CLIP byte-level BPE tokenizer, both SDXL padding variants, built offline on HF `tokenizers`.

The vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` in `xldm/data/` (MIT, data/LICENSE-CLIP-BPE.txt).
Ids equal transformers' `CLIPTokenizer` as the SDXL pipeline sets it up (and OpenAI CLIP `simple_tokenizer.py`):

* tokenizer 1 (CLIP ViT-L): padded with EOS `<|endoftext|>` (49407);
* tokenizer 2 (OpenCLIP bigG): padded with "!" (id 0), and because "!" is then a *special* token,
  every literal "!" in a prompt becomes its own id 0 instead of being BPE-merged
  (diffusers issue #4153: "wow!!" -> [2781, 0, 0], where open_clip gives [2781, 748]).

A batch is `[BOS] + first 75 tokens + [EOS] + padding` to 77 (`padding="max_length", truncation=True`).
A pruned text encoder (`TextEncoderConfig.kept_tokens`, `kept_token_ids`) takes these same ids and maps the ones it
does not keep to its fallback row (xldm.models.clip), so tokenizing never depends on the vocabulary kept.
Textual-inversion embeddings (`embeddings=`): where an embedding's name stands as whole words, its placeholder ids
replace the name's tokens (A1111 modules/textual_inversion `find_embedding_at_position`, longest name first)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from xldm.config import CLIP_VOCAB_SIZE, TextEncoderConfig

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
BANG_ID = 0  # "!" is the first printable byte in the byte-to-unicode table, hence id 0
VOCAB_SIZE = CLIP_VOCAB_SIZE
NUM_MERGES = 48894  # CLIP simple_tokenizer: lines[1 : 49152 - 256 - 2 + 1] of the BPE file
MAX_LENGTH = 77

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP's pre-tokenization pattern (OpenAI CLIP simple_tokenizer.py; same in transformers' CLIPTokenizer):
# special tokens, English contractions, letter runs, single digits, runs of other non-space symbols.
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_symbols() -> list[str]:
    """The 256 stand-ins for bytes of GPT-2/CLIP byte-level BPE, in vocabulary order: printable Latin-1 bytes
    ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 follow as code points 256, 257, ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _load_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (49408 tokens) and merges (48894) exactly as OpenAI CLIP builds them (`simple_tokenizer.py`)."""
    compressed = resources.files("xldm").joinpath("data").joinpath(_BPE_FILE).read_bytes()
    # Line 0 is a version header; CLIP keeps the first 48894 merges that follow. Only about a fifth of the
    # file is needed, so decompress just that much (start-up time).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip container
    head = inflater.decompress(compressed, 1 << 19)
    while head.count(b"\n") <= NUM_MERGES and not inflater.eof:
        head += inflater.decompress(inflater.unconsumed_tail, 1 << 18)
    lines = head.decode("utf-8", errors="replace").split("\n", NUM_MERGES + 1)
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{_BPE_FILE}: expected {NUM_MERGES} merge pairs, found a malformed file")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[EOS_TOKEN] != EOS_ID:
        raise ValueError(f"{_BPE_FILE}: built {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _bpe_model() -> BPE:
    vocab, merges = _load_vocab_and_merges()
    # Words end with "</w>" and pieces have no continuation prefix (CLIP's BPE); no dropout.
    return BPE(vocab=vocab, merges=merges, unk_token=EOS_TOKEN, end_of_word_suffix="</w>",
               continuing_subword_prefix="", fuse_unk=False)


@lru_cache(maxsize=2)
def _backend(split_bang: bool) -> Tokenizer:
    """A `tokenizers.Tokenizer` for CLIP, built once per process and variant (they share one BPE model)."""
    tokenizer = Tokenizer(_bpe_model())
    # CLIP normalization as in transformers' CLIPTokenizer: NFC, whitespace runs -> one space, lowercase.
    # (open_clip additionally runs ftfy + html.unescape; SDXL's diffusers pipeline does not.)
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    # Special tokens are matched in the raw text, before normalization (normalized=False), as in transformers.
    specials = [BOS_TOKEN, EOS_TOKEN] + (["!"] if split_bang else [])
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return tokenizer


@lru_cache(maxsize=2)
def _word_end_ids(split_bang: bool) -> frozenset[int]:
    """Ids that end a pre-tokenized word ("...</w>", specials): a name may start only right after one of them."""
    vocab = _backend(split_bang).get_vocab(with_added_tokens=False)
    return frozenset([i for token, i in vocab.items() if token.endswith("</w>")] + [BOS_ID, EOS_ID]
                     + ([BANG_ID] if split_bang else []))


def kept_token_ids(texts: Iterable[str]) -> list[int]:
    """The CLIP ids a pruned vocabulary (`TextEncoderConfig.kept_tokens`) needs for `texts`: every id either padding
    variant gives them ("!" is split off only with "!" padding, so the variants differ there), plus BOS, EOS and
    the "!" id 0 (a padding id), ascending."""
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
    kept = {BOS_ID, EOS_ID, BANG_ID}
    for split_bang in (False, True):
        for encoding in _backend(split_bang).encode_batch(texts, add_special_tokens=False):
            kept.update(encoding.ids)
    return sorted(kept)


class CLIPTokenizer:
    """Prompts -> (B, 77) CLIP token ids; `pad_token_id=49407` pads with EOS (SDXL tokenizer 1), `pad_token_id=0`
    with "!", splitting every literal "!" into id 0 (SDXL tokenizer 2, transformers with `pad_token="!"`)."""

    def __init__(self, pad_token_id: int = EOS_ID, max_length: int = MAX_LENGTH,
                 embeddings: Mapping[str, Sequence[int]] | None = None) -> None:
        if pad_token_id not in (EOS_ID, BANG_ID):
            raise ValueError(f"pad_token_id must be {EOS_ID} (EOS) or {BANG_ID} ('!'), got {pad_token_id}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS (>= 2), got {max_length}")
        self.pad_token_id, self.max_length = pad_token_id, max_length
        self.bos_token_id, self.eos_token_id = BOS_ID, EOS_ID
        self._tokenizer = _backend(split_bang=pad_token_id == BANG_ID)
        self.embeddings = {name: list(ids) for name, ids in (embeddings or {}).items()}  # name -> placeholder ids
        self._patterns: list[tuple[list[int], list[int]]] = []  # (name's tokens, ids), longest name first
        for name, ids in self.embeddings.items():
            tokens = self._tokenizer.encode(name, add_special_tokens=False).ids if isinstance(name, str) else []
            if not tokens or not ids or min(ids) < VOCAB_SIZE:
                raise ValueError(f"embedding {name!r}: expected a name with tokens and placeholder ids >= "
                                 f"{VOCAB_SIZE}, found tokens {tokens} and ids {ids}")
            self._patterns.append((tokens, ids))
        self._patterns.sort(key=lambda pattern: -len(pattern[0]))
        self._word_ends = _word_end_ids(pad_token_id == BANG_ID) if self._patterns else frozenset()

    @classmethod
    def for_encoder(cls, cfg: TextEncoderConfig,
                    embeddings: Mapping[str, Sequence[int]] | None = None) -> CLIPTokenizer:
        """The tokenizer that goes with a text encoder: padding from `cfg.pad_token_id`, length `cfg.max_positions`,
        and the encoder's attached embeddings (`CLIPTextEmbeddings.placeholder_ids()`)."""
        return cls(pad_token_id=cfg.pad_token_id, max_length=cfg.max_positions, embeddings=embeddings)

    def _insert_embeddings(self, tokens: list[int]) -> list[int]:
        if not self._patterns:
            return tokens
        out, i = [], 0
        while i < len(tokens):
            at_word_start = i == 0 or tokens[i - 1] in self._word_ends
            match = next((p for p in self._patterns if at_word_start and tokens[i : i + len(p[0])] == p[0]), None)
            if match is None:
                out.append(tokens[i])
                i += 1
            else:
                out += match[1]
                i += len(match[0])
        return out

    def tokenize(self, prompt: str) -> list[int]:
        """BPE ids of one prompt: no BOS/EOS, no padding, no truncation (e.g. for chunking long prompts)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._insert_embeddings(self._tokenizer.encode(prompt, add_special_tokens=False).ids)

    def tokenize_batch(self, prompts: list[str]) -> list[list[int]]:
        """`tokenize` for several prompts at once (the tokenizers library runs them in parallel)."""
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
        return [self._insert_embeddings(e.ids) for e in self._tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        """(B, max_length) int64 ids `[BOS] + first max_length-2 tokens + [EOS] + padding` (transformers
        `padding="max_length", truncation=True` with a BOS/EOS post-processor)."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise ValueError("prompts is empty; expected a string or a non-empty list of strings")
        ids = torch.full((len(batch), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(self.tokenize_batch(batch)):
            body = tokens[: self.max_length - 2]
            ids[row, : len(body) + 2] = torch.tensor([BOS_ID, *body, EOS_ID], dtype=torch.long)
        return ids  # type: ignore[return-value]

    def save_pretrained(self, folder) -> None:
        """Write the hub layout transformers' `CLIPTokenizer.from_pretrained` reads: vocab.json, merges.txt,
        tokenizer_config.json (model_max_length 77 and the pad token), special_tokens_map.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab, merges = _load_vocab_and_merges()
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
        pad = "!" if self.pad_token_id == BANG_ID else EOS_TOKEN
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad}
        config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.max_length,
                      do_lower_case=True, errors="replace", add_prefix_space=False)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def __repr__(self) -> str:
        extra = f", embeddings={sorted(self.embeddings)}" if self.embeddings else ""
        return f"CLIPTokenizer(pad_token_id={self.pad_token_id}, max_length={self.max_length}{extra})"
