"""UNet key maps and config translation, checked against diffusers' own converter as an independent oracle.

`convert_ldm_unet_checkpoint` (diffusers.loaders.single_file_utils) is what `from_single_file` uses; our maps
must agree with it exactly (same keys, the very same tensor objects) in both directions.
"""

from __future__ import annotations

import pytest
import torch

from xldm.config import (
    SD15, SD21, SDXL_BASE, SDXL_REFINER, TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER, ModelConfig, UNetConfig,
)
from xldm.models.unet import UNet
from xldm.weights.keys_unet import (
    unet_config_from_diffusers, unet_diffusers_config, unet_diffusers_to_original, unet_original_to_diffusers,
)

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

PREFIX = "model.diffusion_model."
TINY = [("tiny-base", TINY_SDXL_BASE), ("tiny-refiner", TINY_SDXL_REFINER), ("tiny-sd15", TINY_SD15)]
FULL = [("sdxl-base", SDXL_BASE), ("sdxl-refiner", SDXL_REFINER), ("sd15", SD15), ("sd21", SD21)]


def _random_diffusers_state_dict(preset: ModelConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    config = unet_diffusers_config(preset.unet, addition_time_embed_dim=preset.micro_conditioning_dim)
    torch.manual_seed(0)
    return config, UNet2DConditionModel(**config).state_dict()


@pytest.mark.parametrize(("name", "preset"), TINY)
def test_maps_agree_with_diffusers_converter_both_directions(name: str, preset: ModelConfig) -> None:
    config, diffusers_sd = _random_diffusers_state_dict(preset)
    original = unet_diffusers_to_original(diffusers_sd, preset.unet)
    assert len(original) == len(diffusers_sd)

    # diffusers -> ours -> diffusers' converter gives back exactly D (same keys, same tensor objects).
    oracle = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in original.items()}, config)
    assert oracle.keys() == diffusers_sd.keys()
    assert all(oracle[k] is diffusers_sd[k] for k in diffusers_sd)

    # our original -> diffusers map is the inverse: L -> D, no copies.
    back = unet_original_to_diffusers(original, preset.unet)
    assert back.keys() == diffusers_sd.keys()
    assert all(back[k] is diffusers_sd[k] for k in diffusers_sd)
    # and the original-layout dict loads strictly into xldm's UNet with equal tensors (max abs diff 0)
    model = UNet(preset.unet)
    model.load_state_dict(original, strict=True)
    worst = max((model.state_dict()[k] - v).abs().max().item() for k, v in original.items())
    assert worst == 0.0


@pytest.mark.parametrize(("name", "preset"), FULL)
def test_full_size_keys_through_diffusers_converter(name: str, preset: ModelConfig) -> None:
    """xldm's meta-built key set, run through diffusers' converter, is exactly the diffusers UNet's."""
    config = unet_diffusers_config(preset.unet)
    with torch.device("meta"):
        ours = UNet(preset.unet).state_dict()
        theirs = UNet2DConditionModel(**config).state_dict()
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.items()}, config)
    assert converted.keys() == theirs.keys()
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    mapped = unet_original_to_diffusers(ours, preset.unet)
    assert mapped.keys() == theirs.keys()
    assert all(mapped[k] is converted[k] for k in converted)


def test_upsampler_index_quirk() -> None:
    """An up block with attention has its Upsample at slot 2, one without at slot 1 (sgm openaimodel.py `UNetModel.output_blocks`)."""
    cfg = SDXL_REFINER.unet
    names = {"up_blocks.0.upsamplers.0.conv.weight": 0, "up_blocks.1.upsamplers.0.conv.weight": 1}
    original = unet_diffusers_to_original(names, cfg)
    assert original == {"output_blocks.2.1.conv.weight": 0, "output_blocks.5.2.conv.weight": 1}


def test_unmappable_keys_are_listed() -> None:
    bad = {
        "time_embed.0.weight": 1,
        "input_blocks.1.1.norm.weight": 2,  # SDXL level 0 has no attention
        "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight": 3,  # level 1 has depth 2
        PREFIX + "out.2.bias": 4,  # prefix must be stripped by the caller
        "input_blocks.4.0.in_layers.1.weight": 5,  # SiLU has no parameters
    }
    with pytest.raises(ValueError) as info:
        unet_original_to_diffusers(bad, SDXL_BASE.unet)
    message = str(info.value)
    assert message.startswith("4 UNet keys do not map")
    for key in list(bad)[1:]:
        assert key in message
    with pytest.raises(ValueError, match=r"1 UNet keys .*add_embedding\.linear_1\.weight"):
        unet_diffusers_to_original({"add_embedding.linear_1.weight": 0}, SD15.unet)


def test_diffusers_config_values_for_presets() -> None:
    base = unet_diffusers_config(SDXL_BASE.unet)
    assert base["attention_head_dim"] == [5, 10, 20]  # number of heads (diffusers' naming)
    assert base["transformer_layers_per_block"] == [1, 2, 10]
    assert base["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert base["up_block_types"] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert (base["addition_embed_type"], base["addition_time_embed_dim"]) == ("text_time", 256)
    assert (base["projection_class_embeddings_input_dim"], base["cross_attention_dim"]) == (2816, 2048)
    refiner = unet_diffusers_config(SDXL_REFINER.unet)
    assert refiner["attention_head_dim"] == [6, 12, 24, 24]
    assert refiner["transformer_layers_per_block"] == 4
    assert refiner["block_out_channels"] == [384, 768, 1536, 1536]
    assert refiner["projection_class_embeddings_input_dim"] == 2560
    sd15 = unet_diffusers_config(SD15.unet)
    assert sd15["attention_head_dim"] == 8 and sd15["use_linear_projection"] is False
    assert sd15["addition_embed_type"] is None and sd15["projection_class_embeddings_input_dim"] is None
    sd21 = unet_diffusers_config(SD21.unet)
    assert sd21["attention_head_dim"] == [5, 10, 20, 20] and sd21["cross_attention_dim"] == 1024


@pytest.mark.parametrize(("name", "preset"), FULL + TINY)
def test_config_round_trip(name: str, preset: ModelConfig) -> None:
    assert unet_config_from_diffusers(unet_diffusers_config(preset.unet)) == preset.unet


def test_config_from_hub_style_json() -> None:
    """Hub config.json files leave class defaults out (SD 1.5) and use tuples/ints freely (SDXL)."""
    sd15_hub = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    assert unet_config_from_diffusers(sd15_hub) == SD15.unet
    sdxl_hub = dict(unet_diffusers_config(SDXL_BASE.unet), sample_size=128, upcast_attention=None,
                    block_out_channels=(320, 640, 1280), addition_embed_type_num_heads=64)
    assert unet_config_from_diffusers(sdxl_hub) == SDXL_BASE.unet


def test_unsupported_diffusers_settings_raise() -> None:
    good = unet_diffusers_config(TINY_SDXL_BASE.unet)
    with pytest.raises(ValueError, match="class_embed_type='projection'"):
        unet_config_from_diffusers(dict(good, class_embed_type="projection"))
    with pytest.raises(ValueError, match="up_block_types: expected"):
        unet_config_from_diffusers(dict(good, up_block_types=["UpBlock2D"] * 3))
    with pytest.raises(ValueError, match="neither one head count nor one head width"):
        unet_config_from_diffusers(dict(good, attention_head_dim=[1, 1, 2]))


def test_depth_diffusers_cannot_express() -> None:
    cfg = UNetConfig(block_out_channels=(32, 64), transformer_depth=(1, 2), transformer_depth_middle=3,
                     num_head_channels=32, context_dim=16, adm_in_channels=0)
    with pytest.raises(ValueError, match="transformer_depth\\[-1\\]=2 .*transformer_depth_middle=3"):
        unet_diffusers_config(cfg)


# Widths that are not multiples of the first; depths (0, 1, 2); both projections and head layouts that the
# official checkpoints use (64-wide heads with Linear proj_in; 8 heads with conv proj_in and context 768).
DETECTABLE = {
    "64-wide-heads": UNetConfig(block_out_channels=(128, 192, 320), transformer_depth=(0, 1, 2),
                                transformer_depth_middle=2, num_head_channels=64, context_dim=96, adm_in_channels=40),
    "8-heads-conv": UNetConfig(block_out_channels=(64, 96, 160), num_res_blocks=1, transformer_depth=(1, 2, 0),
                               transformer_depth_middle=1, num_head_channels=-1, num_heads=8, context_dim=768,
                               adm_in_channels=0, use_linear_in_transformer=False),
}


@pytest.mark.parametrize("name", list(DETECTABLE))
def test_detect_widths_per_level_from_empty_tensors(name: str) -> None:
    """Detection reads only shapes: a state dict of `torch.empty` tensors (diffusers' own model's shapes,
    mapped to the original layout) gives back the config, widths per level included."""
    from xldm.weights.detect import detect_unet

    cfg = DETECTABLE[name]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel(**unet_diffusers_config(cfg)).state_dict().items()}
    empty = unet_diffusers_to_original({k: torch.empty(s) for k, s in shapes.items()}, cfg)
    assert detect_unet({k: tuple(v.shape) for k, v in empty.items()}) == cfg


def test_detect_refuses_a_head_layout_shapes_cannot_tell() -> None:
    from xldm.errors import UnknownModelError
    from xldm.weights.detect import detect_unet

    cfg = UNetConfig(block_out_channels=(32, 48, 80), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
                     num_head_channels=16, context_dim=80, adm_in_channels=0, norm_groups=8)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    with pytest.raises(UnknownModelError, match="48 does not split into 0 heads of 64.*cannot be read from shapes"):
        detect_unet(shapes)
