"""Prompts and micro-conditioning -> what the UNet takes: the cross-attention `context` and the `vector`.

SDXL (SDXL_SPEC 3.2, 3.4, 4; diffusers `StableDiffusionXLPipeline.encode_prompt` and `__call__`):

* context = cat([CLIP-L hidden_states[-2], bigG hidden_states[-2]], -1) (no final LayerNorm), (B, 77, 2048);
  the refiner uses bigG only (B, 77, 1280). SD 1.x: last layer + final LN; SD 2.x: penultimate + final LN
  (whatever each `TextEncoderConfig` says, through `CLIPTextModel.context`).
* pooled = bigG's projected EOS state (`text_embeds`), only for models with vector conditioning.
* vector = cat([pooled, fourier(each micro-conditioning scalar)]) (B, 2816) base / (B, 2560) refiner, with the
  scalars (orig_h, orig_w, crop_top, crop_left, target_h, target_w) or (..., aesthetic_score).

`sdxl_conditioning` reproduces what the diffusers pipelines hand the UNet for a classifier-free-guidance batch
`[negative..., positive...]`, quirks included (zeroed negatives, negative time ids, the base's row order).
Long prompts can be cut at 77 tokens ("truncate", as diffusers) or split into 75-token chunks ("chunk", as the
AUTOMATIC1111 webui); `weighting=True` reads the webui's "(word:1.2)" syntax (`xldm.prompt_weighting`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from xldm.config import ModelConfig
from xldm.models.layers import timestep_embedding
from xldm.prompt_weighting import BREAK, apply_token_weights, parse_weighted_prompt

LONG_PROMPT_MODES = ("truncate", "chunk")


@dataclass
class TextEmbeddings:
    """Encoded prompts: the cross-attention sequence and, for SDXL, the pooled text vector."""

    context: Tensor  # (B, L, context_dim); L = 77, or a multiple of 77 with chunking
    pooled: Tensor | None  # (B, pooled_dim) from the last encoder (bigG) when the model has vector conditioning


@dataclass
class Conditioning:
    """What one UNet call needs for a CFG batch `[negative..., positive...]` (or only the positives)."""

    context: Tensor  # (2B or B, L, context_dim)
    vector: Tensor | None  # (2B or B, adm_in_channels), or None for models without vector conditioning (SD 1.x/2.x)


# --- tokens and chunks ----------------------------------------------------------------------------------------

# One chunk of a prompt: up to (max_length - 2) token ids and their weights (before BOS/EOS/padding).
_Chunk = tuple[list[int], list[float]]


def _as_prompt_list(prompts: str | Sequence[str], name: str) -> list[str]:
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        raise ValueError(f"{name} is empty; expected a string or a non-empty list of strings")
    for p in batch:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be strings, found {type(p).__name__}")
    return batch


def _split_chunks(pieces: list[tuple[list[int], float] | None], size: int) -> list[_Chunk]:
    """Token pieces (None = BREAK) -> chunks of at most `size` tokens.

    As the webui: a full chunk is closed only when another token arrives, BREAK closes the current chunk (even an
    empty one), and a prompt always has at least one chunk.
    """
    chunks: list[_Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    for piece in pieces:
        if piece is None:
            chunks.append((tokens, weights))
            tokens, weights = [], []
            continue
        ids, weight = piece
        for token in ids:
            if len(tokens) == size:
                chunks.append((tokens, weights))
                tokens, weights = [], []
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def _prompt_chunks(tokenizer, prompts: list[str], *, long_prompts: str, weighting: bool) -> list[list[_Chunk]]:
    """Per prompt, its chunks for this tokenizer; "truncate" keeps the first chunk (= diffusers' truncation)."""
    size = tokenizer.max_length - 2  # room for BOS and EOS
    if weighting:
        parsed = [parse_weighted_prompt(p) for p in prompts]
        texts = [text for pieces in parsed for text, weight in pieces if (text, weight) != BREAK]
        token_lists = iter(tokenizer.tokenize_batch(texts)) if texts else iter(())
        all_pieces = [
            [None if (text, weight) == BREAK else (next(token_lists), weight) for text, weight in pieces]
            for pieces in parsed
        ]
    else:
        all_pieces = [[(ids, 1.0)] for ids in tokenizer.tokenize_batch(prompts)]
    chunks = [_split_chunks(pieces, size) for pieces in all_pieces]
    if long_prompts == "truncate":
        chunks = [c[:1] for c in chunks]
    return chunks


def _chunk_ids(tokenizer, chunks: list[list[_Chunk]], num_chunks: int) -> tuple[Tensor, Tensor]:
    """(B * num_chunks, max_length) ids `[BOS] + tokens + [EOS] + padding` and their weights (1 on BOS/EOS/pad);
    prompts with fewer chunks get empty ones (BOS, EOS, padding), as the webui pads a batch."""
    length = tokenizer.max_length
    ids = torch.full((len(chunks) * num_chunks, length), tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.ones(ids.shape, dtype=torch.float32)
    for b, prompt_chunks in enumerate(chunks):
        padded = prompt_chunks + [([], [])] * (num_chunks - len(prompt_chunks))
        for c, (tokens, token_weights) in enumerate(padded):
            row = b * num_chunks + c
            ids[row, : len(tokens) + 2] = torch.tensor([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id])
            weights[row, 1 : len(tokens) + 1] = torch.tensor(token_weights, dtype=torch.float32)
    return ids, weights


# --- text encoders --------------------------------------------------------------------------------------------

def _module_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters())
    return p.dtype, p.device


def _select_hidden(encoder: nn.Module, output, clip_skip: int | None, index: int) -> Tensor:
    """The encoder's cross-attention features, `clip_skip` more layers back (diffusers semantics:
    SDXL `hidden_states[-(clip_skip + 2)]`, SD 1.x `final_layer_norm(hidden_states[-(clip_skip + 1)])`)."""
    if not clip_skip:
        return encoder.context(output)
    cfg = encoder.cfg
    default = -2 if cfg.layer == "penultimate" else -1
    layer = default - clip_skip
    if -layer > len(output.hidden_states):  # diffusers allows going back as far as the embeddings (index 0)
        raise ValueError(
            f"clip_skip={clip_skip} goes past the embeddings of text encoder {index} "
            f"({cfg.layers} layers): expected at most {len(output.hidden_states) + default}"
        )
    h = output.hidden_states[layer]
    return encoder.text_model.final_layer_norm(h) if cfg.final_norm_on_hidden else h


def _check_encoders(text_encoders: Sequence[nn.Module], tokenizers: Sequence, config: ModelConfig) -> None:
    expected = len(config.text_encoders)
    if len(text_encoders) != expected:
        raise ValueError(f"{config.kind}: expected {expected} text encoder(s), found {len(text_encoders)}")
    if len(tokenizers) != expected:
        raise ValueError(f"{config.kind}: expected {expected} tokenizer(s), found {len(tokenizers)}")
    for i, (encoder, te_cfg) in enumerate(zip(text_encoders, config.text_encoders)):
        found = getattr(getattr(encoder, "cfg", None), "width", te_cfg.width)
        if found != te_cfg.width:
            raise ValueError(
                f"{config.kind}: text encoder {i} has width {found}, but the config expects {te_cfg.width}"
            )


def _count_chunks(tokenizers: Sequence, prompts: list[str], *, long_prompts: str, weighting: bool) -> int:
    return max(
        len(c)
        for tok in tokenizers
        for c in _prompt_chunks(tok, prompts, long_prompts=long_prompts, weighting=weighting)
    )


def _encode(text_encoders: Sequence[nn.Module], tokenizers: Sequence, config: ModelConfig, prompts: list[str], *,
            long_prompts: str, weighting: bool, clip_skip: int | None, num_chunks: int | None) -> TextEmbeddings:
    if long_prompts not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPT_MODES}, got {long_prompts!r}")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip must be None or an int >= 0, got {clip_skip!r}")
    _check_encoders(text_encoders, tokenizers, config)
    batch = len(prompts)
    per_encoder = [_prompt_chunks(t, prompts, long_prompts=long_prompts, weighting=weighting) for t in tokenizers]
    # One chunk count for all encoders and prompts, so their sequences line up (tokenizer 2 splits every "!"
    # into its own token, so its counts can be larger).
    n = max(len(c) for chunks in per_encoder for c in chunks)
    if num_chunks is not None:
        n = max(n, num_chunks)

    out_dtype, out_device = _module_dtype_device(text_encoders[-1])
    contexts: list[Tensor] = []
    pooled: Tensor | None = None
    for i, (encoder, tokenizer, chunks) in enumerate(zip(text_encoders, tokenizers, per_encoder)):
        ids, weights = _chunk_ids(tokenizer, chunks, n)
        _, device = _module_dtype_device(encoder)
        output = encoder(ids.to(device))
        hidden = _select_hidden(encoder, output, clip_skip, i)
        if weighting and bool((weights != 1).any()):
            hidden = apply_token_weights(hidden, weights)
        # (B * n, 77, D) -> (B, n * 77, D): the chunks of a prompt follow each other along the sequence.
        contexts.append(hidden.reshape(batch, n * hidden.shape[1], hidden.shape[2]).to(out_device))
        if i == len(text_encoders) - 1:
            # The pooled vector of the first chunk (as the webui; weights do not touch it).
            pooled = output.pooled.reshape(batch, n, -1)[:, 0]

    # diffusers casts the prompt embeddings to text_encoder_2's dtype (pipeline_stable_diffusion_xl.py:482).
    context = torch.cat(contexts, dim=-1).to(out_dtype)
    if context.shape[-1] != config.unet.context_dim:
        raise ValueError(
            f"{config.kind}: the text encoders give context width {context.shape[-1]}, but the UNet expects "
            f"{config.unet.context_dim}"
        )
    if config.unet.adm_in_channels > 0:
        expected = config.text_encoders[-1].projection_dim
        if pooled.shape[-1] != expected:
            raise ValueError(
                f"{config.kind}: pooled text width {pooled.shape[-1]} from the last text encoder, expected {expected}"
            )
        pooled = pooled.to(device=out_device, dtype=out_dtype)
    else:
        pooled = None
    return TextEmbeddings(context=context, pooled=pooled)


def encode_prompts(text_encoders: Sequence[nn.Module], tokenizers: Sequence | None, config: ModelConfig,
                   prompts: str | Sequence[str], *, long_prompts: str = "truncate", weighting: bool = False,
                   clip_skip: int | None = None) -> TextEmbeddings:
    """Encode prompts with the model's text encoders (in `config.text_encoders` order) and their tokenizers.

    * `long_prompts="truncate"`: `[BOS] + first 75 tokens + [EOS] + padding` (diffusers); `"chunk"`: every 75
      tokens form a chunk wrapped the same way, the chunks' features are concatenated along the sequence
      (L = 77 * chunks, padded with empty chunks to the longest prompt of the batch); pooled from the first chunk.
    * `weighting=True`: parse "(word:1.2)" etc. (`xldm.prompt_weighting`), weight the context, restore its mean
      per prompt and chunk; the pooled vector is not weighted. "BREAK" starts a new chunk (in "truncate" mode
      only the first chunk is kept, so text after a BREAK is dropped).
    * `clip_skip=k` takes the features k layers further back (diffusers' `clip_skip`: SDXL `hidden_states[-(k+2)]`).
    * `tokenizers=None` builds the matching `CLIPTokenizer` for each encoder config.

    The outputs are cast to the dtype of the last text encoder, on its device (as diffusers).
    """
    prompts = _as_prompt_list(prompts, "prompts")
    tokenizers = _default_tokenizers(config) if tokenizers is None else tuple(tokenizers)
    return _encode(tuple(text_encoders), tokenizers, config, prompts, long_prompts=long_prompts,
                   weighting=weighting, clip_skip=clip_skip, num_chunks=None)


def _default_tokenizers(config: ModelConfig) -> tuple:
    from xldm.tokenizer import CLIPTokenizer

    return tuple(CLIPTokenizer.for_encoder(te) for te in config.text_encoders)


def zero_embeddings_like(e: TextEmbeddings) -> TextEmbeddings:
    """All-zero embeddings of the same shapes: SDXL base's "no negative prompt" (`force_zeros_for_empty_prompt`)."""
    return TextEmbeddings(
        context=torch.zeros_like(e.context), pooled=None if e.pooled is None else torch.zeros_like(e.pooled)
    )


# --- micro-conditioning ---------------------------------------------------------------------------------------

def _pair(value, name: str) -> list[float]:
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or len(items) != 2 or not all(_is_number(v) for v in items):
        raise ValueError(f"{name} must be a pair of numbers (height, width) / (top, left), found {value!r}")
    return [float(v) for v in items]


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def micro_conditioning_ids(config: ModelConfig, *, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                           target_size: tuple[int, int] | None = None,
                           aesthetic_score: float | None = None) -> list[float]:
    """The scalars Fourier-embedded into the vector, in the model's order (SDXL paper Sec. 2.2, SDXL_SPEC 4).

    Sizes are (height, width). Base: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`;
    refiner: `[orig_h, orig_w, crop_top, crop_left, aesthetic_score]`. A value the model has no slot for, or a
    missing one it needs, is a ValueError.
    """
    names = config.micro_conditioning
    if not names:
        raise ValueError(f"{config.kind} has no micro-conditioning (no vector conditioning in its UNet)")
    if target_size is not None and "target_size" not in names:
        raise ValueError(f"{config.kind} has no target_size conditioning (it takes {', '.join(names)}); "
                         f"found target_size={target_size!r}")
    if aesthetic_score is not None and "aesthetic_score" not in names:
        raise ValueError(f"{config.kind} has no aesthetic_score conditioning (it takes {', '.join(names)}); "
                         f"found aesthetic_score={aesthetic_score!r}")
    values = {"original_size": original_size, "crop_top_left": crop_top_left,
              "target_size": target_size, "aesthetic_score": aesthetic_score}
    ids: list[float] = []
    for name in names:
        if name not in values:
            raise ValueError(f"{config.kind}: unknown micro-conditioning {name!r}")
        value = values[name]
        if value is None:
            raise ValueError(f"{config.kind} needs {name}, found None")
        if name == "aesthetic_score":
            if not _is_number(value):
                raise ValueError(f"aesthetic_score must be a finite number, found {value!r}")
            ids.append(float(value))
        else:
            ids.extend(_pair(value, name))
    return ids


def _num_micro_scalars(config: ModelConfig) -> int:
    return sum(1 if name == "aesthetic_score" else 2 for name in config.micro_conditioning)


def vector_conditioning(config: ModelConfig, pooled: Tensor, ids: Tensor) -> Tensor:
    """(B, adm_in_channels) = cat([pooled, fourier(id_1), ..., fourier(id_n)], -1).

    fourier = `timestep_embedding(id, config.micro_conditioning_dim)` ([cos | sin], diffusers
    `Timesteps(256, flip_sin_to_cos=True, shift=0)` on `time_ids.flatten()`, unet_2d_condition.py:906-922; sgm
    ConcatTimestepEmbedderND). The ids are embedded in float32 and the result is float32 (or wider), as diffusers
    concatenates before casting to the UNet dtype; the UNet casts it.
    """
    unet_width = config.unet.adm_in_channels
    if unet_width <= 0:
        raise ValueError(f"{config.kind} has no vector conditioning (UNet adm_in_channels = 0)")
    if pooled.ndim != 2:
        raise ValueError(f"pooled must have shape (B, width), found {tuple(pooled.shape)}")
    expected_pooled = config.text_encoders[-1].projection_dim
    if pooled.shape[1] != expected_pooled:
        raise ValueError(f"{config.kind}: pooled text width expected {expected_pooled}, found {pooled.shape[1]}")
    n_ids = _num_micro_scalars(config)
    if ids.ndim != 2 or ids.shape != (pooled.shape[0], n_ids):
        raise ValueError(
            f"{config.kind}: micro-conditioning ids expected shape ({pooled.shape[0]}, {n_ids}) "
            f"({', '.join(config.micro_conditioning)}), found {tuple(ids.shape)}"
        )
    dim = config.micro_conditioning_dim
    emb = timestep_embedding(ids.reshape(-1).to(pooled.device), dim).reshape(ids.shape[0], n_ids * dim)
    dtype = torch.promote_types(pooled.dtype, torch.float32)
    vector = torch.cat([pooled.to(dtype), emb.to(dtype)], dim=-1)
    if vector.shape[1] != unet_width:
        raise ValueError(
            f"{config.kind}: vector width {vector.shape[1]} (pooled {expected_pooled} + {n_ids} x {dim}), "
            f"but the UNet expects adm_in_channels {unet_width}"
        )
    return vector


# --- the whole conditioning of one sampling run ---------------------------------------------------------------

def sdxl_conditioning(model, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
                      height: int, width: int,
                      original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                      target_size: tuple[int, int] | None = None,
                      negative_original_size: tuple[int, int] | None = None,
                      negative_crop_top_left: tuple[int, int] = (0, 0),
                      negative_target_size: tuple[int, int] | None = None,
                      aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                      guidance: bool = True, force_zeros_for_empty_prompt: bool | None = None,
                      long_prompts: str = "truncate", weighting: bool = False, clip_skip: int | None = None,
                      tokenizers: Sequence | None = None) -> Conditioning:
    """Context and vector for one UNet call, exactly as the diffusers pipelines build them.

    `model` is a `xldm.models.components.Components` (its `config` and `text_encoders` are used; its tokenizers
    are `model.tokenizers()` unless `tokenizers` is given). With `guidance` the batch is `[negatives, positives]`
    (2B rows), else the B positives only. Sizes are (height, width); `height`/`width` are the output image size.

    SDXL base (`StableDiffusionXLPipeline`):
      * `negative_prompts=None` and `force_zeros_for_empty_prompt` (default True for "sdxl-base", False otherwise,
        the hub `model_index.json` values): negative context AND pooled are zeros; otherwise the negative prompts
        ("" when None) are encoded. A str is used for every row.
      * original_size / target_size default to (height, width). The negative time ids equal the positive ones
        unless BOTH negative_original_size and negative_target_size are given (then negative_crop_top_left counts).
      * diffusers' row order: time ids are `cat([neg, pos]).repeat(B, 1)`, i.e. rows alternate neg, pos, neg, pos
        while the text rows are `[neg]*B + [pos]*B` (visible only with B > 1 and distinct negative sizes).
    SDXL refiner (`StableDiffusionXLImg2ImgPipeline`, requires_aesthetics_score=True): ids are
      `[orig, crop, aesthetic_score]` and `[negative_orig (default orig), negative_crop, negative_aesthetic_score]`,
      in the block order `[neg]*B + [pos]*B`. It has no target size: passing one is a ValueError.
    SD 1.x / 2.x (`StableDiffusionPipeline`): vector None; the negative is "" when None. Size arguments are errors.

    `clip_skip` applies to the prompts only, not the negatives (as diffusers: the negative always uses the
    default layer). `aesthetic_score`s are ignored by models without that conditioning (the base).
    """
    config: ModelConfig = model.config
    prompts = _as_prompt_list(prompts, "prompts")
    batch = len(prompts)
    if negative_prompts is not None:
        negative_prompts = [negative_prompts] * batch if isinstance(negative_prompts, str) else \
            _as_prompt_list(negative_prompts, "negative_prompts")
        if len(negative_prompts) != batch:
            raise ValueError(f"negative_prompts: expected {batch} (one per prompt), found {len(negative_prompts)}")
    if not isinstance(height, int) or not isinstance(width, int) or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive ints, found {height!r} x {width!r}")
    if force_zeros_for_empty_prompt is None:
        force_zeros_for_empty_prompt = config.kind == "sdxl-base"

    text_encoders = tuple(model.text_encoders)
    tokenizers = tuple(model.tokenizers()) if tokenizers is None else tuple(tokenizers)
    zero_negative = guidance and negative_prompts is None and force_zeros_for_empty_prompt
    encode_negative = guidance and not zero_negative
    if encode_negative and negative_prompts is None:
        negative_prompts = [""] * batch

    # Positive and negative sequences must have the same length for the CFG batch.
    num_chunks = None
    if long_prompts == "chunk" and encode_negative:
        num_chunks = _count_chunks(tokenizers, prompts + negative_prompts, long_prompts=long_prompts,
                                   weighting=weighting)
    common = dict(long_prompts=long_prompts, weighting=weighting, num_chunks=num_chunks)
    positive = _encode(text_encoders, tokenizers, config, prompts, clip_skip=clip_skip, **common)
    if not guidance:
        negative = None
    elif zero_negative:
        negative = zero_embeddings_like(positive)
    else:
        negative = _encode(text_encoders, tokenizers, config, negative_prompts, clip_skip=None, **common)

    context = positive.context if negative is None else torch.cat([negative.context, positive.context])
    sizes = dict(original_size=original_size, crop_top_left=crop_top_left, target_size=target_size,
                 negative_original_size=negative_original_size, negative_crop_top_left=negative_crop_top_left,
                 negative_target_size=negative_target_size)
    if config.unet.adm_in_channels <= 0:
        given = [k for k, v in sizes.items() if v is not None and v != (0, 0)]
        if given:
            raise ValueError(f"{config.kind} has no micro-conditioning; found {', '.join(given)}")
        return Conditioning(context=context, vector=None)

    rows = _time_id_rows(config, batch, guidance, height=height, width=width, aesthetic_score=aesthetic_score,
                         negative_aesthetic_score=negative_aesthetic_score, **sizes)
    # diffusers builds the ids in the prompt dtype (pipeline_stable_diffusion_xl.py:746).
    ids = torch.tensor(rows, dtype=context.dtype, device=context.device)
    pooled = positive.pooled if negative is None else torch.cat([negative.pooled, positive.pooled])
    return Conditioning(context=context, vector=vector_conditioning(config, pooled, ids))


def _time_id_rows(config: ModelConfig, batch: int, guidance: bool, *, height: int, width: int,
                  original_size, crop_top_left, target_size, negative_original_size, negative_crop_top_left,
                  negative_target_size, aesthetic_score, negative_aesthetic_score) -> list[list[float]]:
    original_size = original_size or (height, width)
    if "aesthetic_score" in config.micro_conditioning:
        # StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score (pipeline_..._img2img.py:1307-1336).
        if negative_target_size is not None:
            raise ValueError(f"{config.kind} has no target_size conditioning; found negative_target_size="
                             f"{negative_target_size!r}")
        positive = micro_conditioning_ids(config, original_size=original_size, crop_top_left=crop_top_left,
                                          target_size=target_size, aesthetic_score=aesthetic_score)
        if not guidance:
            return [positive] * batch
        negative = micro_conditioning_ids(config, original_size=negative_original_size or original_size,
                                          crop_top_left=negative_crop_top_left,
                                          aesthetic_score=negative_aesthetic_score)
        return [negative] * batch + [positive] * batch
    # StableDiffusionXLPipeline (pipeline_stable_diffusion_xl.py:1132-1157).
    target_size = target_size or (height, width)
    positive = micro_conditioning_ids(config, original_size=original_size, crop_top_left=crop_top_left,
                                      target_size=target_size)
    if not guidance:
        return [positive] * batch
    if negative_original_size is not None and negative_target_size is not None:
        negative = micro_conditioning_ids(config, original_size=negative_original_size,
                                          crop_top_left=negative_crop_top_left, target_size=negative_target_size)
    else:
        negative = positive  # a lone negative size or crop is ignored, as in diffusers
    # cat([neg, pos]).repeat(B, 1): alternating rows, while the text rows are blocked [neg]*B + [pos]*B.
    return [negative, positive] * batch


__all__ = [
    "TextEmbeddings", "Conditioning", "encode_prompts", "zero_embeddings_like", "micro_conditioning_ids",
    "vector_conditioning", "sdxl_conditioning", "LONG_PROMPT_MODES",
]
