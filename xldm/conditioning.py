"""The conditioner: prompts and micro-conditioning -> what the UNet takes, for sampling and for training.

This module is the only place that knows how the UNet's inputs are laid out (SDXL paper Sec. 2.1-2.2; diffusers
`StableDiffusionXLPipeline.encode_prompt`, `_get_add_time_ids`; sgm `GeneralConditioner`):

* context = the text encoders' features concatenated along channels, (B, 77, 2048) for the SDXL base (CLIP-L and
  bigG penultimate layers, no final LayerNorm), whatever each `TextEncoderConfig` says for other models;
* vector = cat([pooled bigG text, fourier(each micro-conditioning scalar)]) ((B, 2816) base, (B, 2560) refiner);
* the classifier-free-guidance batch is `[negative..., positive...]` (2B rows) and is combined by
  `Conditioning.model_fn` as u + g (c - u), side by side with where it is built (sgm `VanillaCFG`);
* training drops the caption (zero context and pooled) and the micro-conditioning embedding per sample
  (`training_conditioning`; sgm `ucg_rate`), never a cascade stage's augmentation level.

Long prompts can be cut at 77 tokens ("truncate", as diffusers) or split into 75-token chunks ("chunk", as the
AUTOMATIC1111 webui); `weighting=True` reads the webui's "(word:1.2)" syntax (`xldm.prompt_weighting`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from xldm.config import SCALAR_WIDTHS, ModelConfig
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
    """What one sampling run's UNet calls need: the CFG batch `[negative..., positive...]` when `guided`, else the
    positives only."""

    context: Tensor  # (2B or B, L, context_dim)
    vector: Tensor | None  # (2B or B, adm_in_channels), or None for models without vector conditioning (SD 1.x/2.x)
    guided: bool = False

    def model_fn(self, network: nn.Module, cfg: float, extra_channels: Tensor | None = None, control=None):
        """(x_in, t) -> network output for `xldm.diffusion.Denoiser`: a guided batch runs the network once on
        [x, x] and combines the halves as u + cfg (c - u) on the raw output, as diffusers' SDXL pipelines do.
        `extra_channels` (B rows) go after the sample along channels (`concat_channels`).  `control(x, t, context,
        vector)` -> ControlNet residuals or None (`xldm.controlnet.ControlStack`), on the whole (guided) batch and
        on the sample without the extra channels, as diffusers' ControlNet pipelines feed it."""
        guided = self.guided
        dtype = next(network.parameters()).dtype
        if extra_channels is not None and guided:
            extra_channels = torch.cat([extra_channels] * 2)

        def fn(x_in: Tensor, t: Tensor) -> Tensor:
            x = torch.cat([x_in] * 2) if guided else x_in
            residuals = None if control is None else control(x, t, self.context, self.vector)
            if extra_channels is not None:
                x = concat_channels(x, extra_channels)
            if residuals is None:
                out = network(x.to(dtype), t, self.context, self.vector)
            else:
                out = network(x.to(dtype), t, self.context, self.vector, control=residuals)
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + cfg * (text - uncond)
            return out

        return fn


def concat_channels(x: Tensor, extra: Tensor) -> Tensor:
    """cat([sample, extra], channels): the UNet input of a model conditioned by concatenation (a 9-channel
    inpainting UNet's mask and masked-image latents, a cascade SR stage's upsampled low-res image), in sampling and
    in training alike."""
    if extra.shape[0] != x.shape[0] or extra.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"the extra input channels {tuple(extra.shape)} and the sample {tuple(x.shape)} must have "
                         f"the same batch and size")
    return torch.cat([x, extra.to(x.dtype)], dim=1)


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
    """Token pieces (None = BREAK) -> chunks of at most `size` tokens.  As the webui: a full chunk closes only when
    another token arrives, BREAK closes the current one (even empty), a prompt has at least one chunk."""
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
        all_pieces = [[None if (text, weight) == BREAK else (next(token_lists), weight) for text, weight in pieces]
                      for pieces in parsed]
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
        raise ValueError(f"clip_skip={clip_skip} goes past the embeddings of text encoder {index} "
                         f"({cfg.layers} layers): expected at most {len(output.hidden_states) + default}")
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
            raise ValueError(f"{config.kind}: text encoder {i} has width {found}, but the config expects "
                             f"{te_cfg.width}")


def _count_chunks(tokenizers: Sequence, prompts: list[str], *, long_prompts: str, weighting: bool) -> int:
    return max(len(c) for tok in tokenizers
               for c in _prompt_chunks(tok, prompts, long_prompts=long_prompts, weighting=weighting))


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
        raise ValueError(f"{config.kind}: the text encoders give context width {context.shape[-1]}, but the UNet "
                         f"expects {config.unet.context_dim}")
    if config.unet.adm_in_channels > 0:
        expected = config.text_encoders[-1].projection_dim
        if pooled.shape[-1] != expected:
            raise ValueError(f"{config.kind}: pooled text width {pooled.shape[-1]} from the last text encoder, "
                             f"expected {expected}")
        pooled = pooled.to(device=out_device, dtype=out_dtype)
    else:
        pooled = None
    return TextEmbeddings(context=context, pooled=pooled)


def encode_prompts(text_encoders: Sequence[nn.Module], tokenizers: Sequence | None, config: ModelConfig,
                   prompts: str | Sequence[str], *, long_prompts: str = "truncate", weighting: bool = False,
                   clip_skip: int | None = None) -> TextEmbeddings:
    """Encode prompts with the model's text encoders (in `config.text_encoders` order) and tokenizers (None: the
    matching `CLIPTokenizer`s); outputs in the last encoder's dtype, on its device (as diffusers).

    * "truncate": `[BOS] + first 75 tokens + [EOS] + padding` (diffusers); "chunk": every 75 tokens a chunk wrapped
      the same way, concatenated along the sequence (L = 77 * chunks, the batch padded with empty chunks); the
      pooled vector is the first chunk's.
    * `weighting`: "(word:1.2)" etc. (`xldm.prompt_weighting`) weight the context, its mean restored per prompt and
      chunk; the pooled vector is not weighted; "BREAK" starts a new chunk (dropped in "truncate" mode).
    * `clip_skip=k`: k layers further back (diffusers' `clip_skip`: SDXL `hidden_states[-(k+2)]`)."""
    prompts = _as_prompt_list(prompts, "prompts")
    tokenizers = _default_tokenizers(config) if tokenizers is None else tuple(tokenizers)
    return _encode(tuple(text_encoders), tokenizers, config, prompts, long_prompts=long_prompts,
                   weighting=weighting, clip_skip=clip_skip, num_chunks=None)


def _default_tokenizers(config: ModelConfig) -> tuple:
    from xldm.tokenizer import CLIPTokenizer

    return tuple(CLIPTokenizer.for_encoder(te) for te in config.text_encoders)


def zero_embeddings_like(e: TextEmbeddings) -> TextEmbeddings:
    """All-zero embeddings of the same shapes: SDXL base's "no negative prompt" (`force_zeros_for_empty_prompt`)."""
    return TextEmbeddings(torch.zeros_like(e.context), None if e.pooled is None else torch.zeros_like(e.pooled))


# A cascade SR stage's augmentation level s in [0, 1] is embedded as 1000 s, the range of the diffusion timesteps
# the same sinusoids embed (our choice; Imagen conditions on it "similar to the timestep", Saharia et al. 2022,
# Sec. 2.4).
AUG_LEVEL_EMBED_SCALE = 1000.0
_NAMES = {2: "a pair of numbers (height, width) / (top, left)", 1: "a finite number"}


def micro_ids(config: ModelConfig, values: dict, batch: int = 1) -> Tensor:
    """(B, n) float32 scalars in `config.micro_conditioning` order (SDXL paper Sec. 2.2; diffusers
    `_get_add_time_ids`): base `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`, refiner
    `[orig_h, orig_w, crop_top, crop_left, aesthetic_score]`, a cascade SR stage `[..., 1000 * aug_level]`.

    Each value is one number / pair for every row, or one per row ((B,) or (B, 2) tensors, as a training batch has
    them).  A value the model has no slot for (given, not None), or a missing one it needs, is a ValueError."""
    names = config.micro_conditioning
    if not names:
        raise ValueError(f"{config.kind} has no micro-conditioning (no vector conditioning in its UNet)")
    for name, value in values.items():
        if value is not None and name not in names:
            raise ValueError(f"{config.kind} has no {name} conditioning (it takes {', '.join(names)}); "
                             f"found {name}={value!r}")
    columns = []
    for name in names:
        value, width = values.get(name), SCALAR_WIDTHS[name]
        if value is None:
            raise ValueError(f"{config.kind} needs {name}, found None")
        try:
            bad = isinstance(value, bool) or any(isinstance(v, bool) for v in value)
        except TypeError:
            bad = False
        try:
            t = torch.as_tensor(value, dtype=torch.float32).cpu()
        except (TypeError, ValueError, RuntimeError):
            bad, t = True, torch.zeros(0)
        if not bad and t.numel() == width:
            t = t.reshape(1, width).expand(batch, width)
        elif not bad and t.numel() == batch * width:
            t = t.reshape(batch, width)
        if bad or t.shape != (batch, width) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be {_NAMES[width]} (or one per image), found {value!r}")
        columns.append(t * AUG_LEVEL_EMBED_SCALE if name == "aug_level" else t)
    return torch.cat(columns, dim=1)


def vector_conditioning(config: ModelConfig, pooled: Tensor, ids: Tensor, keep_micro: Tensor | None = None) -> Tensor:
    """(B, adm_in_channels) = cat([pooled, fourier(id_1), ..., fourier(id_n)], -1).

    fourier = `timestep_embedding(id, config.micro_conditioning_dim)` ([cos | sin], diffusers
    `Timesteps(256, flip_sin_to_cos=True, shift=0)` on `time_ids.flatten()`, unet_2d_condition.py:906-922; sgm
    ConcatTimestepEmbedderND), in float32 or wider, as diffusers concatenates before the UNet casts.
    `keep_micro` (B,) bool zeroes the embeddings of the scalars of dropped rows (training), an "aug_level" never."""
    unet_width = config.unet.adm_in_channels
    if unet_width <= 0:
        raise ValueError(f"{config.kind} has no vector conditioning (UNet adm_in_channels = 0)")
    if pooled.ndim != 2:
        raise ValueError(f"pooled must have shape (B, width), found {tuple(pooled.shape)}")
    expected_pooled = config.text_encoders[-1].projection_dim
    if pooled.shape[1] != expected_pooled:
        raise ValueError(f"{config.kind}: pooled text width expected {expected_pooled}, found {pooled.shape[1]}")
    n_ids = config.num_scalars
    if ids.ndim != 2 or ids.shape != (pooled.shape[0], n_ids):
        raise ValueError(f"{config.kind}: micro-conditioning ids expected shape ({pooled.shape[0]}, {n_ids}) "
                         f"({', '.join(config.micro_conditioning)}), found {tuple(ids.shape)}")
    dim = config.micro_conditioning_dim
    emb = timestep_embedding(ids.reshape(-1).to(pooled.device), dim).reshape(ids.shape[0], n_ids * dim)
    if keep_micro is not None:
        kept = (n_ids - 1) * dim if config.micro_conditioning[-1] == "aug_level" else n_ids * dim
        mask = torch.ones_like(emb)
        mask[:, :kept] = keep_micro.to(emb)[:, None]
        emb = emb * mask
    dtype = torch.promote_types(pooled.dtype, torch.float32)
    return torch.cat([pooled.to(dtype), emb.to(dtype)], dim=-1)


def sampling_conditioning(model, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None,
                          *, height: int, width: int,
                          original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                          target_size: tuple[int, int] | None = None,
                          negative_original_size: tuple[int, int] | None = None,
                          negative_crop_top_left: tuple[int, int] = (0, 0),
                          negative_target_size: tuple[int, int] | None = None,
                          aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                          aug_level: float | None = None, guidance: bool = True,
                          force_zeros_for_empty_prompt: bool | None = None, long_prompts: str = "truncate",
                          weighting: bool = False, clip_skip: int | None = None,
                          tokenizers: Sequence | None = None) -> Conditioning:
    """Context and vector of one sampling run, as the diffusers pipelines build them.

    `model`: a `Components` (config, text encoders, tokenizers).  With `guidance` the batch is `[negatives,
    positives]` (2B rows), else the B positives.  Sizes are (height, width); `height`/`width` the output size.

    * No negative prompt and `force_zeros_for_empty_prompt` (default: the config's; SDXL base, cascade stages):
      negative context AND pooled are zeros; else the negatives ("" when None; a str for every row) are encoded.
      `clip_skip` applies to the prompts only (as diffusers).
    * SDXL base (`StableDiffusionXLPipeline`): original_size / target_size default to (height, width); the negative
      ids equal the positive ones unless BOTH negative_original_size and negative_target_size are given.
    * Refiner (`StableDiffusionXLImg2ImgPipeline`, requires_aesthetics_score): `[orig, crop, aesthetic_score]` and
      `[negative_orig (default orig), negative_crop, negative_aesthetic_score]`; a target size is an error;
      models without that conditioning ignore the scores.  A cascade SR stage takes `aug_level`; SD 1.x / 2.x
      have no vector, so size arguments are errors there.

    The ids are laid out `[neg]*B + [pos]*B` like the text rows, so image i of a batch is conditioned as when
    generated alone; diffusers repeats the pair (`add_time_ids.repeat(B, 1)`, pipeline_stable_diffusion_xl.py:1157),
    pairing some images with another row's time ids when the negative sizes differ; xldm does not copy that."""
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
        force_zeros_for_empty_prompt = config.force_zeros_for_empty_prompt
    names = config.micro_conditioning
    if not names:
        given = {"original_size": original_size, "target_size": target_size, "crop_top_left": crop_top_left,
                 "negative_original_size": negative_original_size, "negative_target_size": negative_target_size,
                 "negative_crop_top_left": negative_crop_top_left, "aug_level": aug_level}
        given = [k for k, v in given.items() if v is not None and v != (0, 0)]
        if given:
            raise ValueError(f"{config.kind} has no micro-conditioning; found {', '.join(given)}")
    elif "aesthetic_score" in names and negative_target_size is not None:
        raise ValueError(f"{config.kind} has no target_size conditioning; found negative_target_size="
                         f"{negative_target_size!r}")

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
    negative = None
    if zero_negative:
        negative = zero_embeddings_like(positive)
    elif encode_negative:
        negative = _encode(text_encoders, tokenizers, config, negative_prompts, clip_skip=None, **common)
    context = positive.context if negative is None else torch.cat([negative.context, positive.context])
    if not names:
        return Conditioning(context=context, vector=None, guided=guidance)

    original_size = original_size or (height, width)
    # what the model takes (an aesthetic score or size it has no slot for is the default, and dropped), plus what
    # was given for a slot it lacks (an error in `micro_ids`)
    pos_values = {"original_size": original_size, "crop_top_left": crop_top_left,
                  "target_size": target_size or (height, width), "aesthetic_score": aesthetic_score,
                  "aug_level": aug_level}
    pos_values = {k: v for k, v in pos_values.items() if k in names}
    pos_values.update({k: v for k, v in (("target_size", target_size), ("aug_level", aug_level))
                       if v is not None and k not in names})
    ids = micro_ids(config, pos_values, batch)
    pooled = positive.pooled
    if negative is not None:
        neg_values = pos_values
        if "aesthetic_score" in names:  # pipeline_stable_diffusion_xl_img2img.py `_get_add_time_ids`
            neg_values = dict(pos_values, original_size=negative_original_size or original_size,
                              crop_top_left=negative_crop_top_left, aesthetic_score=negative_aesthetic_score)
        elif negative_original_size is not None and negative_target_size is not None:
            neg_values = dict(pos_values, original_size=negative_original_size,
                              crop_top_left=negative_crop_top_left, target_size=negative_target_size)
        # (a lone negative size or crop is ignored, as in diffusers)
        ids = torch.cat([micro_ids(config, neg_values, batch), ids])
        pooled = torch.cat([negative.pooled, pooled])
    # diffusers builds the ids in the prompt dtype (pipeline_stable_diffusion_xl.py:746).
    vector = vector_conditioning(config, pooled, ids.to(device=context.device, dtype=context.dtype))
    return Conditioning(context=context, vector=vector, guided=guidance)


def training_conditioning(config: ModelConfig, text_encoders: Sequence, tokenizers: Sequence, batch: dict,
                          keep_text: Tensor, keep_micro: Tensor, *, device: torch.device,
                          train_text_encoders: bool = False, embeddings: TextEmbeddings | None = None
                          ) -> tuple[Tensor, Tensor | None]:
    """(context, vector) of a training batch, with conditioning dropout for classifier-free guidance.

    A dropped caption gives zero context and zero pooled text, the unconditional input of sampling
    (`force_zeros_for_empty_prompt`); a dropped micro-conditioning zeroes its Fourier embedding, as sgm's
    `ucg_rate` zeroes an embedder's output.  The scalars are the batch's own (what the data pipeline really did,
    SDXL paper Sec. 2.2), one row per sample.  Text encoders run under no_grad unless trained.  `embeddings`: the
    captions' `TextEmbeddings` computed already (the latent/text cache, xldm.train.cache)."""
    emb = embeddings
    if emb is None:
        with torch.set_grad_enabled(train_text_encoders and torch.is_grad_enabled()):
            emb = encode_prompts(text_encoders, tokenizers, config, list(batch["captions"]))
    keep_t = keep_text.to(device=device, dtype=emb.context.dtype)
    context = emb.context.to(device) * keep_t[:, None, None]
    if config.unet.adm_in_channels <= 0:
        return context, None
    pooled = emb.pooled.to(device) * keep_t[:, None]
    ids = micro_ids(config, {name: batch[name] for name in config.micro_conditioning}, context.shape[0])
    return context, vector_conditioning(config, pooled, ids.to(device), keep_micro=keep_micro.to(device))
