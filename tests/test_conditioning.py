"""Prompts and micro-conditioning -> UNet inputs, against the diffusers pipelines as the oracle.

Tiny random SDXL base / refiner / SD 1.5 models are written as diffusers folders and loaded by diffusers. We
compare with `pipe.encode_prompt`, `pipe._get_add_time_ids`, and with what the pipeline really hands its UNet
on the first denoising step (captured by hooks: `encoder_hidden_states` and the input of `unet.add_embedding`,
which is the vector). Tolerance: fp32, max abs diff <= 1e-4. Chunking and weighting have no diffusers
counterpart; their behaviour is checked exactly against our own encoder run on hand-built token ids.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from xldm.conditioning import (
    TextEmbeddings,
    encode_prompts,
    micro_ids,
    sampling_conditioning,
    vector_conditioning,
    zero_embeddings_like,
)
from xldm.config import TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER, ModelConfig
from xldm.models.clip import CLIPTextModel
from xldm.models.components import Components
from xldm.models.unet import UNet
from xldm.models.vae import AutoencoderKL
from xldm.prompt_weighting import BREAK, apply_token_weights, parse_weighted_prompt
from xldm.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from xldm.weights.save import save_diffusers

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # fp32 parity tolerance, max abs difference
LONG = "a photo of a red cat sitting on a green mat next to a blue dog " * 8  # > 75 tokens


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def random_components(config: ModelConfig, seed: int = 0) -> Components:
    """Tiny model with every tensor random (as tests/test_model_files.py)."""
    torch.manual_seed(seed)
    model = Components(config=config, unet=UNet(config.unet), vae=AutoencoderKL(config.vae),
                       text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders))
    with torch.no_grad():
        for module in model.modules().values():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return model.to(dtype=torch.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = random_components(TINY_SDXL_BASE)
    folder = save_diffusers(model, tmp_path_factory.mktemp("base"))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    model = random_components(TINY_SDXL_REFINER, seed=1)
    folder = save_diffusers(model, tmp_path_factory.mktemp("refiner"))
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder, local_files_only=True, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


class _Captured(Exception):
    pass


def unet_inputs(pipe, **call) -> dict:
    """Run the pipeline until its first UNet call reaches `add_embedding`; return what the UNet got."""
    got: dict = {}

    def on_unet(module, args, kwargs):
        got["context"] = kwargs["encoder_hidden_states"]
        got["added"] = kwargs["added_cond_kwargs"]

    def on_add_embedding(module, args):
        got["vector"] = args[0]
        raise _Captured

    hooks = [pipe.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
             pipe.unet.add_embedding.register_forward_pre_hook(on_add_embedding)]
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            pipe(output_type="latent", **call)
    finally:
        for h in hooks:
            h.remove()
    return got


# --- encode_prompts vs StableDiffusionXLPipeline.encode_prompt --------------------------------------------------

@pytest.mark.parametrize("prompts", [["a red apple!"], ["wow!! amazing!", LONG]], ids=["one", "two-long"])
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
def test_encode_prompts_matches_diffusers_base(base, prompts, clip_skip):
    model, pipe = base
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clip_skip=clip_skip)
        ours = encode_prompts(model.text_encoders, model.tokenizers(), model.config, prompts, clip_skip=clip_skip)
    assert ours.context.shape == (len(prompts), 77, 80)
    assert maxdiff(ours.context, ref) <= TOL
    assert maxdiff(ours.pooled, ref_pooled) <= TOL


def test_encode_prompts_matches_diffusers_refiner(refiner):
    model, pipe = refiner
    prompts = ["a castle at dusk", LONG]
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        ours = encode_prompts(model.text_encoders, None, model.config, prompts)
    assert ours.context.shape == (2, 77, 48)
    assert maxdiff(ours.context, ref) <= TOL
    assert maxdiff(ours.pooled, ref_pooled) <= TOL


def test_time_ids_match_diffusers(base, refiner):
    _, pipe = base
    ours = micro_ids(TINY_SDXL_BASE, dict(original_size=(512, 768), crop_top_left=(16, 32),
                                          target_size=(1024, 960))).tolist()
    ref = pipe._get_add_time_ids((512, 768), (16, 32), (1024, 960), dtype=torch.float32,
                                 text_encoder_projection_dim=48)
    assert ref.tolist() == ours == [[512.0, 768.0, 16.0, 32.0, 1024.0, 960.0]]
    _, pipe_r = refiner
    ours_pos = micro_ids(TINY_SDXL_REFINER, dict(original_size=(512, 768), crop_top_left=(16, 32),
                                                 aesthetic_score=7.5)).tolist()
    ours_neg = micro_ids(TINY_SDXL_REFINER, dict(original_size=(640, 640), crop_top_left=(0, 8),
                                                 aesthetic_score=2.0)).tolist()
    pos, neg = pipe_r._get_add_time_ids((512, 768), (16, 32), (64, 64), 7.5, 2.0, (640, 640), (0, 8), (64, 64),
                                        dtype=torch.float32, text_encoder_projection_dim=48)
    assert pos.tolist() == ours_pos and neg.tolist() == ours_neg
    assert ours_pos == [[512.0, 768.0, 16.0, 32.0, 7.5]]


# --- sdxl_conditioning vs what the pipelines feed the UNet --------------------------------------------------------

BASE_CASES = {
    "prompt-only-zeros": (dict(prompt="a red apple"), dict(prompts=["a red apple"], negative_prompts=None)),
    "prompt-and-negative": (dict(prompt="a red apple", negative_prompt="blurry, low quality"),
                            dict(prompts=["a red apple"], negative_prompts=["blurry, low quality"])),
    "empty-negative-encoded": (dict(prompt="a red apple", negative_prompt=""),
                               dict(prompts=["a red apple"], negative_prompts=[""])),
    "batch-of-two": (dict(prompt=["a red apple", "a blue pear!"], original_size=(32, 48), target_size=(72, 56)),
                     dict(prompts=["a red apple", "a blue pear!"], original_size=(32, 48), target_size=(72, 56))),
    # A lone negative size is ignored by diffusers (the negative ids stay the positive ones).
    "lone-negative-size-ignored": (dict(prompt="a red apple", negative_original_size=(256, 200)),
                                   dict(prompts=["a red apple"], negative_original_size=(256, 200))),
    "clip-skip": (dict(prompt="a red apple", negative_prompt="blurry", clip_skip=1),
                  dict(prompts=["a red apple"], negative_prompts=["blurry"], clip_skip=1)),
    "no-guidance": (dict(prompt=["a red apple", "a pear"], guidance_scale=1.0),
                    dict(prompts=["a red apple", "a pear"], guidance=False)),
}


# Distinct negative sizes with B = 2: diffusers' time-id rows alternate neg, pos, neg, pos (see
# test_batch_rows_are_conditioned_as_when_alone; xldm lays them out like the text rows).
NEGATIVE_SIZES = {
    "negative-sizes-row-order": (
        dict(prompt=["a red apple", "a blue pear"], negative_prompt=["ugly", "bad"], original_size=(128, 96),
             crops_coords_top_left=(4, 8), negative_original_size=(256, 200), negative_crops_coords_top_left=(12, 0),
             negative_target_size=(40, 80)),
        dict(prompts=["a red apple", "a blue pear"], negative_prompts=["ugly", "bad"], original_size=(128, 96),
             crop_top_left=(4, 8), negative_original_size=(256, 200), negative_crop_top_left=(12, 0),
             negative_target_size=(40, 80))),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_sdxl_conditioning_matches_base_pipeline(base, case):
    model, pipe = base
    call, kwargs = BASE_CASES[case]
    got = unet_inputs(pipe, height=64, width=64, num_inference_steps=1, guidance_scale=call.pop("guidance_scale", 5.0),
                      **call)
    with torch.no_grad():
        ours = sampling_conditioning(model, height=64, width=64, **kwargs)
    batch = 1 if isinstance(kwargs["prompts"], str) else len(kwargs["prompts"])
    rows = batch if kwargs.get("guidance") is False else 2 * batch
    assert ours.context.shape == (rows, 77, 80) and ours.vector.shape == (rows, 96)
    assert maxdiff(ours.context, got["context"]) <= TOL
    assert maxdiff(ours.vector, got["vector"]) <= TOL
    if case == "prompt-only-zeros":
        assert ours.context[0].abs().max().item() == 0.0 and ours.vector[0, :48].abs().max().item() == 0.0


REFINER_CASES = {
    "defaults-empty-negative-encoded": (dict(prompt="a castle"), dict(prompts=["a castle"])),
    "aesthetic-and-sizes-batch": (
        dict(prompt=["a castle", "a tower"], negative_prompt=["blurry", ""], aesthetic_score=7.25,
             negative_aesthetic_score=1.5, original_size=(300, 200), crops_coords_top_left=(8, 16),
             negative_original_size=(100, 90), negative_crops_coords_top_left=(2, 3)),
        dict(prompts=["a castle", "a tower"], negative_prompts=["blurry", ""], aesthetic_score=7.25,
             negative_aesthetic_score=1.5, original_size=(300, 200), crop_top_left=(8, 16),
             negative_original_size=(100, 90), negative_crop_top_left=(2, 3))),
    "no-guidance": (dict(prompt="a castle", guidance_scale=1.0), dict(prompts=["a castle"], guidance=False)),
}


@pytest.mark.parametrize("case", list(REFINER_CASES))
def test_sdxl_conditioning_matches_refiner_pipeline(refiner, case):
    model, pipe = refiner
    call, kwargs = REFINER_CASES[case]
    batch = len(kwargs["prompts"])
    torch.manual_seed(0)
    latents = torch.randn(batch, 4, 8, 8)  # a 4-channel image is taken as latents: height = width = 64
    got = unet_inputs(pipe, image=latents, strength=0.5, num_inference_steps=2,
                      guidance_scale=call.pop("guidance_scale", 5.0), **call)
    with torch.no_grad():
        ours = sampling_conditioning(model, height=64, width=64, **kwargs)
    rows = batch if kwargs.get("guidance") is False else 2 * batch
    assert ours.context.shape == (rows, 77, 48) and ours.vector.shape == (rows, 88)
    assert maxdiff(ours.context, got["context"]) <= TOL
    assert maxdiff(ours.vector, got["vector"]) <= TOL


def test_batch_rows_are_conditioned_as_when_alone(base):
    """Image i of a batch gets exactly the conditioning it gets alone, also with negative sizes: xldm's time-id
    rows are [neg]*B + [pos]*B like the text rows.  diffusers repeats the (neg, pos) pair B times
    (pipeline_stable_diffusion_xl.py:1157), so with B = 2 its negative of image 1 gets the positive sizes and its
    positive of image 0 the negative ones: its vector differs from ours in those rows, its context does not."""
    model, pipe = base
    call, kwargs = NEGATIVE_SIZES["negative-sizes-row-order"]
    got = unet_inputs(pipe, height=64, width=64, num_inference_steps=1, **call)
    with torch.no_grad():
        ours = sampling_conditioning(model, height=64, width=64, **kwargs)
        alone = [sampling_conditioning(model, height=64, width=64, **dict(kwargs, prompts=[p], negative_prompts=[n]))
                 for p, n in zip(kwargs["prompts"], kwargs["negative_prompts"])]
    for i, single in enumerate(alone):  # rows [neg 0, neg 1, pos 0, pos 1]
        assert maxdiff(ours.context[[i, 2 + i]], single.context) <= TOL
        assert maxdiff(ours.vector[[i, 2 + i]], single.vector) <= TOL
    assert maxdiff(ours.context, got["context"]) <= TOL
    assert got["added"]["time_ids"][:, 0].tolist() == [256.0, 128.0, 256.0, 128.0]  # the quirk is really there
    assert maxdiff(ours.vector[[0, 3]], got["vector"][[0, 3]]) <= TOL  # rows whose ids agree
    assert maxdiff(ours.vector[[1, 2]], got["vector"][[1, 2]]) > 0.1  # rows diffusers pairs with the other ids


def test_unet_output_with_our_conditioning_matches_diffusers(base):
    model, pipe = base
    call, kwargs = BASE_CASES["batch-of-two"]
    call, kwargs = dict(call, negative_prompt=["ugly", "bad"]), dict(kwargs, negative_prompts=["ugly", "bad"])
    got = unet_inputs(pipe, height=64, width=64, num_inference_steps=1, **call)
    with torch.no_grad():
        cond = sampling_conditioning(model, height=64, width=64, **kwargs)
        torch.manual_seed(3)
        x = torch.randn(4, 4, 8, 8)
        ref = pipe.unet(x, 981.0, encoder_hidden_states=got["context"], added_cond_kwargs=got["added"]).sample
        ours = model.unet(x, torch.tensor(981.0), cond.context, cond.vector)
    assert maxdiff(ours, ref) <= TOL


def test_force_zeros_override(base, refiner):
    model, _ = base
    with torch.no_grad():
        encoded = sampling_conditioning(model, "a cat", height=64, width=64, force_zeros_for_empty_prompt=False)
        empty = encode_prompts(model.text_encoders, None, model.config, [""])
        ref_model, _ = refiner
        zeroed = sampling_conditioning(ref_model, "a cat", height=64, width=64, force_zeros_for_empty_prompt=True)
    assert maxdiff(encoded.context[:1], empty.context) == 0.0
    assert maxdiff(encoded.vector[:1, :48], empty.pooled) == 0.0
    assert zeroed.context[0].abs().max().item() == 0.0 and zeroed.vector[0, :48].abs().max().item() == 0.0


# --- SD 1.5 and SD 2.1 ------------------------------------------------------------------------------------------

def test_sd15_matches_stable_diffusion_pipeline(tmp_path):
    model = random_components(TINY_SD15, seed=2)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        save_diffusers(model, tmp_path / "sd15"), local_files_only=True, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    prompts = ["a red apple", LONG]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        ours = encode_prompts(model.text_encoders, None, model.config, prompts)
        assert ours.pooled is None
        assert maxdiff(ours.context, ref) <= TOL
        # diffusers' SD clip_skip path (final_layer_norm(hidden_states[-(k + 1)])) reaches for
        # `text_encoder.text_model`, which transformers 5 no longer has; the same formula by hand:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        ref_skip = pipe.text_encoder.final_layer_norm(hidden)
        ours_skip = encode_prompts(model.text_encoders, None, model.config, prompts, clip_skip=1)
        assert maxdiff(ours_skip.context, ref_skip) <= TOL
        ref_pos, ref_neg = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)
        cond = sampling_conditioning(model, prompts, None, height=64, width=64)
    assert cond.vector is None
    assert maxdiff(cond.context, torch.cat([ref_neg, ref_pos])) <= TOL  # "" encoded for the missing negative
    with pytest.raises(ValueError, match="sd15 has no micro-conditioning; found original_size"):
        sampling_conditioning(model, prompts, height=64, width=64, original_size=(64, 64))


def test_sd21_penultimate_with_final_norm_matches_23_layer_transformers_encoder():
    # The SD 2.1 hub text encoder is OpenCLIP-H with its last layer dropped, read at last_hidden_state (final LN):
    # the same as our full encoder's penultimate layer + final LN (ldm FrozenOpenCLIPEmbedder(layer="penultimate")).
    transformers = pytest.importorskip("transformers")
    te_cfg = replace(TINY_SDXL_REFINER.text_encoders[0], final_norm_on_hidden=True)
    config = ModelConfig(kind="sd21", unet=replace(TINY_SD15.unet, context_dim=48, num_heads=-1,
                                                   num_head_channels=16, use_linear_in_transformer=True),
                         vae=TINY_SD15.vae, text_encoders=(te_cfg,), prediction_type="v")
    torch.manual_seed(4)
    te = CLIPTextModel(te_cfg)
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=te_cfg.vocab_size, hidden_size=te_cfg.width, intermediate_size=te_cfg.intermediate_size,
        num_hidden_layers=te_cfg.layers - 1, num_attention_heads=te_cfg.heads, max_position_embeddings=77,
        hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    last = f"text_model.encoder.layers.{te_cfg.layers - 1}."
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in te.state_dict().items()
                        if not k.startswith(last) and not k.startswith("text_projection")}, strict=True)
    prompts = ["a red apple!", "the sea"]
    with torch.no_grad():
        ours = encode_prompts([te], None, config, prompts)
        ref = hf(CLIPTokenizer.for_encoder(te_cfg)(prompts)).last_hidden_state
    assert ours.pooled is None
    assert maxdiff(ours.context, ref) <= TOL


# --- vector conditioning and width checks ------------------------------------------------------------------------

def test_vector_conditioning_layout_and_errors():
    pooled = torch.randn(2, 48)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 16, 4, 8, 64, 48]])
    vec = vector_conditioning(TINY_SDXL_BASE, pooled, ids)
    assert vec.shape == (2, 96) and torch.equal(vec[:, :48], pooled)
    # each id -> 8 dims [cos(4) | sin(4)], frequencies exp(-ln(1e4) * i / 4)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    expected = torch.cat([torch.cos(ids[1, 3] * freqs), torch.sin(ids[1, 3] * freqs)])
    assert maxdiff(vec[1, 48 + 3 * 8: 48 + 4 * 8], expected) <= 1e-6
    with pytest.raises(ValueError, match=r"pooled text width expected 48, found 32"):
        vector_conditioning(TINY_SDXL_BASE, torch.randn(2, 32), ids)
    with pytest.raises(ValueError, match=r"ids expected shape \(2, 5\).*found \(2, 6\)"):
        vector_conditioning(TINY_SDXL_REFINER, pooled, ids)
    with pytest.raises(ValueError, match="sd15 has no vector conditioning"):
        vector_conditioning(TINY_SD15, pooled, ids)


def test_micro_ids_errors():
    with pytest.raises(ValueError, match="sdxl-base has no aesthetic_score conditioning"):
        micro_ids(TINY_SDXL_BASE, dict(original_size=(64, 64), crop_top_left=(0, 0), target_size=(64, 64),
                                       aesthetic_score=6.0))
    with pytest.raises(ValueError, match="sdxl-refiner has no target_size conditioning"):
        micro_ids(TINY_SDXL_REFINER, dict(original_size=(64, 64), crop_top_left=(0, 0), target_size=(64, 64),
                                          aesthetic_score=6.0))
    with pytest.raises(ValueError, match="sdxl-base needs target_size, found None"):
        micro_ids(TINY_SDXL_BASE, dict(original_size=(64, 64), crop_top_left=(0, 0)))
    with pytest.raises(ValueError, match="sdxl-refiner needs aesthetic_score"):
        micro_ids(TINY_SDXL_REFINER, dict(original_size=(64, 64), crop_top_left=(0, 0)))
    with pytest.raises(ValueError, match="original_size must be a pair"):
        micro_ids(TINY_SDXL_BASE, dict(original_size=(64,), crop_top_left=(0, 0), target_size=(64, 64)))
    with pytest.raises(ValueError, match="sd15 has no micro-conditioning"):
        micro_ids(TINY_SD15, dict(original_size=(64, 64), crop_top_left=(0, 0)))


def test_mismatched_encoders_are_named(base, refiner):
    model, _ = base
    ref_model, _ = refiner
    # the refiner's bigG alone with the base config
    with pytest.raises(ValueError, match="sdxl-base: expected 2 text encoder"):
        encode_prompts(ref_model.text_encoders, ref_model.tokenizers(), model.config, ["a"])
    # the base's CLIP-L (width 32) where the refiner expects bigG (width 48)
    with pytest.raises(ValueError, match="text encoder 0 has width 32, but the config expects 48"):
        encode_prompts(model.text_encoders[:1], ref_model.tokenizers(), ref_model.config, ["a"])
    with pytest.raises(ValueError, match="sdxl-refiner has no target_size conditioning"):
        sampling_conditioning(ref_model, "a", height=64, width=64, target_size=(64, 64))
    with pytest.raises(ValueError, match="negative_prompts: expected 2"):
        sampling_conditioning(model, ["a", "b"], ["c"], height=64, width=64)


def test_zero_embeddings_like():
    e = TextEmbeddings(context=torch.randn(2, 77, 8, dtype=torch.float64), pooled=torch.randn(2, 4))
    z = zero_embeddings_like(e)
    assert z.context.shape == e.context.shape and z.context.dtype == torch.float64
    assert z.context.abs().sum().item() == 0.0 and z.pooled.abs().sum().item() == 0.0
    assert zero_embeddings_like(TextEmbeddings(context=e.context, pooled=None)).pooled is None


def test_dtypes_follow_the_last_text_encoder():
    torch.manual_seed(6)
    encoders = tuple(CLIPTextModel(te) for te in TINY_SDXL_BASE.text_encoders)
    encoders[0].to(torch.float32)
    encoders[1].to(torch.bfloat16)
    model = Components(config=TINY_SDXL_BASE, text_encoders=encoders)
    with torch.no_grad():
        cond = sampling_conditioning(model, ["a cat"], ["a dog"], height=64, width=64, original_size=(2047, 333))
        pooled = encode_prompts(encoders, None, TINY_SDXL_BASE, ["a cat"]).pooled
    # context in the last encoder's dtype (diffusers casts to text_encoder_2.dtype); the vector is built in
    # float32 from ids rounded to that dtype, as diffusers does before the UNet casts it.
    assert cond.context.dtype == torch.bfloat16 and cond.vector.dtype == torch.float32
    assert torch.equal(cond.vector[1, :48], pooled[0].float())
    ids = torch.tensor([[2047.0, 333, 0, 0, 64, 64]]).to(torch.bfloat16)  # 2047 -> 2048 in bfloat16
    assert torch.equal(cond.vector[1:, 48:], vector_conditioning(TINY_SDXL_BASE, pooled, ids)[:, 48:])


# --- long prompts: A1111-style chunks -----------------------------------------------------------------------------

def _wrap(tokens: list[int], pad: int) -> list[int]:
    return [BOS_ID, *tokens, EOS_ID] + [pad] * (75 - len(tokens))


def test_chunked_long_prompt(base):
    model, _ = base
    tok1, tok2 = model.tokenizers()
    words = ["red", "cat", "blue", "dog", "green", "tree", "house", "river", "moon", "star"]
    prompt = " ".join(words[i % 10] for i in range(150))
    t1, t2 = tok1.tokenize(prompt), tok2.tokenize(prompt)
    assert len(t1) == len(t2) == 150
    with torch.no_grad():
        e = encode_prompts(model.text_encoders, None, model.config, [prompt, "a cat"], long_prompts="chunk")
        assert e.context.shape == (2, 154, 80) and e.pooled.shape == (2, 48)
        te1, te2 = model.text_encoders
        ids1 = torch.tensor([_wrap(t1[:75], EOS_ID), _wrap(t1[75:], EOS_ID)])
        ids2 = torch.tensor([_wrap(t2[:75], 0), _wrap(t2[75:], 0)])
        o1, o2 = te1(ids1), te2(ids2)
        expected = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1).reshape(154, 80)
        assert maxdiff(e.context[0], expected) <= 1e-6
        assert maxdiff(e.pooled[0], o2.pooled[0]) <= 1e-6  # pooled from the first chunk
        # the short prompt: its first chunk as in truncate mode, then an empty chunk (BOS, EOS, padding)
        short = encode_prompts(model.text_encoders, None, model.config, ["a cat"])
        assert maxdiff(e.context[1, :77], short.context[0]) <= 1e-6
        empty = encode_prompts(model.text_encoders, None, model.config, [""])
        assert maxdiff(e.context[1, 77:], empty.context[0]) <= 1e-6
        # truncate mode keeps exactly the first chunk
        cut = encode_prompts(model.text_encoders, None, model.config, [prompt])
        assert maxdiff(cut.context[0], e.context[0, :77]) <= 1e-6


def test_chunk_mode_pads_negative_to_positive_length(base):
    model, _ = base
    with torch.no_grad():
        cond = sampling_conditioning(model, [LONG], ["blurry"], height=64, width=64, long_prompts="chunk")
        neg = encode_prompts(model.text_encoders, None, model.config, ["blurry"])
        zeros = sampling_conditioning(model, [LONG], None, height=64, width=64, long_prompts="chunk")
    n = cond.context.shape[1]
    assert n == 154 and zeros.context.shape == (2, 154, 80) and zeros.context[0].abs().max().item() == 0.0
    assert maxdiff(cond.context[0, :77], neg.context[0]) <= 1e-6


# --- weighting ----------------------------------------------------------------------------------------------------

R, S = 1.1, 1 / 1.1
PARSER_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a (b) c", [("a ", 1.0), ("b", R), (" c", 1.0)]),
    ("((b))", [("b", R * R)]),
    ("[b] c", [("b", S), (" c", 1.0)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("( b : -0.25 )", [(" b ", -0.25)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("[(a:1.5)]", [("a", 1.5 * S)]),
    ("(a [b])", [("a ", R), ("b", S * R)]),
    (r"\(x\) \[y\] a\\b", [(r"(x) [y] a\b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("(unclosed [too", [("unclosed ", R), ("too", R * S)]),
    ("a) b]", [("a) b]", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("(a:1.0) b", [("a b", 1.0)]),
    ("a BREAK (b) BREAK", [("a", 1.0), BREAK, ("b", R), BREAK]),
]


@pytest.mark.parametrize("prompt,expected", PARSER_CASES, ids=[c[0] or "empty" for c in PARSER_CASES])
def test_parse_weighted_prompt(prompt, expected):
    got = parse_weighted_prompt(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_weights_of_one_equal_unweighted(base):
    model, _ = base
    with torch.no_grad():
        plain = encode_prompts(model.text_encoders, None, model.config, ["a photo of a cat", LONG])
        weighted = encode_prompts(model.text_encoders, None, model.config, ["(a photo:1.0) of a cat", LONG],
                                  weighting=True)
    assert maxdiff(weighted.context, plain.context) == 0.0
    assert maxdiff(weighted.pooled, plain.pooled) == 0.0


def test_weighting_scales_tokens_and_restores_the_mean(base):
    model, _ = base
    with torch.no_grad():
        plain = encode_prompts(model.text_encoders, None, model.config, ["a cat on a mat"])
        weighted = encode_prompts(model.text_encoders, None, model.config, ["a (cat:1.5) on a [mat]"],
                                  weighting=True)
    w = torch.ones(77)
    w[2], w[5] = 1.5, 1 / 1.1  # BOS a cat on a mat EOS ...
    assert maxdiff(weighted.pooled, plain.pooled) == 0.0  # weights act on the context only
    for sl in (slice(0, 32), slice(32, 80)):  # each encoder's part separately
        u = plain.context[0, :, sl]
        v = weighted.context[0, :, sl]
        assert abs(v.mean().item() - u.mean().item()) <= 1e-6  # the mean is restored
        expected = u * w[:, None] * (u.mean() / (u * w[:, None]).mean())
        assert maxdiff(v, expected) <= 1e-5


def test_apply_token_weights_per_row_invariant():
    torch.manual_seed(5)
    h = torch.randn(3, 77, 16) + 0.5
    w = torch.rand(3, 77) + 0.5
    out = apply_token_weights(h, w)
    assert maxdiff(out.mean(dim=(1, 2)), h.mean(dim=(1, 2))) <= 1e-6
    ratio = out / (h * w[:, :, None])
    assert maxdiff(ratio, ratio[:, :1, :1].expand_as(ratio)) <= 1e-5  # one factor per row
    with pytest.raises(ValueError, match=r"weights must have shape \(3, 77\)"):
        apply_token_weights(h, w[:, :10])


def test_break_starts_a_new_chunk(base):
    model, _ = base
    with torch.no_grad():
        e = encode_prompts(model.text_encoders, None, model.config, ["a red cat BREAK a dog"], long_prompts="chunk",
                           weighting=True)
        first = encode_prompts(model.text_encoders, None, model.config, ["a red cat"])
        second = encode_prompts(model.text_encoders, None, model.config, ["a dog"])
    assert e.context.shape == (1, 154, 80)
    assert maxdiff(e.context[0, :77], first.context[0]) <= 1e-6
    assert maxdiff(e.context[0, 77:], second.context[0]) <= 1e-6
    assert maxdiff(e.pooled, first.pooled) <= 1e-6
