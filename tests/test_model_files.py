"""Whole-model files: detection from shapes, single-file and diffusers round trips, strictness, CLI.

Oracles: diffusers' `StableDiffusionXLPipeline.from_pretrained` must load what xldm writes and compute
the same numbers (fp32, max abs diff <= 1e-4); xldm must load what diffusers writes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from xldm.cli import main as cli_main
from xldm.config import (
    SD15,
    SD21,
    SDXL_BASE,
    SDXL_REFINER,
    TINY_SD15,
    TINY_SDXL_BASE,
    TINY_SDXL_REFINER,
)
from xldm.errors import CheckpointError, PickleRefusedError, StateDictMismatchError, UnknownModelError
from xldm.models.clip import CLIPTextModel
from xldm.models.components import Components
from xldm.models.unet import UNet
from xldm.models.vae import AutoencoderKL
from xldm.weights.detect import detect_config, detect_kind
from xldm.weights.io import open_checkpoint, save_file
from xldm.weights.load import load_model, load_single_file
from xldm.weights.save import save_diffusers, save_single_file, single_file_state_dict

from tiny_models import random_components

TOL = 1e-4  # fp32 parity tolerance, max abs difference


def meta_components(config) -> Components:
    with torch.device("meta"):
        return Components(
            config=config,
            unet=UNet(config.unet),
            vae=AutoencoderKL(config.vae),
            text_encoders=tuple(CLIPTextModel(te) for te in config.text_encoders),
        )


def assert_same_tensors(a: Components, b: Components) -> None:
    ma, mb = a.modules(), b.modules()
    assert ma.keys() == mb.keys()
    for name in ma:
        sa, sb = ma[name].state_dict(), mb[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


# --- detection from shapes (full size, meta device: no memory) -------------------------------------


@pytest.mark.parametrize("preset", [SDXL_BASE, SDXL_REFINER, SD15, SD21], ids=lambda c: c.kind)
def test_detect_full_size_from_shapes(preset):
    shapes = {k: tuple(v.shape) for k, v in single_file_state_dict(meta_components(preset)).items()}
    assert detect_kind(shapes) == preset.kind
    assert detect_config(shapes) == preset


def test_official_key_counts_full_size():
    sd = single_file_state_dict(meta_components(SDXL_BASE))
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == 1680  # keys of sd_xl_base_1.0.safetensors (sgm layout)
    assert sum(k.startswith("first_stage_model.") for k in sd) == 248  # same file
    assert sum(k.startswith("conditioner.embedders.1.model.") for k in sd) == 389  # 390 in the file, less logit_scale
    refiner = single_file_state_dict(meta_components(SDXL_REFINER))
    assert sum(k.startswith("model.diffusion_model.") for k in refiner) == 1220


def test_detect_unet_only_and_unknown():
    shapes = {k: tuple(v.shape) for k, v in single_file_state_dict(meta_components(SDXL_REFINER)).items()
              if k.startswith("model.diffusion_model.")}
    assert detect_kind(shapes) == "sdxl-refiner"
    assert detect_config(shapes).unet == SDXL_REFINER.unet
    with pytest.raises(UnknownModelError, match="no known component prefix"):
        detect_kind({"foo.weight": (3, 3)})


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY_SDXL_BASE, TINY_SDXL_REFINER, TINY_SD15], ids=lambda c: "tiny-" + c.kind)
def test_single_file_and_diffusers_round_trip(tmp_path, config):
    model = random_components(config)
    single = save_single_file(model, tmp_path / "model.safetensors")
    loaded = load_model(single)
    assert loaded.config == config
    assert_same_tensors(model, loaded)
    folder = save_diffusers(loaded, tmp_path / "diffusers")
    again = load_model(folder)
    assert again.config.kind == config.kind
    assert again.config.unet == config.unet and again.config.vae == config.vae
    assert_same_tensors(model, again)
    # and back to a single file: same bytes of every tensor
    back = load_model(save_single_file(again, tmp_path / "back.safetensors"))
    assert_same_tensors(model, back)


def test_load_components_separately_and_dtype(tmp_path):
    model = random_components(TINY_SDXL_BASE)
    path = save_single_file(model, tmp_path / "m.safetensors")
    only_vae = load_model(path, components=["vae"], dtype=torch.bfloat16)
    assert only_vae.unet is None and only_vae.text_encoders == ()
    assert all(p.dtype == torch.bfloat16 for p in only_vae.vae.parameters())
    assert torch.equal(only_vae.vae.state_dict()["quant_conv.weight"],
                       model.vae.state_dict()["quant_conv.weight"].to(torch.bfloat16))
    with pytest.raises(ValueError, match="unknown components"):
        load_model(path, components=["unet", "refiner"])


# --- diffusers as the oracle ------------------------------------------------------------------------


def _tiny_inputs(config, batch=2, h=8, w=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, h, w, generator=g)
    t = torch.tensor([981.0, 501.0][:batch])
    ctx = torch.randn(batch, 77, config.unet.context_dim, generator=g)
    pooled = torch.randn(batch, config.text_encoders[-1].projection_dim, generator=g)
    n = config.unet.adm_in_channels - pooled.shape[1]
    ids = torch.tensor([[64.0, 96.0, 0.0, 8.0, 64.0, 96.0, 2.5][: n // config.micro_conditioning_dim]] * batch)
    return x, t, ctx, pooled, ids


def _vector(pooled, ids, dim):
    from xldm.models.layers import timestep_embedding

    emb = timestep_embedding(ids.flatten(), dim).reshape(ids.shape[0], -1)
    return torch.cat([pooled, emb], dim=-1)


def test_diffusers_loads_what_xldm_writes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = random_components(TINY_SDXL_BASE)
    folder = save_diffusers(model, tmp_path / "pipe")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    x, t, ctx, pooled, ids = _tiny_inputs(TINY_SDXL_BASE)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        ours = model.unet(x, t, ctx, _vector(pooled, ids, TINY_SDXL_BASE.micro_conditioning_dim))
        assert (ref - ours).abs().max().item() <= TOL
        img = torch.rand(1, 3, 64, 96) * 2 - 1
        ref_dec = pipe.vae.decode(pipe.vae.encode(img).latent_dist.mean).sample
        ours_dec = model.vae.decode(model.vae.encode(img).mean)
        assert (ref_dec - ours_dec).abs().max().item() <= TOL
        ids_tok = model.tokenizers()[1](["a red apple!"])
        ref_te = pipe.text_encoder_2(ids_tok, output_hidden_states=True)
        our_te = model.text_encoders[1](ids_tok)
        assert (ref_te.hidden_states[-2] - our_te.hidden_states[-2]).abs().max().item() <= TOL
        assert (ref_te.text_embeds - our_te.pooled).abs().max().item() <= TOL
    assert pipe.tokenizer_2(["a red apple!"], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt").input_ids.tolist() == ids_tok.tolist()


def test_xldm_loads_what_diffusers_writes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = random_components(TINY_SDXL_REFINER)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        save_diffusers(model, tmp_path / "a"), local_files_only=True)
    pipe.save_pretrained(tmp_path / "b")  # written by diffusers/transformers themselves
    loaded = load_model(tmp_path / "b")
    assert loaded.config.kind == "sdxl-refiner"
    assert_same_tensors(model, loaded)


# --- strictness and safety --------------------------------------------------------------------------


def _config_metadata(config) -> dict[str, str]:
    from xldm.weights.detect import METADATA_KEY, model_config_to_dict

    return {METADATA_KEY: json.dumps(model_config_to_dict(config))}


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_are_refused_by_name(tmp_path, dtype):
    """A weight stored as an integer or bool tensor is named, not handed to torch's loader (whose error lists
    every parameter); the same for a --vae file."""
    model = random_components(TINY_SDXL_BASE)
    sd = single_file_state_dict(model)
    key = next(k for k in sd if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight"))
    bad = dict(sd, **{key: sd[key].to(dtype)})
    save_file(bad, tmp_path / "int.safetensors", metadata=_config_metadata(TINY_SDXL_BASE))
    found = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"UNet: 1 tensor\(s\) of the wrong kind.*proj_in.weight \({found}\)"):
        load_model(tmp_path / "int.safetensors")
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae["decoder.conv_in.weight"] = vae["decoder.conv_in.weight"].to(dtype)
    save_file(vae, tmp_path / "vae.safetensors")
    from xldm.weights.load import load_vae

    with pytest.raises(CheckpointError, match=rf"decoder.conv_in.weight \({found}\)"):
        load_vae(tmp_path / "vae.safetensors")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    model = random_components(TINY_SDXL_BASE)
    sd = single_file_state_dict(model)
    meta = _config_metadata(TINY_SDXL_BASE)
    extra = dict(sd, **{"model.diffusion_model.bogus.weight": torch.zeros(2), "surprise.key": torch.zeros(1)})
    save_file(extra, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises((CheckpointError, StateDictMismatchError)) as e:
        load_model(tmp_path / "extra.safetensors")
    assert "surprise.key" in str(e.value)
    del extra["surprise.key"]
    save_file(extra, tmp_path / "extra2.safetensors", metadata=meta)
    with pytest.raises(StateDictMismatchError, match="bogus.weight"):
        load_model(tmp_path / "extra2.safetensors")
    missing = {k: v for k, v in sd.items() if k != "first_stage_model.decoder.conv_in.bias"}
    save_file(missing, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(StateDictMismatchError, match="decoder.conv_in.bias"):
        load_model(tmp_path / "missing.safetensors")


def test_known_non_inference_keys_are_ignored(tmp_path):
    model = random_components(TINY_SD15)
    sd = single_file_state_dict(model)
    sd.update({"alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.999),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    save_file(sd, tmp_path / "sd15.safetensors", metadata=_config_metadata(TINY_SD15))
    loaded = load_model(tmp_path / "sd15.safetensors")
    assert "alphas_cumprod" in loaded.ignored_keys
    assert_same_tensors(model, loaded)


def test_pickle_checkpoint_refused_then_converted_on_opt_in(tmp_path):
    model = random_components(TINY_SD15)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": single_file_state_dict(model)}, ckpt)
    with pytest.raises(PickleRefusedError, match="convert"):
        load_model(ckpt)
    assert cli_main(["convert", str(ckpt), str(tmp_path / "m.safetensors"), "--to", "single-file"]) == 2
    assert not (tmp_path / "m.safetensors").exists()
    # Opt-in: torch.load(weights_only=True).  A tiny model's head count is not visible in its shapes,
    # so the config is given here; real checkpoints are detected (test_detect_full_size_from_shapes).
    loaded = load_single_file(ckpt, allow_pickle=True, config=TINY_SD15)
    assert_same_tensors(model, loaded)
    save_single_file(loaded, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").config == TINY_SD15


def test_diffusers_folder_escaping_paths_refused(tmp_path):
    model = random_components(TINY_SDXL_REFINER)
    folder = save_diffusers(model, tmp_path / "pipe")
    outside = tmp_path / "outside"
    (folder / "unet").rename(outside)
    (folder / "unet").symlink_to(outside, target_is_directory=True)
    with pytest.raises(CheckpointError, match="outside the model folder"):
        load_model(folder)


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_info_and_convert(tmp_path, capsys):
    model = random_components(TINY_SDXL_BASE)
    path = save_single_file(model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sdxl-base" in out and "float16" in out
    unet_params = sum(p.numel() for p in model.unet.parameters())
    assert f"{unet_params:,}" in out
    assert cli_main(["convert", str(path), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert json.loads((tmp_path / "d" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert cli_main(["info", str(tmp_path / "d")]) == 0
    assert "diffusers" in capsys.readouterr().out
    assert cli_main(["info", str(tmp_path / "nope.safetensors")]) == 2


def test_cli_info_preset_full_size(capsys):
    assert cli_main(["info", "sdxl-base"]) == 0
    out = capsys.readouterr().out
    assert "2,567,463,684" in out  # SDXL base UNet parameters (diffusers UNet2DConditionModel of SDXL base)
    assert "83,653,863" in out  # VAE
    assert "694,659,840" in out  # OpenCLIP bigG text tower with projection


def test_replace_config_is_frozen():
    with pytest.raises(Exception):
        SDXL_BASE.unet.block_out_channels = (1,)  # type: ignore[misc]
    assert replace(SDXL_BASE.unet, block_out_channels=(320, 640, 1280)) == SDXL_BASE.unet


def test_open_checkpoint_header_only_shapes(tmp_path):
    model = random_components(TINY_SDXL_REFINER)
    path = save_single_file(model, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(path)
    assert ckpt.shape("model.diffusion_model.input_blocks.0.0.weight") == (32, 4, 3, 3)


def test_load_vae_alone_bare_file_and_folder(tmp_path):
    from xldm.weights.keys_vae import vae_original_to_diffusers
    from xldm.weights.load import load_vae

    model = random_components(TINY_SDXL_BASE)
    bare = {k: v for k, v in model.vae.state_dict().items()}
    save_file(bare, tmp_path / "vae.safetensors")  # like sdxl_vae.safetensors: no prefix
    vae = load_vae(tmp_path / "vae.safetensors")
    assert vae.state_dict().keys() == bare.keys()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in bare.items())
    folder = save_diffusers(model, tmp_path / "pipe")
    from_folder = load_vae(folder / "vae", scaling_factor=0.5)
    assert all(torch.equal(from_folder.state_dict()[k], v) for k, v in bare.items())
    assert vae_original_to_diffusers(bare, TINY_SDXL_BASE.vae).keys()
