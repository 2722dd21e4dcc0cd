"""End-to-end parity with diffusers' SDXL pipelines on tiny random models (fp32, CPU).

The same weights (written by xldm as a diffusers folder and loaded by diffusers), the same seeds (a list
of CPU generators seeded seed + i) and the same settings must give the same pixels: decoded images
differ by at most 2/255 per pixel (the issue's bound); final latents are also compared at 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.pipeline import Pipeline
from xldm.request import GenerationRequest
from xldm.weights.save import save_diffusers

from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")

PIXEL_TOL = 2  # out of 255, per pixel
LATENT_TOL = 1e-4
PROMPT = "a red apple on a wooden table, studio light"
SEED = 1234

SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    refiner = random_components(TINY_SDXL_REFINER, seed=1, scale=0.05)
    root = tmp_path_factory.mktemp("pipes")
    base_dir = save_diffusers(base, root / "base")
    refiner_dir = save_diffusers(refiner, root / "refiner")
    return base, refiner, base_dir, refiner_dir


@pytest.fixture(scope="module")
def ref_base(models):
    return diffusers.StableDiffusionXLPipeline.from_pretrained(models[2], local_files_only=True)


@pytest.fixture(scope="module")
def ref_refiner(models):
    return diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(models[3], local_files_only=True)


def with_scheduler(pipe, sampler: str):
    """Set the diffusers scheduler matching `sampler`, always from the folder's own scheduler config
    (from_config on a previous scheduler's config would inherit its Karras / SDE options)."""
    if not hasattr(pipe, "_xldm_scheduler_config"):
        pipe._xldm_scheduler_config = dict(pipe.scheduler.config)
    cls_name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe._xldm_scheduler_config, **extra)
    return pipe


def generators(batch: int, seed: int = SEED) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def assert_pixels_close(ours, theirs) -> None:
    a, b = as_array(ours), as_array(theirs)
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255 > {PIXEL_TOL}/255"


def source_image() -> Image.Image:
    rng = np.random.default_rng(0)
    grad = np.linspace(0, 255, 96, dtype=np.float32)[None, :, None].repeat(64, 0).repeat(3, 2)
    return Image.fromarray(np.clip(grad + rng.normal(0, 20, grad.shape), 0, 255).astype(np.uint8))


# --- txt2img, one test per sampler ------------------------------------------------------------------


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_txt2img_matches_diffusers_per_sampler(models, ref_base, sampler):
    base = models[0]
    steps = 5
    ref = with_scheduler(ref_base, sampler)(
        PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=96, height=64,
        generator=generators(1), output_type="latent").images
    ours = Pipeline(base, device="cpu", dtype=torch.float32).generate(
        GenerationRequest(prompt=PROMPT, steps=steps, cfg=5.0, width=96, height=64, seed=SEED, sampler=sampler),
        output="latent").latents
    assert (ours - ref).abs().max().item() <= LATENT_TOL * max(1.0, ref.abs().max().item())
    ref_img = ref_base(PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=96, height=64,
                       generator=generators(1)).images
    our_img = Pipeline(base, device="cpu", dtype=torch.float32)(
        PROMPT, steps=steps, cfg=5.0, width=96, height=64, seed=SEED, sampler=sampler).images
    assert_pixels_close(our_img, ref_img)


def test_micro_and_negative_conditioning_and_batch(models, ref_base):
    base = models[0]
    settings = dict(num_inference_steps=4, guidance_scale=6.0, width=64, height=64)
    ref = with_scheduler(ref_base, "euler")(
        PROMPT, negative_prompt="blurry, low quality", original_size=(256, 384), crops_coords_top_left=(16, 8),
        target_size=(64, 96), negative_original_size=(128, 128), negative_target_size=(64, 64),
        negative_crops_coords_top_left=(0, 4), generator=generators(1), **settings).images
    ours = Pipeline(base, device="cpu", dtype=torch.float32)(
        PROMPT, negative_prompt="blurry, low quality", steps=4, cfg=6.0, width=64, height=64, seed=SEED,
        original_size=(384, 256), crop_top_left=(16, 8), target_size=(96, 64),
        negative_original_size=(128, 128), negative_target_size=(64, 64), negative_crop_top_left=(0, 4)).images
    assert_pixels_close(ours, ref)
    # batch of 3: image i uses seed + i, and each equals its solo run
    ref3 = ref_base(PROMPT, num_images_per_prompt=3, generator=generators(3), **settings).images
    result = Pipeline(base, device="cpu", dtype=torch.float32)(PROMPT, steps=4, cfg=6.0, width=64, height=64,
                                                               seed=SEED, batch=3)
    assert result.seeds == [SEED, SEED + 1, SEED + 2]
    assert_pixels_close(result.images, ref3)
    solo = Pipeline(base, device="cpu", dtype=torch.float32)(PROMPT, steps=4, cfg=6.0, width=64, height=64,
                                                             seed=SEED + 2).images
    assert_pixels_close(solo, result.images[2:])


def test_no_guidance_and_empty_negative(models, ref_base):
    base = models[0]
    ref = with_scheduler(ref_base, "euler")(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=4.0,
                                            width=64, height=64, generator=generators(1)).images
    ours = Pipeline(base, device="cpu", dtype=torch.float32)(PROMPT, negative_prompt="", steps=3, cfg=4.0,
                                                             width=64, height=64, seed=SEED).images
    assert_pixels_close(ours, ref)
    ref1 = ref_base(PROMPT, num_inference_steps=3, guidance_scale=1.0, width=64, height=64,
                    generator=generators(1)).images
    ours1 = Pipeline(base, device="cpu", dtype=torch.float32)(PROMPT, steps=3, cfg=1.0, width=64, height=64,
                                                              seed=SEED).images
    assert_pixels_close(ours1, ref1)


# --- base -> refiner, SDEdit, img2img, inpainting ------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_a"])
def test_base_to_refiner_handoff(models, ref_base, ref_refiner, sampler):
    base, refiner = models[0], models[1]
    gens = generators(2)
    latents = with_scheduler(ref_base, sampler)(
        PROMPT, num_inference_steps=10, denoising_end=0.8, width=64, height=64, generator=gens,
        num_images_per_prompt=2, output_type="latent").images
    ref = with_scheduler(ref_refiner, sampler)(
        [PROMPT] * 2, image=latents, num_inference_steps=10, denoising_start=0.8, generator=gens).images
    ours = Pipeline(base, refiner, device="cpu", dtype=torch.float32)(
        PROMPT, steps=10, width=64, height=64, seed=SEED, batch=2, sampler=sampler, refiner_start=0.8).images
    assert_pixels_close(ours, ref)


def test_refiner_sdedit_on_a_finished_image(models, ref_refiner):
    refiner = models[1]
    image = source_image()
    ref = with_scheduler(ref_refiner, "euler")(PROMPT, image=image, strength=0.3, num_inference_steps=20,
                                               aesthetic_score=7.0, negative_aesthetic_score=2.0,
                                               generator=generators(1)).images
    ours = Pipeline(refiner, device="cpu", dtype=torch.float32)(
        PROMPT, init_image=image, strength=0.3, steps=20, seed=SEED, aesthetic_score=7.0,
        negative_aesthetic_score=2.0).images
    assert_pixels_close(ours, ref)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_img2img_with_the_base(models, ref_base, sampler):
    base = models[0]
    image = source_image()
    img2img = with_scheduler(diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(with_scheduler(ref_base, "euler")),
                             sampler)
    ref = img2img(PROMPT, image=image, strength=0.6, num_inference_steps=8, generator=generators(2),
                  num_images_per_prompt=2).images
    ours = Pipeline(base, device="cpu", dtype=torch.float32)(
        PROMPT, init_image=image, strength=0.6, steps=8, seed=SEED, batch=2, sampler=sampler).images
    assert_pixels_close(ours, ref)


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_matches_diffusers(models, ref_base, strength):
    base = models[0]
    image = source_image()
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (24, 16, 72, 48))
    inpaint = with_scheduler(diffusers.StableDiffusionXLInpaintPipeline.from_pipe(with_scheduler(ref_base, "euler")),
                             "euler")
    ref = inpaint(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=8, width=96,
                  height=64, generator=generators(1)).images
    ours = Pipeline(base, device="cpu", dtype=torch.float32)(
        PROMPT, init_image=image, mask=mask, strength=strength, steps=8, seed=SEED).images
    assert_pixels_close(ours, ref)


# --- bad input: clear errors before any work ----------------------------------------------------------


@pytest.mark.parametrize("settings, message", [
    (dict(width=100), "multiple of 8"),
    (dict(steps=0), "steps must be"),
    (dict(sampler="lms"), "unknown sampler"),
    (dict(init_image="IMG", strength=0.0), "strength must be in"),
    (dict(init_image="IMG", strength=1.5), "strength must be in"),
    (dict(refiner_start=0.8), "without a refiner"),
    (dict(init_image="IMG", mask="SMALL_MASK"), "must match"),
    (dict(cfg=float("nan")), "cfg must be"),
    (dict(mask="SMALL_MASK"), "needs an init image"),
])
def test_bad_input_is_refused_before_work(models, settings, message):
    base = models[0]
    swap = {"IMG": source_image(), "SMALL_MASK": Image.new("L", (32, 32), 255)}
    settings = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    calls = []
    pipe._denoise = lambda *a, **k: calls.append(1)  # must never be reached
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, **settings)
    assert not calls


# --- SD 1.x / 2.x: the same loop, other configs ----------------------------------------------------------


def _tiny_sd21():
    from dataclasses import replace

    from xldm.config import TINY_SD15, TextEncoderConfig

    te = TextEncoderConfig(width=32, layers=3, heads=4, intermediate_size=64, activation="gelu", projection_dim=32,
                           final_norm_on_hidden=True, pad_token_id=0)
    unet = replace(TINY_SD15.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)
    return replace(TINY_SD15, kind="sd21", unet=unet, text_encoders=(te,), prediction_type="v")


@pytest.mark.parametrize("variant", ["sd15", "sd21-v"])
def test_sd1_and_sd2_v_prediction_match_diffusers(tmp_path, variant):
    from xldm.config import TINY_SD15
    from xldm.weights.load import load_model

    config = TINY_SD15 if variant == "sd15" else _tiny_sd21()
    model = random_components(config, seed=2)
    folder = save_diffusers(model, tmp_path / "sd")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    for sampler in ("euler", "dpmpp_2m"):
        with_scheduler(ref, sampler)
        expected = ref(PROMPT, negative_prompt="ugly", num_inference_steps=4, guidance_scale=7.0, width=64,
                       height=64, generator=generators(2), num_images_per_prompt=2).images
        # through the diffusers folder, as a user would load it
        ours = Pipeline(load_model(folder), device="cpu", dtype=torch.float32)(
            PROMPT, negative_prompt="ugly", steps=4, cfg=7.0, width=64, height=64, seed=SEED, batch=2,
            sampler=sampler).images
        assert_pixels_close(ours, expected)


def test_nine_channel_inpainting_unet_matches_diffusers(tmp_path):
    """An inpainting checkpoint (UNet input = latents + mask + masked-image latents, 9 channels)."""
    from dataclasses import replace

    from xldm.weights.load import load_model

    config = replace(TINY_SDXL_BASE, unet=replace(TINY_SDXL_BASE.unet, in_channels=9))
    model = random_components(config, seed=3)
    folder = save_diffusers(model, tmp_path / "inpaint")
    loaded = load_model(folder)
    assert loaded.config.unet.in_channels == 9
    ref = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    image = source_image()
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, 48, 32))
    for strength in (1.0, 0.7):
        expected = with_scheduler(ref, "euler")(PROMPT, image=image, mask_image=mask, strength=strength,
                                                num_inference_steps=6, width=96, height=64,
                                                generator=generators(1)).images
        ours = Pipeline(loaded, device="cpu", dtype=torch.float32)(
            PROMPT, init_image=image, mask=mask, strength=strength, steps=6, seed=SEED).images
        assert_pixels_close(ours, expected)


def test_image_of_a_batch_equals_the_image_generated_alone_with_negative_sizes(models, ref_base):
    """Image i of a batch is image i generated alone (seed + i), also with negative size conditioning: xldm lays
    the negative time ids out like the text rows.  diffusers pairs image 0's positive half with the negative sizes
    when they differ (see tests/test_conditioning.py::test_batch_rows_are_conditioned_as_when_alone), so its batch
    of two does not give its own single image back."""
    base = models[0]
    pipe = Pipeline(base, device="cpu", dtype=torch.float32)
    settings = dict(prompt=PROMPT, negative_prompt="blurry", steps=4, width=64, height=64,
                    original_size=(96, 128), negative_original_size=(32, 24), negative_target_size=(48, 40))
    batch = pipe.generate(GenerationRequest(seed=SEED, batch=2, **settings), output="latent").latents
    for i in range(2):
        alone = pipe.generate(GenerationRequest(seed=SEED + i, **settings), output="latent").latents
        assert (batch[i] - alone[0]).abs().max().item() <= LATENT_TOL
    # diffusers, same weights and seeds: its batch of two differs from its single image by over 10x that bound
    common = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4, width=64, height=64,
                  original_size=(128, 96), negative_original_size=(24, 32), negative_target_size=(40, 48),
                  output_type="latent")
    ref_batch = ref_base(**common, num_images_per_prompt=2,
                         generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)]).images
    ref_alone = ref_base(**common, generator=[torch.Generator().manual_seed(SEED)]).images
    assert (ref_batch[0] - ref_alone[0]).abs().max().item() > 10 * LATENT_TOL
    assert (batch[0] - ref_alone[0]).abs().max().item() <= LATENT_TOL  # ... and our image is diffusers' single one
