"""UNet tests: fp32 parity with diffusers `UNet2DConditionModel` (max abs diff <= 1e-4), full-size shapes
on the meta device, input validation, dtypes and gradient checkpointing.

diffusers is the oracle only; weights travel diffusers -> xldm through `unet_diffusers_to_original`.
"""

from __future__ import annotations

import pytest
import torch

from xldm.config import (
    SD15, SD21, SDXL_BASE, SDXL_REFINER, TINY_SD15, TINY_SDXL_BASE, TINY_SDXL_REFINER, ModelConfig,
)
from xldm.models.layers import timestep_embedding
from xldm.models.unet import UNet
from xldm.weights.keys_unet import unet_diffusers_config, unet_diffusers_to_original

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import Timesteps  # noqa: E402

PARITY_TOL = 1e-4  # fp32 parity, max abs diff


def _randomise_constants(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights (ones) and biases (zeros) would hide a swapped key; give them random values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() == 1 or bool((p == p.flatten()[0]).all()):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=generator))


def _pair(preset: ModelConfig, seed: int = 0) -> tuple[UNet2DConditionModel, UNet]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = unet_diffusers_config(preset.unet, addition_time_embed_dim=preset.micro_conditioning_dim)
    reference = UNet2DConditionModel(**config).eval()
    _randomise_constants(reference, generator)
    model = UNet(preset.unet).eval()
    model.load_state_dict(unet_diffusers_to_original(reference.state_dict(), preset.unet), strict=True)
    return reference, model


def _time_ids(preset: ModelConfig, batch: int) -> torch.Tensor:
    """Micro-conditioning scalars in the paper's order; rows differ so a batch mix-up shows."""
    values = {"original_size": [1024.0, 768.0], "crop_top_left": [0.0, 16.0], "target_size": [1024.0, 1024.0],
              "aesthetic_score": [6.0]}
    row = [v for name in preset.micro_conditioning for v in values[name]]
    ids = torch.tensor([row] * batch)
    ids[1:, 0] = 512.0
    return ids


def _tiny_model(preset: ModelConfig, seed: int = 0) -> UNet:
    """xldm UNet alone (no oracle) with PyTorch's default init and randomised norm parameters."""
    torch.manual_seed(seed)
    model = UNet(preset.unet).eval()
    _randomise_constants(model, torch.Generator().manual_seed(seed))
    return model


def _inputs(preset: ModelConfig, height: int, width: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, preset.unet.in_channels, height, width, generator=g)
    t = torch.tensor([981.0, 13.0])[:batch]
    context = torch.randn(batch, 7, preset.unet.context_dim, generator=g)
    if preset.unet.adm_in_channels == 0:
        return x, t, context, None, {}
    pooled = torch.randn(batch, preset.text_encoders[-1].projection_dim, generator=g)
    ids = _time_ids(preset, batch)
    # xldm side: y = [pooled | fourier(each scalar)], one timestep_embedding per scalar (diffusers unet_2d_condition.py `add_time_proj`).
    fourier = timestep_embedding(ids, preset.micro_conditioning_dim).reshape(batch, -1)
    y = torch.cat([pooled, fourier], dim=-1)
    return x, t, context, y, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 256, 320, 7])
def test_timestep_embedding_matches_diffusers_timesteps(dim: int) -> None:
    t = torch.tensor([0.0, 1.0, 13.0, 500.5, 981.0, 1024.0])
    ours = timestep_embedding(t, dim)
    theirs = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert ours.dtype == torch.float32 and ours.shape == (6, dim)
    assert (ours - theirs).abs().max().item() <= 1e-6
    # any leading shape: (B, n) -> (B, n, dim), same numbers as the flat call
    grid = timestep_embedding(t.reshape(2, 3), dim)
    assert torch.equal(grid.reshape(6, dim), ours)


@pytest.mark.parametrize(
    ("name", "preset", "size"),
    [
        ("tiny-base", TINY_SDXL_BASE, (8, 12)),  # non-square
        ("tiny-refiner", TINY_SDXL_REFINER, (8, 8)),  # 4 levels, up block without attention + upsampler
        ("tiny-sd15", TINY_SD15, (8, 8)),  # conv proj_in/out, fixed head count, no vector conditioning
        ("tiny-base-odd", TINY_SDXL_BASE, (10, 14)),  # 10x14 -> 5x7 -> 3x4: upsample output-size path
        ("tiny-refiner-odd", TINY_SDXL_REFINER, (9, 6)),
    ],
)
def test_parity_with_diffusers_fp32(name: str, preset: ModelConfig, size: tuple[int, int]) -> None:
    reference, model = _pair(preset)
    x, t, context, y, kwargs = _inputs(preset, *size)
    with torch.no_grad():
        expected = reference(x, t, context, **kwargs).sample
        got = model(x, t, context, y)
    assert got.shape == expected.shape == x.shape
    assert expected.abs().max().item() > 0.1  # a real signal, not a degenerate zero output
    diff = (got - expected).abs().max().item()
    assert diff <= PARITY_TOL, f"{name}: max abs diff {diff}"


def test_scalar_timestep_broadcasts_like_a_batch() -> None:
    model = _tiny_model(TINY_SDXL_BASE)
    x, _, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor(500.0), context, y)
        b = model(x, torch.tensor([500.0, 500.0]), context, y)
    assert (a - b).abs().max().item() == 0.0


@pytest.mark.parametrize(
    ("preset", "params", "keys"),
    [
        (SDXL_BASE, 2_567_463_684, 1680),
        (SDXL_REFINER, 2_259_526_660, 1220),
        (SD15, 859_520_964, 686),
        (SD21, 865_910_724, 686),
    ],
)
def test_full_size_presets_on_meta(preset: ModelConfig, params: int, keys: int) -> None:
    with torch.device("meta"):
        model = UNet(preset.unet)
        reference = UNet2DConditionModel(**unet_diffusers_config(preset.unet))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(ours) == keys
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in reference.parameters()) == params
    # same key set and identical shapes after the diffusers -> original map
    assert unet_diffusers_to_original(theirs, preset.unet) == ours


def test_full_size_forward_shape_on_meta() -> None:
    with torch.device("meta"):
        model = UNet(SDXL_BASE.unet)
        x = torch.empty(2, 4, 128, 96)
        out = model(x, torch.empty(2), torch.empty(2, 77, 2048), torch.empty(2, 2816))
    assert out.shape == (2, 4, 128, 96) and out.device.type == "meta"


# ---------------------------------------------------------------------------------------------------
# input validation


@pytest.fixture(scope="module")
def tiny_base() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY_SDXL_BASE.unet).eval()


def test_wrong_context_width_names_expected_and_found(tiny_base: UNet) -> None:
    x, t, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with pytest.raises(ValueError, match=r"context: expected shape \(2, L, 80\), found \(2, 7, 64\)"):
        tiny_base(x, t, context[..., :64], y)


def test_missing_y_names_expected_and_found(tiny_base: UNet) -> None:
    x, t, context, _, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with pytest.raises(ValueError, match=r"y: expected .*\(2, 96\), found None"):
        tiny_base(x, t, context)


def test_wrong_y_width_names_expected_and_found(tiny_base: UNet) -> None:
    x, t, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with pytest.raises(ValueError, match=r"y: expected shape \(2, 96\), found \(2, 88\)"):
        tiny_base(x, t, context, y[:, :88])


def test_wrong_input_channels_and_batch(tiny_base: UNet) -> None:
    x, t, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 4, H, W\), found \(2, 3, 8, 8\)"):
        tiny_base(x[:, :3], t, context, y)
    with pytest.raises(ValueError, match=r"timesteps: expected shape \(\) or \(2,\), found \(3,\)"):
        tiny_base(x, torch.ones(3), context, y)


def test_y_given_to_unet_without_vector_conditioning() -> None:
    model = UNet(TINY_SD15.unet)
    x, t, context, _, _ = _inputs(TINY_SD15, 8, 8)
    with pytest.raises(ValueError, match=r"adm_in_channels=0\), found a tensor of shape \(2, 16\)"):
        model(x, t, context, torch.zeros(2, 16))


# ---------------------------------------------------------------------------------------------------
# dtypes and training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype: torch.dtype) -> None:
    model = _tiny_model(TINY_SDXL_BASE)
    x, t, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)
    with torch.no_grad():
        full = model(x, t, context, y)
        half = model.to(dtype)(x.to(dtype), t, context.to(dtype), y.to(dtype))
    assert half.dtype == dtype
    rel = ((half.float() - full).abs().max() / full.abs().max()).item()
    assert rel <= 5e-2, f"{dtype}: relative max diff {rel}"


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = _tiny_model(TINY_SDXL_BASE).train()
    x, t, context, y, _ = _inputs(TINY_SDXL_BASE, 8, 8)

    def grads(flag: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        model.gradient_checkpointing = flag
        out = model(x, t, context, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, plain = grads(False)
    out_ckpt, ckpt = grads(True)
    assert (out_plain - out_ckpt).abs().max().item() == 0.0
    assert plain.keys() == ckpt.keys()
    worst = max((plain[n] - ckpt[n]).abs().max().item() for n in plain)
    assert worst <= 1e-6, f"gradient max abs diff {worst}"


# ---------------------------------------------------------------------------------------------------
# any UNet of the family: a diffusers UNet with unusual settings, loaded from a folder and a single file

# Widths that are not multiples of the first, no attention / depth 1 / depth 2 per level (mid block: 2).
UNUSUAL = dict(
    block_out_channels=(32, 48, 80), layers_per_block=2, norm_num_groups=8, transformer_layers_per_block=(1, 1, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
UNUSUAL_CASES = {
    # SDXL-like: "text_time" vector conditioning, linear proj_in, 16-wide heads (2, 3, 5 heads per level)
    "text-time": (TINY_SDXL_BASE, dict(
        UNUSUAL, attention_head_dim=(2, 3, 5), use_linear_projection=True, cross_attention_dim=80,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=96)),
    # SD 1.x-like: no vector conditioning, conv proj_in, a fixed count of 2 heads (widths 16, 24, 40)
    "plain": (TINY_SD15, dict(UNUSUAL, attention_head_dim=2, use_linear_projection=False, cross_attention_dim=32,
                              layers_per_block=1)),
}


def _unusual_folder(tmp_path, case: str):
    """A diffusers folder whose unet/ is diffusers' own `save_pretrained` of a random UNet."""
    import dataclasses

    from tiny_models import random_components
    from xldm.weights.save import save_diffusers

    preset, kwargs = UNUSUAL_CASES[case]
    torch.manual_seed(0)
    reference = UNet2DConditionModel(**kwargs).eval()
    _randomise_constants(reference, torch.Generator().manual_seed(0))
    others = dataclasses.replace(random_components(preset), unet=None)
    folder = save_diffusers(others, tmp_path / "model")
    reference.save_pretrained(folder / "unet")
    return preset, reference, folder


@pytest.mark.parametrize("case", list(UNUSUAL_CASES))
def test_any_family_unet_loads_from_folder_and_single_file(tmp_path, case: str) -> None:
    from xldm.weights.load import load_model
    from xldm.weights.save import save_single_file

    preset, reference, folder = _unusual_folder(tmp_path, case)
    from_folder = load_model(folder)
    unet_cfg = from_folder.config.unet
    assert unet_cfg.block_out_channels == (32, 48, 80) and unet_cfg.transformer_depth == (0, 1, 2)
    assert unet_cfg.transformer_depth_middle == 2 and unet_cfg.time_embed_dim == 128
    assert [unet_cfg.heads_for(w) for w in (48, 80)] == ([(3, 16), (5, 16)] if case == "text-time" else
                                                         [(2, 24), (2, 40)])
    from_file = load_model(save_single_file(from_folder, tmp_path / "model.safetensors"))
    assert from_file.config == from_folder.config
    x, t, context, y, kwargs = _inputs(dataclasses_replace(preset, unet_cfg), 10, 13)  # 10x13 -> 5x7 -> 3x4
    with torch.no_grad():
        expected = reference(x, t, context, **kwargs).sample
        assert expected.abs().max().item() > 0.1
        for loaded in (from_folder, from_file):
            diff = (loaded.unet(x, t, context, y) - expected).abs().max().item()
            assert diff <= PARITY_TOL, f"{case}: max abs diff {diff}"


def dataclasses_replace(preset: ModelConfig, unet_cfg) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(preset, unet=unet_cfg)


def test_config_claiming_other_widths_is_refused_before_reading(tmp_path, monkeypatch) -> None:
    """A unet/config.json whose widths disagree with the weights' shapes is refused from the header alone."""
    import json

    from xldm.errors import CheckpointError, StateDictMismatchError
    from xldm.weights import load as load_module

    _, _, folder = _unusual_folder(tmp_path, "text-time")
    config_path = folder / "unet" / "config.json"
    honest = json.loads(config_path.read_text())

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(load_module, "_float_dtype", no_reads)
    config_path.write_text(json.dumps(dict(honest, block_out_channels=[3200, 4800, 8000])))
    mismatch = r"input_blocks\.0\.0\.weight expected \(3200, 4, 3, 3\), found \(32, 4"
    with pytest.raises(StateDictMismatchError, match=mismatch):
        load_module.load_model(folder, components=["unet"])
    config_path.write_text(json.dumps(dict(honest, layers_per_block=10**9)))
    with pytest.raises(CheckpointError, match="the config describes a network of at least"):
        load_module.load_model(folder, components=["unet"])
