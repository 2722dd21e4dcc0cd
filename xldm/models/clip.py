"""CLIP text transformer: OpenAI CLIP ViT-L/14 (SDXL text encoder 1) and OpenCLIP ViT-H/bigG (encoder 2).

One class for both, configured by `TextEncoderConfig`.  Parameter names are the transformers layout that the SDXL
single-file checkpoint uses under `conditioner.embedders.0.transformer.`, so that part loads strictly; the
open_clip layout goes through `xldm.weights.keys_clip`.  Numerics follow transformers models/clip/modeling_clip.py
(`CLIPTextModel`, `CLIPTextModelWithProjection`): pre-LN blocks, causal attention without padding mask, pooled =
final-LN state at the EOS position (argmax of the ids, hub configs with eos_token_id 2), then `text_projection`.
Textual-inversion vectors (xldm.embeddings) live in an extra table of `CLIPTextEmbeddings` behind the vocabulary's ids.
An encoder with a pruned vocabulary (`TextEncoderConfig.kept_tokens`, made by `prune_vocabulary`) still takes CLIP
ids and maps each to its row, every id it does not keep to one fallback row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xldm.config import CLIP_VOCAB_SIZE, TextEncoderConfig


class CLIPTextOutput(NamedTuple):
    """For (B, L) ids: `hidden_states` (layers + 1 of (B, L, width); 0 = embeddings, i = block i's output, no final
    LN), `last_hidden_state` = final_layer_norm(hidden_states[-1]), `pooled` (B, projection_dim or width)."""

    hidden_states: tuple[torch.Tensor, ...]
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (transformers QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


def token_rows(cfg: TextEncoderConfig) -> torch.Tensor | None:
    """(49408,) int32 on the CPU: the embedding row of each CLIP id of a pruned vocabulary (kept id i -> its index
    in `cfg.kept_tokens`, every other id -> the fallback, the last row); None for the full vocabulary."""
    if not cfg.kept_tokens:
        return None
    rows = torch.full((CLIP_VOCAB_SIZE,), len(cfg.kept_tokens), dtype=torch.int32, device="cpu")
    rows[torch.tensor(cfg.kept_tokens, dtype=torch.long, device="cpu")] = torch.arange(
        len(cfg.kept_tokens), dtype=torch.int32, device="cpu")
    return rows


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings.  Attached textual-inversion vectors (`set_extra_tokens`) answer the ids from
    `input_vocab_size` on (49408 for a pruned vocabulary too), in attachment order (A1111
    modules/textual_inversion); they are a plain attribute, neither parameter nor buffer, so state dicts and strict
    loading do not see them.  The id -> row table of a pruned vocabulary follows from the config (which the weight
    file's header carries), so it is no buffer either; it is moved to the ids' device on first use."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # Position ids are made on the fly (no `position_ids` buffer; the loader drops it where checkpoints have one).
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        self.input_vocab_size = cfg.input_vocab_size
        self._rows = token_rows(cfg)
        self.extra_tokens: dict[str, torch.Tensor] = {}  # name -> (n, width)
        self._extra_table: torch.Tensor | None = None

    def set_extra_tokens(self, vectors: dict[str, torch.Tensor]) -> None:
        """Replace the attached vectors (name -> (n, width)); stored on the token embedding's device and dtype."""
        weight = self.token_embedding.weight
        for name, v in vectors.items():
            if v.dim() != 2 or v.shape[0] == 0 or v.shape[1] != weight.shape[1]:
                raise ValueError(f"extra token {name!r}: expected shape (n >= 1, {weight.shape[1]}), "
                                 f"found {tuple(v.shape)}")
        self.extra_tokens = {name: v.detach().to(device=weight.device, dtype=weight.dtype)
                             for name, v in vectors.items()}
        self._extra_table = torch.cat(list(self.extra_tokens.values())) if self.extra_tokens else None

    def placeholder_ids(self) -> dict[str, list[int]]:
        """name -> its consecutive ids (>= input_vocab_size), what the tokenizer puts where the name stands."""
        start, ids = self.input_vocab_size, {}
        for name, v in self.extra_tokens.items():
            ids[name], start = list(range(start, start + v.shape[0])), start + v.shape[0]
        return ids

    @property
    def num_ids(self) -> int:
        """Vocabulary size plus attached placeholder ids: input ids must lie below this."""
        extra = 0 if self._extra_table is None else self._extra_table.shape[0]
        return self.input_vocab_size + extra

    def rows_of(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input ids -> embedding rows: through the pruned vocabulary's table (ids from 49408 on, attached
        embeddings, follow the rows), unchanged for the full vocabulary."""
        if self._rows is None:
            return input_ids
        if self._rows.device != input_ids.device:
            self._rows = self._rows.to(input_ids.device)
        is_clip = input_ids < CLIP_VOCAB_SIZE
        rows = self._rows[input_ids.clamp(0, CLIP_VOCAB_SIZE - 1)].to(input_ids.dtype)
        return torch.where(is_clip, rows, input_ids - CLIP_VOCAB_SIZE + self.token_embedding.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = self.rows_of(input_ids)
        if self._extra_table is None:
            tokens = self.token_embedding(input_ids)
        else:
            vocab = self.token_embedding.num_embeddings
            is_extra = input_ids >= vocab
            tokens = self.token_embedding(input_ids.masked_fill(is_extra, 0))
            extra = self._extra_table.to(tokens)[(input_ids - vocab).clamp(min=0)]
            tokens = torch.where(is_extra[..., None], extra, tokens)
        return tokens + self.position_embedding(positions)[None]


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (all with bias)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads != 0:
            raise ValueError(f"text encoder width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim) = CLIPAttention.scale
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)
        self.exact_gelu = cfg.activation == "gelu"  # OpenCLIP H/bigG: erf GELU; OpenAI CLIP: quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h) if self.exact_gelu else quick_gelu(h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """The `text_model.` part of the checkpoint: embeddings, blocks, final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder for SD/SDXL: `forward(ids)` -> `CLIPTextOutput`; `context(output)` picks the
    cross-attention features the config asks for."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        # Present only for encoders whose pooled output is used (OpenCLIP bigG/H): Linear without bias.
        self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim > 0 else None

    def forward(self, input_ids: torch.Tensor) -> CLIPTextOutput:
        cfg = self.cfg
        if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"input_ids must have shape (batch, length <= {cfg.max_positions}), "
                             f"found {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, found dtype {input_ids.dtype}")
        if input_ids.device.type != "meta" and input_ids.numel() > 0:
            low, high = (int(v) for v in torch.aminmax(input_ids))  # one device sync; avoids CUDA index asserts
            limit = self.text_model.embeddings.num_ids
            if low < 0 or high >= limit:
                vocab = cfg.input_vocab_size
                attached = f" and {limit - vocab} attached embedding ids" if limit > vocab else ""
                raise ValueError(f"input_ids must lie in [0, {limit - 1}] (the vocabulary{attached}), "
                                 f"found values in [{low}, {high}]")
        input_ids = input_ids.long()
        tm = self.text_model
        h = tm.embeddings(input_ids)
        hidden_states = [h]
        for layer in tm.encoder.layers:
            h = layer(h)
            hidden_states.append(h)
        last = tm.final_layer_norm(h)
        # EOS position = argmax of the ids (EOS 49407 is the largest id; the first one wins on ties),
        # transformers CLIPTextModel with eos_token_id == 2 (SDXL hub configs), open_clip pool_type "argmax".
        # Placeholder ids of attached embeddings count as 0, so pooling stays at the real EOS (as A1111).
        # A pruned vocabulary pools on the CLIP ids too (before they become rows).
        eos = input_ids.masked_fill(input_ids >= cfg.input_vocab_size, 0).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(hidden_states=tuple(hidden_states), last_hidden_state=last, pooled=pooled)

    def context(self, output: CLIPTextOutput) -> torch.Tensor:
        """The (B, L, width) cross-attention features: `cfg.layer` ("penultimate" = hidden_states[-2], before the
        final LN, SDXL; "last" = hidden_states[-1]), through final_layer_norm iff `cfg.final_norm_on_hidden`
        (SD 1.x last layer + LN = last_hidden_state; SD 2.x penultimate + LN, ldm FrozenOpenCLIPEmbedder)."""
        h = output.hidden_states[-2] if self.cfg.layer == "penultimate" else output.hidden_states[-1]
        return self.text_model.final_layer_norm(h) if self.cfg.final_norm_on_hidden else h

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) in one call: what the SD/SDXL conditioner needs from this encoder."""
        out = self(input_ids)
        return self.context(out), out.pooled


def prune_vocabulary(encoder: CLIPTextModel, kept_tokens: Sequence[int]) -> CLIPTextModel:
    """A copy of `encoder` that keeps only the CLIP ids `kept_tokens` (BOS, EOS and the pad id are added): their
    embedding rows are gathered, in ascending id order, and one fallback row is appended, the mean of the kept rows,
    for every id it drops.  Every other tensor is copied, so on prompts whose ids are all kept the outputs are
    bit-identical to `encoder`'s.  An already pruned encoder can be pruned further (to a subset of its ids).
    Attached textual-inversion vectors come along."""
    cfg = encoder.cfg
    kept = sorted({int(i) for i in kept_tokens} | {CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1, cfg.pad_token_id})
    if kept[0] < 0 or kept[-1] >= CLIP_VOCAB_SIZE:
        raise ValueError(f"kept_tokens must be CLIP ids in [0, {CLIP_VOCAB_SIZE}), got values from {kept[0]} to "
                         f"{kept[-1]}")
    if cfg.kept_tokens and not set(kept) <= set(cfg.kept_tokens):
        lost = sorted(set(kept) - set(cfg.kept_tokens))
        raise ValueError(f"the encoder's vocabulary is already pruned and lacks {len(lost)} of the ids to keep "
                         f"(e.g. {lost[:5]}); prune the unpruned encoder instead")
    new_cfg = replace(cfg, vocab_size=len(kept) + 1, kept_tokens=tuple(kept))
    embeddings = encoder.text_model.embeddings
    table = embeddings.token_embedding.weight.detach()
    rows = embeddings.rows_of(torch.tensor(kept, device=table.device))
    gathered = table[rows]
    fallback = gathered.float().mean(dim=0, keepdim=True).to(table.dtype)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.cat([gathered, fallback])
    with torch.device("meta"):
        pruned = CLIPTextModel(new_cfg)
    pruned.load_state_dict(state, strict=True, assign=True)
    pruned.text_model.embeddings.set_extra_tokens(dict(embeddings.extra_tokens))
    return pruned.train(encoder.training).requires_grad_(any(p.requires_grad for p in encoder.parameters()))
