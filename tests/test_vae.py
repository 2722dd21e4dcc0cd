"""The KL autoencoder and its key maps, against diffusers `AutoencoderKL` and `convert_ldm_vae_checkpoint`.

Tolerance for fp32 CPU parity with random weights: max abs diff <= 1e-4 (PARITY_TOL).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from xldm.config import SD15, SD21, SDXL_VAE, TINY_SD15, TINY_VAE, VAEConfig
from xldm.models.vae import AutoencoderKL
from xldm.weights.keys_vae import (
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_original,
    vae_original_to_diffusers,
)

PARITY_TOL = 1e-4  # fp32, CPU, max abs diff
TINY_CONFIGS = [TINY_VAE, replace(TINY_VAE, num_res_blocks=2)]
TINY_IDS = ["tiny", "tiny-2-res-blocks"]


def diffusers_vae(cfg: VAEConfig) -> DiffusersAutoencoderKL:
    kwargs = {k: v for k, v in vae_diffusers_config(cfg).items() if not k.startswith("_")}
    return DiffusersAutoencoderKL(**kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=TINY_IDS)
def vae_pair(request: pytest.FixtureRequest) -> tuple[VAEConfig, DiffusersAutoencoderKL, AutoencoderKL]:
    """A random diffusers VAE and an xldm VAE holding the same weights (moved via diffusers -> original)."""
    cfg = request.param
    torch.manual_seed(0)
    reference = diffusers_vae(cfg).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(vae_diffusers_to_original(reference.state_dict(), cfg), strict=True)
    return cfg, reference, ours


# --- parity with diffusers ----------------------------------------------------------------------


@torch.no_grad()
def test_encoder_posterior_and_sample_match_diffusers(vae_pair) -> None:
    cfg, reference, ours = vae_pair
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square

    expected = reference.encode(images).latent_dist
    found = ours.encode(images)
    assert found.mean.shape == (2, cfg.z_channels, 8, 12)
    assert max_diff(found.mean, expected.mean) <= PARITY_TOL
    assert max_diff(found.logvar, expected.logvar) <= PARITY_TOL
    assert max_diff(found.std, expected.std) <= PARITY_TOL
    assert max_diff(found.mode(), expected.mode()) <= PARITY_TOL

    # Same seed -> same noise -> same sample (diffusers randn_tensor semantics), one generator or one per item.
    sample_ref = expected.sample(torch.Generator().manual_seed(42))
    sample_ours = found.sample(torch.Generator().manual_seed(42))
    assert max_diff(sample_ours, sample_ref) <= PARITY_TOL
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    assert max_diff(found.sample(gens()), expected.sample(gens())) <= PARITY_TOL
    # The noise really is random: the sample differs from the mean by about std.
    assert (sample_ours - found.mean).abs().max().item() > 1e-3

    latents = ours.encode_latents(images, generator=torch.Generator().manual_seed(42))
    assert max_diff(latents, sample_ref * cfg.scaling_factor) <= PARITY_TOL
    assert max_diff(ours.encode_latents(images, sample=False), expected.mean * cfg.scaling_factor) <= PARITY_TOL


@torch.no_grad()
def test_decoder_matches_diffusers(vae_pair) -> None:
    cfg, reference, ours = vae_pair
    z = torch.randn(2, cfg.z_channels, 8, 12, generator=torch.Generator().manual_seed(3))  # -> 64x96 image

    expected = reference.decode(z).sample
    found = ours.decode(z)
    assert found.shape == (2, 3, 64, 96)
    assert max_diff(found, expected) <= PARITY_TOL
    # decode_latents undoes the scaling the UNet sees; its output is not clamped (random weights exceed 1).
    assert max_diff(ours.decode_latents(z * cfg.scaling_factor), expected) <= PARITY_TOL
    assert found.abs().max().item() > 1.0


# --- full-size key sets on the meta device ------------------------------------------------------


@pytest.mark.parametrize("cfg", [SDXL_VAE, SD15.vae, SD21.vae], ids=["sdxl", "sd15", "sd21"])
def test_full_size_keys_and_shapes_match_diffusers(cfg: VAEConfig) -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        reference = diffusers_vae(cfg)
    ours_sd = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863  # the released SDXL VAE; same shape for SD 1.x/2.x
    assert len(ours_sd) == 248

    mapped = vae_diffusers_to_original(reference.state_dict(), cfg)
    assert set(mapped) == set(ours_sd)
    mismatched = {k: (v.shape, ours_sd[k].shape) for k, v in mapped.items() if v.shape != ours_sd[k].shape}
    assert mismatched == {}
    assert ours_sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ours_sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert ours_sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)


# --- key maps against diffusers' own converter --------------------------------------------------


def random_state_dict(cfg: VAEConfig, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in diffusers_vae(cfg).state_dict().items()}


@pytest.mark.parametrize("cfg", TINY_CONFIGS + [TINY_SD15.vae], ids=TINY_IDS + ["tiny-sd15"])
def test_key_maps_agree_with_convert_ldm_vae_checkpoint(cfg: VAEConfig) -> None:
    diffusers_sd = random_state_dict(cfg, seed=5)
    original = vae_diffusers_to_original(diffusers_sd, cfg)

    oracle = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in original.items()},
                                        vae_diffusers_config(cfg))
    assert set(oracle) == set(diffusers_sd)
    assert all(torch.equal(oracle[k], diffusers_sd[k]) for k in diffusers_sd)

    back = vae_original_to_diffusers(original, cfg)
    assert set(back) == set(diffusers_sd)
    assert all(back[k].shape == diffusers_sd[k].shape and torch.equal(back[k], diffusers_sd[k]) for k in diffusers_sd)
    # Pure renames and reshape views: every tensor shares the source's storage (nothing is copied).
    assert all(back[k].data_ptr() == diffusers_sd[k].data_ptr() for k in diffusers_sd)
    assert original["encoder.mid.attn_1.proj_out.weight"].ndim == 4


def test_key_maps_reject_unknown_keys() -> None:
    original = {k: v for k, v in AutoencoderKL(TINY_VAE).state_dict().items()}
    original["encoder.down.9.block.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"encoder\.down\.9\.block\.0\.conv1\.weight"):
        vae_original_to_diffusers(original, TINY_VAE)
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.0\.resnets\.5\.norm1\.weight"):
        vae_diffusers_to_original({"decoder.up_blocks.0.resnets.5.norm1.weight": torch.zeros(1)}, TINY_VAE)


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SDXL_VAE, SD15.vae, TINY_VAE, replace(TINY_VAE, num_res_blocks=2)])
def test_diffusers_config_round_trip(cfg: VAEConfig) -> None:
    d = vae_diffusers_config(cfg)
    assert vae_config_from_diffusers(d) == cfg
    assert d["force_upcast"] is True and d["scaling_factor"] == cfg.scaling_factor
    assert 2 ** (len(d["block_out_channels"]) - 1) == cfg.downsample_factor == 8


def test_sdxl_diffusers_config_values() -> None:
    d = vae_diffusers_config(SDXL_VAE)
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
    assert d["latent_channels"] == 4 and d["norm_num_groups"] == 32
    assert abs(d["scaling_factor"] - 0.13025) <= 0.0


def test_config_from_diffusers_rejects_unsupported_variants() -> None:
    d = vae_diffusers_config(SDXL_VAE)
    with pytest.raises(ValueError, match=r"shift_factor: expected None, found 0\.1159"):
        vae_config_from_diffusers({**d, "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="use_quant_conv: expected True, found False"):
        vae_config_from_diffusers({**d, "use_quant_conv": False})


# --- boundary checks ----------------------------------------------------------------------------


def test_wrong_shapes_raise_with_expected_and_found() -> None:
    vae = AutoencoderKL(TINY_VAE)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), found shape \(1, 4, 64, 64\)"):
        vae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"multiples of 8, found 60x64"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"multiples of 8, found 64x100"):
        vae.encode_latents(torch.zeros(1, 3, 64, 100))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\), found shape \(1, 3, 8, 8\)"):
        vae.decode_latents(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        AutoencoderKL(replace(TINY_VAE, ch=16))


# --- reduced precision --------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found.float().cpu() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_half_precision_error_is_no_worse_than_diffusers(vae_pair, device: str, dtype: torch.dtype) -> None:
    """Random-weight VAEs amplify rounding (bf16 gives ~5-8% relative L2 error on both sides), so the check is:
    our error vs our fp32 output <= 1.5 x diffusers' error in the same dtype on the same device + 1e-2."""
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 convolutions are a GPU format")
    _, reference, ours = vae_pair
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expected = ours.decode(ours.encode(images).mean)

    ours_half = copy.deepcopy(ours).to(device=device, dtype=dtype)
    reference_half = copy.deepcopy(reference).to(device=device, dtype=dtype)
    x = images.to(device, dtype)
    posterior = ours_half.encode(x)
    sample = posterior.sample(torch.Generator().manual_seed(0))  # CPU generator: noise drawn there, then moved
    assert sample.dtype == dtype and sample.device.type == device
    found = ours_half.decode(posterior.mean)
    assert found.dtype == dtype and bool(torch.isfinite(found).all())
    reference_out = reference_half.decode(reference_half.encode(x).latent_dist.mean).sample

    ours_error, reference_error = relative_error(found, expected), relative_error(reference_out, expected)
    assert ours_error <= 1.5 * reference_error + 1e-2, (ours_error, reference_error)
