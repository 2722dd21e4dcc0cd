"""xldm CLIP text encoders and key maps vs transformers / diffusers (test-time oracles only).

Parity: transformers CLIPTextModel (tiny, quick_gelu) and CLIPTextModelWithProjection (tiny, gelu),
eager attention, random weights, configs from `clip_hf_config`; fp32 max abs diff <= 1e-4.
Key maps: diffusers' single-file converters as an independent oracle, both directions.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig  # noqa: E402
from transformers import CLIPTextModel as HFCLIPTextModel  # noqa: E402
from transformers import CLIPTextModelWithProjection as HFCLIPTextModelWithProjection  # noqa: E402

from xldm.config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H, TINY_CLIP_L, TINY_OPENCLIP_BIGG  # noqa: E402
from xldm.models.clip import CLIPTextModel  # noqa: E402
from xldm.tokenizer import CLIPTokenizer  # noqa: E402
from xldm.weights.keys_clip import (  # noqa: E402
    clip_config_from_hf,
    clip_hf_config,
    hf_normalize_keys,
    hf_to_open_clip,
    open_clip_to_hf,
)

TOL = 1e-4  # fp32 parity: max abs diff
PROMPTS = [
    "a photo of an astronaut riding a horse on mars, cinematic lighting",
    "wow!! amazing! a cat!",
    "",
    " ".join(["very detailed"] * 50),  # > 75 tokens: truncated, EOS in the last slot
]
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."


def _hf_config(cfg) -> CLIPTextConfig:
    return CLIPTextConfig.from_dict(clip_hf_config(cfg), attn_implementation="eager")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorm scales around 1) so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if ("layer_norm" in name and name.endswith("weight")) else 0.2 * noise)


def _hf_model(cfg, seed: int):
    cls = HFCLIPTextModelWithProjection if cfg.projection_dim > 0 else HFCLIPTextModel
    model = cls(_hf_config(cfg)).eval()
    _randomize(model, seed)
    return model


def _ids_both_paddings() -> torch.Tensor:
    ids = torch.cat([CLIPTokenizer(49407)(PROMPTS), CLIPTokenizer(0)(PROMPTS)])
    assert (ids == 0).any() and (ids[:, -1] == 49407).any()  # pad 0 rows and a truncated row present
    return ids


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY_CLIP_L, TINY_OPENCLIP_BIGG], ids=["clip-l-quick-gelu", "bigg-gelu-proj"])
def test_parity_with_transformers(cfg):
    hf = _hf_model(cfg, seed=0)
    mine = CLIPTextModel(cfg).eval()
    mine.load_state_dict(hf_normalize_keys(hf.state_dict()), strict=True)
    ids = _ids_both_paddings()
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = mine(ids)
    assert len(out.hidden_states) == cfg.layers + 1 == len(ref.hidden_states)
    ref_pooled = ref.text_embeds if cfg.projection_dim > 0 else ref.pooler_output
    diffs = {
        "penultimate": _max_diff(out.hidden_states[-2], ref.hidden_states[-2]),
        "all_hidden": max(_max_diff(a, b) for a, b in zip(out.hidden_states, ref.hidden_states)),
        "last_hidden_state": _max_diff(out.last_hidden_state, ref.last_hidden_state),
        "pooled": _max_diff(out.pooled, ref_pooled),
    }
    print(cfg.activation, diffs)
    assert all(d <= TOL for d in diffs.values()), diffs
    assert out.pooled.shape == (len(ids), cfg.projection_dim or cfg.width)
    # The pooled row is taken at argmax(ids): EOS (49407) also for "!"-padded rows whose pads are id 0.
    eos = ids.argmax(-1)
    assert torch.equal(ids[torch.arange(len(ids)), eos], torch.full((len(ids),), 49407))
    # Pooling is not trivially position-independent: a different position gives a different vector.
    assert _max_diff(out.last_hidden_state[:, 0], out.last_hidden_state[torch.arange(len(ids)), eos]) > 1e-2


def test_context_selects_configured_hidden_state():
    hf = _hf_model(TINY_OPENCLIP_BIGG, seed=1)
    ids = CLIPTokenizer(0)(PROMPTS)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        ln = hf.text_model.final_layer_norm
        cases = {  # (layer, final_norm_on_hidden) -> transformers tensor
            ("penultimate", False): ref.hidden_states[-2],  # SDXL
            ("last", True): ref.last_hidden_state,  # SD 1.x
            ("penultimate", True): ln(ref.hidden_states[-2]),  # SD 2.x (ldm FrozenOpenCLIPEmbedder)
            ("last", False): ref.hidden_states[-1],
        }
        for (layer, norm), expected in cases.items():
            cfg = replace(TINY_OPENCLIP_BIGG, layer=layer, final_norm_on_hidden=norm)
            mine = CLIPTextModel(cfg).eval()
            mine.load_state_dict(hf_normalize_keys(hf.state_dict()), strict=True)
            context, pooled = mine.encode(ids)
            assert _max_diff(context, expected) <= TOL, (layer, norm)
            assert _max_diff(pooled, ref.text_embeds) <= TOL


@pytest.mark.parametrize(
    "cfg, params, keys",
    [(CLIP_L, 123_060_480, 196), (OPENCLIP_BIGG, 694_659_840, 517)],
    ids=["clip-l", "openclip-bigg"],
)
def test_full_size_on_meta_matches_transformers(cfg, params, keys):
    with torch.device("meta"):
        mine = CLIPTextModel(cfg)
        cls = HFCLIPTextModelWithProjection if cfg.projection_dim > 0 else HFCLIPTextModel
        hf = cls(_hf_config(cfg))
    mine_sd, hf_sd = mine.state_dict(), hf_normalize_keys(hf.state_dict())
    assert sum(p.numel() for p in mine.parameters()) == params
    assert len(mine_sd) == keys
    assert not any("position_ids" in k for k in mine_sd)
    assert set(mine_sd) == set(hf_sd)
    assert all(mine_sd[k].shape == hf_sd[k].shape for k in mine_sd)
    # The forward also runs on meta (shapes only): (B, 77) ids -> context (B, 77, width).
    out = mine(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    assert mine.context(out).shape == (2, 77, cfg.width)
    assert out.pooled.shape == (2, cfg.projection_dim or cfg.width)


def test_open_clip_maps_against_diffusers_converter():
    hf = _hf_model(TINY_OPENCLIP_BIGG, seed=2)
    hf_sd = hf.state_dict()  # CLIPTextModelWithProjection: text_model.* + text_projection.weight
    oc = hf_to_open_clip(hf_sd, TINY_OPENCLIP_BIGG)
    w, layers = TINY_OPENCLIP_BIGG.width, TINY_OPENCLIP_BIGG.layers
    assert len(oc) == 12 * layers + 5  # + token, positional, ln_final w/b, text_projection (logit_scale dropped)
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * w, w)
    assert torch.equal(oc["text_projection"], hf_sd["text_projection.weight"].T)
    # diffusers' own open_clip -> HF converter on an original-file-like dict gives back the HF dict exactly.
    original = {OPEN_CLIP_PREFIX + k: v for k, v in oc.items()}
    original[OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    back = convert_open_clip_checkpoint(hf, original, prefix=OPEN_CLIP_PREFIX)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    # Our inverse agrees with diffusers on the original dict (logit_scale dropped) and round-trips exactly.
    ours = open_clip_to_hf({k[len(OPEN_CLIP_PREFIX):]: v for k, v in original.items()}, TINY_OPENCLIP_BIGG)
    assert set(ours) == set(hf_sd)
    assert all(torch.equal(ours[k], hf_sd[k]) for k in hf_sd)
    # The other direction: open_clip -> HF -> open_clip is the identity.
    again = hf_to_open_clip(ours, TINY_OPENCLIP_BIGG)
    assert set(again) == set(oc) and all(torch.equal(again[k], oc[k]) for k in oc)
    # q/k/v are views into in_proj (no copies); the projection is contiguous (safetensors-ready).
    in_proj = oc["transformer.resblocks.1.attn.in_proj_weight"]
    split = open_clip_to_hf(oc, TINY_OPENCLIP_BIGG)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        part = split[f"text_model.encoder.layers.1.self_attn.{name}.weight"]
        assert part.data_ptr() == in_proj.data_ptr() + i * w * w * in_proj.element_size()
    assert split["text_projection.weight"].is_contiguous() and oc["text_projection"].is_contiguous()
    # And the converted weights compute the same encoder as transformers.
    mine = CLIPTextModel(TINY_OPENCLIP_BIGG).eval()
    mine.load_state_dict(ours, strict=True)
    ids = CLIPTokenizer(0)(PROMPTS)
    with torch.no_grad():
        assert _max_diff(mine(ids).pooled, hf(ids).text_embeds) <= TOL


def test_clip_l_original_layout_against_diffusers_converter():
    # Our parameter names are the original file's CLIP-L names: diffusers strips the prefix and gets HF keys.
    mine = CLIPTextModel(TINY_CLIP_L).eval()
    _randomize(mine, seed=3)
    sd = mine.state_dict()
    original = {CLIP_L_PREFIX + k: v for k, v in sd.items()}
    original[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    converted = convert_ldm_clip_checkpoint(original)
    assert set(hf_normalize_keys(converted)) == set(sd)
    # transformers-5 CLIPTextModel has no `text_model.` prefix: load it strictly and compare outputs.
    hf = HFCLIPTextModel(_hf_config(TINY_CLIP_L)).eval()
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items() if "position_ids" not in k},
                       strict=True)
    ids = _ids_both_paddings()
    with torch.no_grad():
        ref, out = hf(ids, output_hidden_states=True), mine(ids)
    assert _max_diff(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    assert _max_diff(out.pooled, ref.pooler_output) <= TOL


def test_key_helpers():
    # hf_normalize_keys: prefix added where missing, position_ids dropped, text_projection untouched.
    sd = {"embeddings.position_ids": torch.zeros(1, 77), "embeddings.token_embedding.weight": torch.ones(1),
          "text_model.final_layer_norm.bias": torch.ones(2), "encoder.layers.0.mlp.fc1.weight": torch.ones(3),
          "text_projection.weight": torch.ones(4)}
    assert sorted(hf_normalize_keys(sd)) == [
        "text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.final_layer_norm.bias", "text_projection.weight"]
    # Strictness: unknown keys, wrong in_proj shapes, missing q/k/v parts, blocks beyond cfg.layers.
    with pytest.raises(ValueError, match="unknown"):
        open_clip_to_hf({"visual.proj": torch.zeros(1)}, TINY_OPENCLIP_BIGG)
    with pytest.raises(ValueError, match=r"\(144, 48\)"):
        open_clip_to_hf({"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(48, 48)}, TINY_OPENCLIP_BIGG)
    with pytest.raises(ValueError, match="block 7"):
        open_clip_to_hf({"transformer.resblocks.7.ln_1.weight": torch.zeros(48)}, TINY_OPENCLIP_BIGG)
    with pytest.raises(ValueError, match="incomplete"):
        hf_to_open_clip({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(48, 48)},
                        TINY_OPENCLIP_BIGG)


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_BIGG, TINY_CLIP_L, TINY_OPENCLIP_BIGG])
def test_hf_config_round_trip(cfg):
    d = clip_hf_config(cfg)
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (0, 2, 1)
    assert d["hidden_act"] == cfg.activation
    assert d["architectures"] == ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"]
    assert clip_config_from_hf(d) == cfg
    hf_cfg = _hf_config(cfg)
    hf_dims = (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads, hf_cfg.hidden_act)
    assert hf_dims == (cfg.width, cfg.layers, cfg.heads, cfg.activation)
    # SD 2.x usage is not in config.json: it comes as overrides.
    h = clip_config_from_hf(clip_hf_config(OPENCLIP_H), final_norm_on_hidden=True)
    assert h == OPENCLIP_H


def test_input_checks():
    model = CLIPTextModel(TINY_CLIP_L)
    with pytest.raises(ValueError, match=r"77.*\(2, 78\)"):
        model(torch.zeros(2, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(77,\)"):
        model(torch.zeros(77, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 49407\].*49408"):
        model(torch.full((1, 5), 49408))
    with pytest.raises(ValueError, match="-1"):
        model(torch.full((1, 5), -1))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 5))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_close_to_fp32(dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref_model = CLIPTextModel(TINY_OPENCLIP_BIGG).eval()
    _randomize(ref_model, seed=4)
    ids = _ids_both_paddings()
    with torch.no_grad():
        ref = ref_model(ids)
        half = CLIPTextModel(TINY_OPENCLIP_BIGG).to(device=device, dtype=dtype).eval()
        half.load_state_dict(ref_model.state_dict())
        out = half(ids.to(device))
    assert out.pooled.dtype == dtype and half.context(out).dtype == dtype
    # Relative to the output scale: bf16 keeps ~3 significant digits, fp16 ~3-4.
    scale = ref.pooled.abs().max().item()
    diff = _max_diff(out.pooled.float().cpu(), ref.pooled) / scale
    ref_ctx = ref.hidden_states[-2]
    ctx = _max_diff(out.hidden_states[-2].float().cpu(), ref_ctx) / ref_ctx.abs().max().item()
    print(dtype, device, f"relative pooled diff {diff:.2e}, context {ctx:.2e}")
    assert diff <= tol and ctx <= tol
