"""DPM++ SDE Karras and DPM++ 3M SDE end to end against diffusers' SDXL pipeline on a tiny random model (fp32, CPU).

dpmpp_sde_karras = DPMSolverSDEScheduler(use_karras_sigmas=True); its Brownian tree is seeded with the image seed
(xldm: each generator's initial_seed(); diffusers: `noise_sampler_seed`).  dpmpp_3m_sde(_karras) =
DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3), noise from the pipeline's
generators.  Images within 2/255 per pixel, final latents within 1e-4 relative (as tests/test_pipeline.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xldm.config import TINY_SDXL_BASE
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.pngmeta import A1111_SAMPLER_NAMES
from xldm.weights.save import save_diffusers

from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")

PIXEL_TOL = 2
LATENT_TOL = 1e-4
PROMPT = "a red apple on a wooden table, studio light"
SEED = 1234
SIZE = dict(width=96, height=64)
SCHEDULERS = {
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}),
}


@pytest.fixture(scope="module")
def base():
    return random_components(TINY_SDXL_BASE, seed=0, scale=0.05)


@pytest.fixture(scope="module")
def ref_pipe(base, tmp_path_factory):
    folder = save_diffusers(base, tmp_path_factory.mktemp("sde") / "base")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe._xldm_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def reference(pipe, sampler: str, steps: int, seed: int, output_type: str, spacing: str = "leading"):
    """diffusers with the matching scheduler built from the folder's config; the SDE tree seeded with `seed`."""
    cls_name, extra = SCHEDULERS[sampler]
    extra = {**extra, "timestep_spacing": spacing}
    if sampler == "dpmpp_sde_karras":
        extra = {**extra, "noise_sampler_seed": seed}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe._xldm_scheduler_config, **extra)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=[torch.Generator().manual_seed(seed)],
                output_type=output_type, **SIZE).images


def ours(base, sampler: str, steps: int, seed: int, output: str = "pil", batch: int = 1, spacing: str = "leading"):
    req = GenerationRequest(prompt=PROMPT, steps=steps, cfg=5.0, seed=seed, sampler=sampler, batch=batch,
                            timestep_spacing=spacing, **SIZE)
    result = Pipeline(base, device="cpu", dtype=torch.float32).generate(req, output=output)
    return result.latents if output == "latent" else result.images


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def assert_matches(base, ref_pipe, sampler: str, steps: int, seed: int = SEED, spacing: str = "leading") -> None:
    ref = reference(ref_pipe, sampler, steps, seed, "latent", spacing)
    lat = ours(base, sampler, steps, seed, "latent", spacing=spacing)
    assert lat.shape == ref.shape == (1, 4, 8, 12)
    assert (lat - ref).abs().max().item() <= LATENT_TOL * max(1.0, ref.abs().max().item())
    diff = np.abs(pixels(ours(base, sampler, steps, seed, spacing=spacing))
                  - pixels(reference(ref_pipe, sampler, steps, seed, "pil", spacing)))
    assert diff.max() <= PIXEL_TOL, f"max pixel difference {diff.max()}/255"


def test_dpmpp_sde_karras_matches_diffusers(base, ref_pipe):
    assert_matches(base, ref_pipe, "dpmpp_sde_karras", 10)


def test_dpmpp_sde_karras_with_trailing_spacing_matches_diffusers(base, ref_pipe):
    """Few-step use (Turbo / Lightning): the Karras range comes from the trailing grid's ends, noise starts at
    max(sigmas)."""
    assert_matches(base, ref_pipe, "dpmpp_sde_karras", 4, spacing="trailing")


@pytest.mark.parametrize("sampler", ["dpmpp_3m_sde", "dpmpp_3m_sde_karras"])
def test_dpmpp_3m_sde_matches_diffusers(base, ref_pipe, sampler):
    assert_matches(base, ref_pipe, sampler, 10)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_seed_reproduces_and_changes_the_image(base, sampler):
    a, again, other = (pixels(ours(base, sampler, 4, s)) for s in (SEED, SEED, SEED + 100))
    assert np.array_equal(a, again)
    assert np.abs(a - other).mean() > 1.0  # the noise, not just rounding, differs


@pytest.mark.parametrize("sampler", ["dpmpp_sde_karras", "dpmpp_3m_sde"])
def test_batch_image_equals_its_seed_alone(base, sampler):
    """A1111: image i of a batch is the image of seed + i alone (one Brownian tree / generator per image)."""
    batch = ours(base, sampler, 4, SEED, "latent", batch=2)
    solo = ours(base, sampler, 4, SEED + 1, "latent")
    assert (batch[1:] - solo).abs().max().item() <= 1e-5
    assert (batch[0] - batch[1]).abs().max().item() > 1e-2


def test_sde_tree_seed_decides_the_noise():
    """The Brownian tree follows the generator's seed, not its state: same seed, same noise; another, other."""
    from xldm.diffusion.samplers import _BrownianNoise, _tree_seeds

    x = torch.zeros(1, 4, 8, 8)
    drained = torch.Generator().manual_seed(7)
    torch.randn(10, generator=drained)
    seeds = _tree_seeds([drained])
    assert seeds == [7]
    sigma, sigma_next = torch.tensor(3.0), torch.tensor(1.5)
    a = _BrownianNoise(x, 0.03, 14.6, seeds)(sigma, sigma_next)
    b = _BrownianNoise(x, 0.03, 14.6, [7])(sigma, sigma_next)
    c = _BrownianNoise(x, 0.03, 14.6, [8])(sigma, sigma_next)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert 0.7 < a.std().item() < 1.3  # unit-variance increments
    half = _BrownianNoise(x.bfloat16(), 0.03, 14.6, [7])(sigma, sigma_next)
    assert half.dtype == torch.float32 and torch.equal(half, a)  # a CPU float32 tree whatever the latents' dtype


def test_a1111_names():
    for ours_name, a1111 in [("dpmpp_sde_karras", "DPM++ SDE Karras"), ("dpmpp_3m_sde", "DPM++ 3M SDE"),
                             ("dpmpp_3m_sde_karras", "DPM++ 3M SDE Karras")]:
        assert A1111_SAMPLER_NAMES[ours_name] == a1111 and A1111_SAMPLER_NAMES[a1111] == ours_name
    schemas = pytest.importorskip("xldm.serve.schemas")
    assert schemas.resolve_sampler("DPM++ 3M SDE", "Karras") == "dpmpp_3m_sde_karras"
    assert schemas.resolve_sampler("DPM++ SDE", "Karras") == "dpmpp_sde_karras"
    assert schemas.resolve_sampler("k_dpmpp_3m_sde") == "dpmpp_3m_sde"
