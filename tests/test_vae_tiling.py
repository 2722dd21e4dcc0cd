"""Tiled VAE decode and the float32 retry, with the tiny random VAE.

Tolerances: parity with diffusers' AutoencoderKL.tiled_decode on the same weights, fp32 CPU, max abs diff
<= 1e-4 (PARITY_TOL; measured ~1e-5).  One tile vs decode_latents: bitwise equal.  A pointwise decoder: tiled ==
plain to 1e-6 (the blend weights sum to 1).  Tiled vs plain with random weights differs at the seams (every
tile has its own GroupNorm statistics): relative L2 error measured 0.066 for 32/8 tiles on a 40x56 latent
(0.23 for 16/2 tiles); asserted <= 0.1.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

import xldm.vae_tiling as vae_tiling
from xldm.config import TINY_VAE
from xldm.errors import XldmError
from xldm.models.vae import AutoencoderKL
from xldm.vae_tiling import NonFiniteError, decode_checked, decode_tiled, latents_are_finite
from xldm.weights.keys_vae import vae_diffusers_config, vae_original_to_diffusers

PARITY_TOL = 1e-4
F = TINY_VAE.downsample_factor  # 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


@pytest.fixture(scope="module")
def reference(vae: AutoencoderKL) -> DiffusersAutoencoderKL:
    kwargs = {k: v for k, v in vae_diffusers_config(TINY_VAE).items() if not k.startswith("_")}
    model = DiffusersAutoencoderKL(**kwargs).eval()
    model.load_state_dict(vae_original_to_diffusers(vae.state_dict(), TINY_VAE), strict=True)
    return model


def diffusers_tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    return list(range(0, size, tile - overlap))  # diffusers tiled_decode: a tile at every stride below the size


# (latent height, latent width, tile, overlap): grids where diffusers has no tile inside its neighbour, so both
# rules decode the same tiles.  overlap / tile is a power-of-two fraction so diffusers' float products are exact.
PARITY_CASES = [(40, 56, 16, 2), (33, 23, 16, 4), (20, 44, 32, 8)]


@pytest.mark.parametrize("height, width, tile, overlap", PARITY_CASES, ids=lambda v: str(v))
@torch.no_grad()
def test_tiled_decode_matches_diffusers_tiled_decode(vae, reference, height, width, tile, overlap) -> None:
    for size in (height, width):
        assert vae_tiling._tile_starts(size, tile, tile - overlap) == diffusers_tile_starts(size, tile, overlap)
    batch = 1 if height * width > 1000 else 2  # keep the big case fast on a CPU
    latents = random_latents(batch, 4, height, width)
    reference.tile_latent_min_size = tile
    reference.tile_sample_min_size = tile * F
    reference.tile_overlap_factor = overlap / tile
    expected = reference.tiled_decode(latents / TINY_VAE.scaling_factor).sample

    found = decode_tiled(vae, latents, tile_latent=tile, overlap_latent=overlap)
    assert found.shape == (batch, 3, height * F, width * F)
    assert max_diff(found, expected) <= PARITY_TOL
    if batch == 1:
        return
    # Batch items are decoded independently: item 1 alone gives the same pixels.
    alone = decode_tiled(vae, latents[1:], tile_latent=tile, overlap_latent=overlap)
    assert max_diff(alone, found[1:]) <= PARITY_TOL


@pytest.mark.parametrize("height, width, tile, overlap", [(40, 56, 16, 2), (33, 23, 16, 4)], ids=lambda v: str(v))
@torch.no_grad()
def test_tiled_encode_matches_diffusers_tiled_encode(vae, reference, height, width, tile, overlap) -> None:
    """The posterior's mean and log-variance equal diffusers' `_tiled_encode` moments (fp32, <= PARITY_TOL) on the
    same tile grid (pixel tiles of tile * F, blended over `overlap` latent rows), batch 2 encoded item by item."""
    images = torch.rand(2, 3, height * F, width * F, generator=torch.Generator().manual_seed(3)) * 2 - 1
    reference.tile_latent_min_size = tile
    reference.tile_sample_min_size = tile * F
    reference.tile_overlap_factor = overlap / tile
    reference.use_tiling = True
    try:
        expected = reference.encode(images).latent_dist
    finally:
        reference.use_tiling = False
    found = vae_tiling.encode_tiled(vae, images, tile_latent=tile, overlap_latent=overlap)
    assert found.mean.shape == (2, TINY_VAE.z_channels, height, width)
    assert max_diff(found.mean, expected.mean) <= PARITY_TOL
    assert max_diff(found.logvar, expected.logvar) <= PARITY_TOL
    alone = vae_tiling.encode_tiled(vae, images[1:], tile_latent=tile, overlap_latent=overlap)
    assert max_diff(alone.mean, found.mean[1:]) <= PARITY_TOL
    # One tile covering the image is the plain encode, bit for bit; the automatic rule tiles only large images.
    small = images[:, :, : 16 * F, : 16 * F]
    assert torch.equal(vae_tiling.encode_tiled(vae, small, tile_latent=16, overlap_latent=4).mean,
                       vae.encode(small).mean)
    assert torch.equal(vae_tiling.encode(vae, images).mean, vae.encode(images).mean)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae_tiling.encode_tiled(vae, images[:, :, :-3], tile_latent=tile, overlap_latent=overlap)


@torch.no_grad()
def test_one_tile_covering_the_latent_is_exactly_decode_latents(vae) -> None:
    latents = random_latents(1, 4, 24, 40)
    plain = vae.decode_latents(latents)
    assert torch.equal(decode_tiled(vae, latents, tile_latent=40, overlap_latent=8), plain)
    assert torch.equal(decode_tiled(vae, latents, tile_latent=64), plain)  # default tile, smaller latent
    assert torch.equal(decode_checked(vae, latents), plain)  # small latent: no tiling by default


@torch.no_grad()
def test_tiled_is_close_to_plain_with_random_weights(vae) -> None:
    latents = random_latents(1, 4, 40, 56)
    plain = vae.decode_latents(latents)
    assert relative_error(decode_tiled(vae, latents, tile_latent=32, overlap_latent=8), plain) <= 0.1


def pointwise_decode(z: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder with no spatial context: nearest x8 upsampling of a pixelwise function of z."""
    rgb = torch.tanh(z[:, :3] * 0.7 + z[:, 3:4])
    return rgb.repeat_interleave(F, dim=2).repeat_interleave(F, dim=3)


@pytest.mark.parametrize("tile, overlap", [(16, 4), (16, 0), (12, 11), (7, 3)])
def test_tiling_is_exact_for_a_decoder_without_context(vae, monkeypatch, tile, overlap) -> None:
    # Overlapping tiles then agree wherever they overlap, so blending must reproduce the plain decode: the
    # weights at every pixel (corners included) sum to one, and every pixel is covered.
    monkeypatch.setattr(vae, "decode", pointwise_decode)
    latents = random_latents(2, 4, 37, 29)
    plain = pointwise_decode(latents / TINY_VAE.scaling_factor)
    assert max_diff(decode_tiled(vae, latents, tile_latent=tile, overlap_latent=overlap), plain) <= 1e-6


def test_blend_is_linear_across_a_seam(vae, monkeypatch) -> None:
    # Tile k decodes to the constant k: across the seam the image ramps from 0 to 1 as x / (overlap * 8).
    calls: list[tuple[int, ...]] = []

    def constant_decode(z: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(z.shape))
        b, _, h, w = z.shape
        return torch.full((b, 3, h * F, w * F), float(len(calls) - 1))

    monkeypatch.setattr(vae, "decode", constant_decode)
    image = decode_tiled(vae, torch.zeros(1, 4, 8, 28), tile_latent=16, overlap_latent=4)
    assert calls == [(1, 4, 8, 16), (1, 4, 8, 16)]  # starts 0 and 12; the second tile reaches the end (28)
    row = image[0, 0, 0]
    seam = torch.arange(12 * F, 16 * F)
    expected = (seam - 12 * F).float() / (4 * F)  # weight y / extent on the new tile, y = 0 .. extent-1
    assert max_diff(row[seam], expected) <= 1e-6
    assert row[: 12 * F].abs().max().item() == 0.0 and (row[16 * F:] - 1).abs().max().item() == 0.0


def test_tile_grid_skips_tiles_inside_their_neighbour() -> None:
    # diffusers would start tiles at 0, 12, 24, 36 on 40 latent rows; the tile at 36 lies inside the one at 24.
    assert diffusers_tile_starts(40, 16, 4) == [0, 12, 24, 36]
    assert vae_tiling._tile_starts(40, 16, 12) == [0, 12, 24]
    assert vae_tiling._tile_starts(64, 64, 48) == [0]
    assert vae_tiling._tile_starts(65, 64, 48) == [0, 48]
    assert vae_tiling._tile_starts(128, 64, 48) == [0, 48, 96]


def test_bad_tiling_arguments_raise(vae) -> None:
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="tile_latent must be at least 1, got 0"):
        decode_tiled(vae, latents, tile_latent=0)
    with pytest.raises(ValueError, match=r"overlap_latent must be in \[0, tile_latent=16\), got 16"):
        decode_tiled(vae, latents, tile_latent=16, overlap_latent=16)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), found shape \(1, 3, 8, 8\)"):
        decode_tiled(vae, torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.slow) if d == "cpu" else d for d in DEVICES])
@torch.no_grad()
def test_tiled_decode_in_bfloat16(vae, device) -> None:  # cpu: 16 s where the CPU has no native bf16
    model = copy.deepcopy(vae).to(device)
    latents = random_latents(2, 4, 20, 28).to(device)
    fp32 = decode_tiled(model, latents, tile_latent=12, overlap_latent=4)
    bf16 = decode_tiled(model.to(torch.bfloat16), latents.to(torch.bfloat16), tile_latent=12, overlap_latent=4)
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == device
    assert relative_error(bf16, fp32) <= 3e-2  # bf16 has 8 mantissa bits


def test_decode_checked_tiling_choices(vae, monkeypatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = AutoencoderKL.decode

    def counting_decode(self, z):
        shapes.append(tuple(z.shape[-2:]))
        return original(self, z)

    monkeypatch.setattr(AutoencoderKL, "decode", counting_decode)
    latents = random_latents(1, 4, 24, 24)
    plain = decode_checked(vae, latents, tile=False)
    assert shapes == [(24, 24)]
    shapes.clear()
    tiled = decode_checked(vae, latents, tile=16)  # overlap defaults to a quarter: 4 -> starts 0, 12
    assert shapes == [(16, 16), (16, 12), (12, 16), (12, 12)]
    assert max_diff(tiled, decode_tiled(vae, latents, tile_latent=16, overlap_latent=4)) == 0.0
    assert relative_error(tiled, plain) <= 0.3
    shapes.clear()
    decode_checked(vae, latents, tile=16, overlap=8)
    assert shapes[:2] == [(16, 16), (16, 16)]  # starts 0, 8
    shapes.clear()
    monkeypatch.setattr(vae_tiling, "AUTO_TILE_LATENT_AREA", 20 * 20)  # 24 x 24 is now "large"
    monkeypatch.setattr(vae_tiling, "DEFAULT_TILE_LATENT", 16)
    monkeypatch.setattr(vae_tiling, "DEFAULT_OVERLAP_LATENT", 4)
    decode_checked(vae, latents)
    assert len(shapes) == 4


def overflow_in(vae: AutoencoderKL, monkeypatch, dtypes: tuple[torch.dtype, ...], item: int = 0) -> None:
    """Make the decoder emit +inf at one pixel of batch item `item` whenever it runs in one of `dtypes`."""
    forward = vae.decoder.forward

    def overflowing(z: torch.Tensor) -> torch.Tensor:
        out = forward(z)
        if out.dtype in dtypes:
            out = out.clone()
            out[item, 1, 3, 5] = float("inf")
        return out

    monkeypatch.setattr(vae.decoder, "forward", overflowing)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_overflow_is_retried_in_float32(vae, monkeypatch, dtype) -> None:
    model = copy.deepcopy(vae).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latents = random_latents(2, 4, 8, 12)
    # What the float32 retry must give: the same (rounded) weights, in float32, on the float32 latents.
    with torch.no_grad():
        expected = copy.deepcopy(model).float().decode_latents(latents)
    overflow_in(model, monkeypatch, (torch.float16, torch.bfloat16))

    with pytest.warns(RuntimeWarning, match=r"decoding again in float32") as record:
        image = decode_checked(model, latents)
    assert "1 of 36864 values (0 NaN, 1 inf) in batch item(s) [0]" in str(record[0].message)
    assert image.dtype == torch.float32 and latents_are_finite(image)
    assert max_diff(image, expected) <= 1e-6
    # The VAE is back in its own dtype with its own weights.
    assert all(v.dtype == dtype and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_no_warning_when_the_reduced_precision_decode_is_finite(vae) -> None:
    model = copy.deepcopy(vae).to(torch.bfloat16)
    latents = random_latents(1, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_checked(model, latents)  # float32 latents are cast to the VAE's dtype
    assert image.dtype == torch.bfloat16
    with torch.no_grad():
        assert max_diff(image, model.decode_latents(latents.to(torch.bfloat16))) == 0.0


def test_non_finite_in_float32_raises_and_says_where(vae, monkeypatch) -> None:
    model = copy.deepcopy(vae).to(torch.float16)
    overflow_in(model, monkeypatch, (torch.float16, torch.float32), item=1)
    with pytest.warns(RuntimeWarning, match="float32"):
        with pytest.raises(NonFiniteError, match=r"in torch.float16 and again in float32: .*batch item\(s\) \[1\]"):
            decode_checked(model, random_latents(2, 4, 8, 8))
    assert all(p.dtype == torch.float16 for p in model.parameters())  # restored even when it fails

    fp32_model = copy.deepcopy(vae)
    overflow_in(fp32_model, monkeypatch, (torch.float32,))
    with pytest.raises(NonFiniteError, match=r"decode in torch.float32 produced non-finite values: 1 of 24576"):
        decode_checked(fp32_model, random_latents(2, 4, 8, 8))


def test_non_finite_latents_raise_before_decoding(vae) -> None:
    latents = random_latents(2, 4, 8, 8)
    latents[1, 2, 3, 4] = float("nan")
    assert not latents_are_finite(latents) and latents_are_finite(latents[:1])
    assert not latents_are_finite(torch.tensor([1.0, float("-inf")]))
    with pytest.raises(NonFiniteError, match=r"sampler diverged\): 1 of 512 values \(1 NaN, 0 inf\) in batch "
                                             r"item\(s\) \[1\]; first at \(item, channel, y, x\) = \(1, 2, 3, 4\)"):
        decode_checked(vae, latents)
    assert issubclass(NonFiniteError, XldmError) and issubclass(NonFiniteError, ValueError)
