"""Hires fix (xldm.hires): parity with diffusers' txt2img followed by its img2img, on tiny random models (fp32, CPU);
the same pixels through the Python API, `xldm generate` and the HTTP API; infotext; refusals.

Parity: diffusers' StableDiffusionXLPipeline (output_type="latent" for the latent upscalers, PIL images for the
image-space ones), the same upscale, then StableDiffusionXLImg2ImgPipeline at the same strength, steps and seeds
(fresh generators seeded seed + i, as xldm's second pass).  Decoded images within 2/255 per pixel."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.hires import IMAGE_UPSCALERS, LATENT_UPSCALE_MODES, hires_target
from xldm.pipeline import Pipeline, resolve_request
from xldm.request import GenerationRequest
from xldm.pngmeta import format_a1111_parameters, parse_a1111_parameters, a1111_to_params, read_png_params
from xldm.weights.save import save_diffusers, save_single_file

from tiny_models import random_components

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PIXEL_TOL = 2  # out of 255, per pixel (the bound)
LATENT_TOL = 1e-4
PROMPT = "a red apple on a wooden table"
SEED = 77


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = random_components(TINY_SDXL_BASE, seed=0, scale=0.05)
    refiner = random_components(TINY_SDXL_REFINER, seed=1, scale=0.05)
    root = tmp_path_factory.mktemp("hires")
    return base, refiner, save_diffusers(base, root / "base"), save_diffusers(refiner, root / "refiner")


def euler_pipeline(pipeline_class, folder):
    """A diffusers pipeline of `folder` with the Euler scheduler (xldm's default sampler), no progress bar."""
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_base(models):
    return euler_pipeline(diffusers.StableDiffusionXLPipeline, models[2])


@pytest.fixture(scope="module")
def ref_img2img(ref_base):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(ref_base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_refiner(models):
    return euler_pipeline(diffusers.StableDiffusionXLImg2ImgPipeline, models[3])


def generators(batch: int, seed: int = SEED) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]


def max_diff(ours, theirs) -> int:
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in ours])
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in theirs])
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def png_pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


# --- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler,batch", [("Latent", 2), ("Latent (bicubic antialiased)", 1),
                                            ("Latent (nearest-exact)", 1)])
def test_latent_hires_equals_diffusers_txt2img_then_img2img(models, ref_base, ref_img2img, upscaler, batch):
    width, height, scale, steps, hires_steps, strength = 64, 48, 1.5, 5, 6, 0.5
    latents = ref_base(PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=width, height=height,
                       num_images_per_prompt=batch, generator=generators(batch), output_type="latent").images
    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    big = F.interpolate(latents, size=(int(height * scale) // 8, int(width * scale) // 8), mode=mode,
                        antialias=antialias)
    ref_latents = ref_img2img(PROMPT, image=big, strength=strength, num_inference_steps=hires_steps,
                              guidance_scale=5.0, num_images_per_prompt=batch, generator=generators(batch),
                              output_type="latent").images
    with torch.no_grad():
        decoded = ref_img2img.vae.decode(ref_latents / ref_img2img.vae.config.scaling_factor).sample
    ref = ref_img2img.image_processor.postprocess(decoded, output_type="pil")
    result = Pipeline(models[0], device="cpu", dtype=torch.float32)(
        PROMPT, steps=steps, width=width, height=height, seed=SEED, batch=batch, hires_scale=scale,
        hires_upscaler=upscaler, hires_strength=strength, hires_steps=hires_steps)
    assert result.images[0].size == (96, 72)
    assert (result.latents - ref_latents).abs().max().item() <= LATENT_TOL * max(1.0, ref_latents.abs().max().item())
    diff = max_diff(result.images, ref)
    print(f"hires {upscaler}: max |diff| {diff}/255")
    assert diff <= PIXEL_TOL, f"{upscaler}: max pixel difference {diff}/255"


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
def test_image_space_hires_equals_diffusers_decode_resize_img2img(models, ref_base, ref_img2img, upscaler):
    width, height, steps, strength = 48, 64, 4, 0.75
    first = ref_base(PROMPT, num_inference_steps=steps, width=width, height=height, guidance_scale=5.0,
                     generator=generators(2), num_images_per_prompt=2).images
    resized = [im.resize((80, 96), resample=IMAGE_UPSCALERS[upscaler]) for im in first]
    ref = ref_img2img([PROMPT] * 2, image=resized, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                      generator=generators(2), num_images_per_prompt=1).images
    result = Pipeline(models[0], device="cpu", dtype=torch.float32)(
        PROMPT, steps=steps, width=width, height=height, seed=SEED, batch=2, hires_size=(80, 96),
        hires_upscaler=upscaler, hires_strength=strength)
    diff = max_diff(result.images, ref)
    print(f"hires {upscaler}: max |diff| {diff}/255")
    assert diff <= PIXEL_TOL, f"{upscaler}: max pixel difference {diff}/255"


def test_refiner_takes_over_during_the_hires_pass(models, ref_base, ref_img2img, ref_refiner):
    """The first pass is the base's alone; the refiner hand-off (denoising_end / denoising_start) splits the
    second pass, as diffusers' img2img with denoising_end followed by the refiner."""
    steps, strength, switch = 6, 0.6, 0.8
    latents = ref_base(PROMPT, num_inference_steps=steps, width=64, height=64, generator=generators(1),
                       output_type="latent").images
    big = F.interpolate(latents, size=(16, 16), mode="bilinear", antialias=False)
    gens = generators(1)
    handed = ref_img2img(PROMPT, image=big, strength=strength, num_inference_steps=steps, denoising_end=switch,
                         generator=gens, output_type="latent").images
    ref = ref_refiner(PROMPT, image=handed, num_inference_steps=steps, denoising_start=switch,
                      generator=gens).images
    stages = []
    result = Pipeline(models[0], models[1], device="cpu", dtype=torch.float32).generate(
        GenerationRequest(prompt=PROMPT, steps=steps, width=64, height=64, seed=SEED, hires_scale=2.0,
                          hires_strength=strength, refiner_start=switch),
        callback=lambda stage, i, total, x, x0: stages.append(stage))
    diff = max_diff(result.images, ref)
    print(f"hires + refiner: max |diff| {diff}/255")
    assert diff <= PIXEL_TOL
    # 6 base steps, then int(6 * 0.6) = 3 hires steps of which the refiner takes those after 0.8
    assert stages[:steps] == ["base"] * steps and "hires" in stages and stages[-1] == "refiner"
    assert len(stages) == steps + 3
    assert result.params[0]["refiner_start"] == switch and result.params[0]["hires_strength"] == strength


def test_hires_steps_default_to_the_first_pass_and_batch_items_match_solo_runs(models):
    pipe = Pipeline(models[0], device="cpu", dtype=torch.float32)
    stages = []
    result = pipe.generate(GenerationRequest(prompt=PROMPT, steps=4, width=32, height=32, seed=5, batch=2,
                                             hires_scale=2.0, hires_strength=0.5),
                           callback=lambda stage, i, total, x, x0: stages.append(stage))
    assert stages == ["base"] * 4 + ["hires"] * 2  # 4 steps, then int(4 * 0.5) of a 4-step schedule
    assert result.images[1].size == (64, 64) and result.seeds == [5, 6]
    solo = pipe(PROMPT, steps=4, width=32, height=32, seed=6, hires_scale=2.0, hires_strength=0.5).images
    assert max_diff(solo, result.images[1:]) == 0
    # the upscaler matters, far beyond the parity tests' latent tolerance (so they tell the modes apart)
    modes = [pipe.generate(GenerationRequest(prompt=PROMPT, steps=4, width=32, height=32, seed=6, hires_scale=2.0,
                                             hires_strength=0.5, hires_upscaler=mode), output="latent").latents
             for mode in ("Latent", "Latent (nearest)")]
    assert (modes[0] - modes[1]).abs().max().item() > 100 * LATENT_TOL
    plain = pipe(PROMPT, steps=4, width=64, height=64, seed=5).params[0]
    assert not any(key.startswith("hires") for key in plain)  # plain images keep their metadata


# --- checks and infotext -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,message", [
    (dict(hires_scale=1.0), "hires_scale must be a number in (1, 8]"),
    (dict(hires_scale=float("nan")), "hires_scale must be a number"),
    (dict(hires_scale=2.0, hires_upscaler="ESRGAN_4x"), "unknown hires upscaler 'ESRGAN_4x'; expected one of Latent"),
    (dict(hires_scale=2.0, hires_strength=0.0), "hires_strength (denoising strength) must be in (0, 1]"),
    (dict(hires_scale=2.0, hires_strength=1.5), "must be in (0, 1], got 1.5"),
    (dict(hires_size=(100, 64)), "multiples of 8"),
    (dict(hires_size=(0, 0)), "one may be 0"),
    (dict(hires_size=(32, 32)), "smaller than the first pass's 64x64"),
    (dict(hires_scale=2.0, hires_steps=-1), "hires_steps must be an integer >= 0"),
    (dict(hires_steps=10), "hires_steps set without hires_scale or hires_size"),
    (dict(hires_scale=2.0, hires_steps=3, hires_strength=0.2), "leaves no denoising step"),
    (dict(hires_scale=2.0, init_image=Image.new("RGB", (64, 64))), "hires fix is a txt2img option"),
])
def test_bad_hires_settings_are_refused_naming_them(settings, message):
    with pytest.raises(ValueError) as info:
        resolve_request(GenerationRequest(prompt="x", width=64, height=64, **settings), default_size=64,
                        has_refiner=False)
    assert message in str(info.value)


def test_hires_target_sizes():
    def target(**kw):
        return hires_target(GenerationRequest(prompt="", width=96, height=64, **kw))
    assert target(hires_scale=2.0) == (192, 128)
    assert target(hires_scale=1.3) == (120, 80)  # int(96 * 1.3) = 124 -> 120, 83 -> 80: multiples of 8
    assert target(hires_size=(144, 0)) == (144, 96) and target(hires_size=(0, 128)) == (192, 128)
    assert target(hires_size=(160, 120), hires_scale=4.0) == (160, 120)  # a size wins over the scale (A1111)


def test_cli_refuses_hires_options_without_a_hires_size(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["generate", "x", "--hires-strength", "0.5", "--hires-steps", "4"])
    assert "--hires-strength, --hires-steps set the hires fix, which needs --hires-scale" in str(info.value)


def test_infotext_is_a1111s_and_reads_back():
    params = {"prompt": "p", "steps": 20, "sampler": "euler", "cfg": 5.0, "seed": 3, "width": 64, "height": 48,
              "hires_upscaler": "Latent (bicubic)", "hires_strength": 0.5, "hires_scale": 2.0, "hires_steps": 10}
    text = format_a1111_parameters(params)
    assert ("Size: 64x48, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 10, "
            "Hires upscaler: Latent (bicubic), Version:") in text
    back = a1111_to_params(parse_a1111_parameters(text))
    assert {k: back[k] for k in ("hires_upscaler", "hires_strength", "hires_scale", "hires_steps")} == \
        {"hires_upscaler": "Latent (bicubic)", "hires_strength": 0.5, "hires_scale": 2, "hires_steps": 10}
    assert "strength" not in back
    sized = format_a1111_parameters({**params, "hires_scale": None, "hires_size": (128, 0), "hires_steps": None})
    assert "Hires resize: 128x0, Hires upscaler" in sized and "Hires upscale:" not in sized
    assert a1111_to_params(parse_a1111_parameters(sized))["hires_size"] == (128, 0)
    # img2img's Denoising strength stays `strength`
    assert a1111_to_params(parse_a1111_parameters(format_a1111_parameters(
        {"prompt": "p", "steps": 2, "seed": 1, "cfg": 5, "strength": 0.3})))["strength"] == 0.3


# --- one behaviour everywhere: Python API, CLI, HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("hires-files")
    return save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")


@pytest.fixture(scope="module")
def client(model_file, tmp_path_factory):
    from xldm.serve.app import ServerConfig, create_app

    from running_server import RunningServer

    server = RunningServer(create_app(ServerConfig(models=[model_file], dtype=torch.float32, device="cpu")))
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    server.stop()


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_cli_python_api_and_http_give_the_same_hires_pixels(model_file, client, tmp_path, upscaler):
    from xldm.pipeline import load

    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 3, "width": 32, "height": 48, "seed": 9, "enable_hr": True, "hr_scale": 2,
        "hr_upscaler": upscaler, "denoising_strength": 0.6, "hr_second_pass_steps": 5})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.6
    assert info["extra_generation_params"] == {"Hires upscale": 2, "Hires steps": 5, "Hires upscaler": upscaler}
    assert f"Denoising strength: 0.6, Hires upscale: 2, Hires steps: 5, Hires upscaler: {upscaler}" in \
        info["infotexts"][0]
    out = tmp_path / "cli.png"
    assert cli_main(["generate", PROMPT, "--model", str(model_file), "--steps", "3", "--width", "32", "--height",
                     "48", "--seed", "9", "--hires-scale", "2", "--hires-upscaler", upscaler, "--hires-strength",
                     "0.6", "--hires-steps", "5", "--dtype", "fp32", "--device", "cpu", "--quiet",
                     "--out", str(out)]) == 0
    api = load(model_file, dtype=torch.float32, device="cpu")(
        PROMPT, steps=3, width=32, height=48, seed=9, hires_scale=2.0, hires_upscaler=upscaler, hires_strength=0.6,
        hires_steps=5).images[0]
    server, cli = png_pixels(r.json()["images"][0]), png_pixels(out.read_bytes())
    assert server.shape == (96, 64, 3)
    assert np.array_equal(server, cli) and np.array_equal(np.asarray(api), cli)
    # --from-png reads the hires settings back and makes the same image
    again = tmp_path / "again.png"
    assert cli_main(["generate", "--from-png", str(out), "--model", str(model_file), "--dtype", "fp32", "--device",
                     "cpu", "--quiet", "--out", str(again)]) == 0
    assert np.array_equal(png_pixels(again.read_bytes()), cli)
    assert read_png_params(again)["hires_upscaler"] == upscaler


def test_hires_size_over_http_and_the_discovery_routes(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1,
                                               "enable_hr": True, "hr_resize_x": 48, "hr_resize_y": 0,
                                               "hr_upscaler": "Latent (nearest)"})
    assert r.status_code == 200, r.text
    assert png_pixels(r.json()["images"][0]).shape == (48, 48, 3)
    info = json.loads(r.json()["info"])
    assert "Hires resize: 48x0" in info["infotexts"][0] and "Denoising strength: 0.7" in info["infotexts"][0]
    # enable_hr false: the hr_* fields a client always sends (webuiapi's defaults) change nothing
    plain = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1,
                                                   "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent",
                                                   "denoising_strength": 0.7, "hr_sampler_name": None,
                                                   "hr_prompt": "", "hr_checkpoint_name": None})
    assert plain.status_code == 200 and png_pixels(plain.json()["images"][0]).shape == (32, 32, 3)
    assert "Hires" not in json.loads(plain.json()["info"])["infotexts"][0]
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == list(IMAGE_UPSCALERS)
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == [{"name": n} for n in LATENT_UPSCALE_MODES]


@pytest.mark.parametrize("fields,message", [
    ({"hr_sampler_name": "DPM++ 2M"}, "hr_sampler_name"),
    ({"hr_prompt": "something else"}, "hr_prompt"),
    ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ({"hr_upscaler": "ESRGAN_4x"}, "unknown hires upscaler 'ESRGAN_4x'"),
    ({"hr_scale": 1}, "hr_scale must be > 1"),
    ({"hr_resize_x": 50}, "multiple of 8"),
    ({"denoising_strength": 0}, "denoising_strength"),
    ({"hr_scale": 4, "width": 1024, "height": 1024}, "beyond the largest allowed side"),
])
def test_http_refuses_what_the_hires_pass_does_not_apply(client, fields, message):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32,
                                               "enable_hr": True, **fields})
    assert r.status_code == 422 and message in r.text, r.text
    # the same choice equal to the first pass's is fine
    same = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1,
                                                  "enable_hr": True, "hr_sampler_name": "Euler", "hr_prompt": "x",
                                                  "hr_scale": 1.5})
    assert same.status_code == 200, same.text


def test_webuiapi_client_runs_hires_fix_and_lists_the_upscalers(client):
    """The `webuiapi` client library, as an A1111 user calls it: its txt2img sends every hr_* field."""
    webuiapi = pytest.importorskip("webuiapi")
    url = httpx.URL(str(client.base_url))
    api = webuiapi.WebUIApi(host=url.host, port=url.port, sampler="Euler", steps=2)
    result = api.txt2img(prompt="a castle", width=32, height=32, seed=3, enable_hr=True, hr_scale=1.5,
                         hr_upscaler=webuiapi.HiResUpscaler.Lanczos, denoising_strength=0.6, hr_second_pass_steps=3)
    assert result.image.size == (48, 48)
    assert "Hires upscaler: Lanczos" in result.info["infotexts"][0]
    assert [u["name"] for u in api.get_upscalers()] == list(IMAGE_UPSCALERS)
    assert [m["name"] for m in api.get_latent_upscale_modes()] == list(LATENT_UPSCALE_MODES)
