"""`xldm serve` over real HTTP: a uvicorn server on a free loopback port, tiny random single-file models, httpx.

Every /sdapi/v1 endpoint with the webui's response shapes; pixels equal to `xldm generate` for the same seed and
settings (max abs diff 0, compared as uint8 arrays); refusals of malformed, out-of-range, path-like and
oversized input (4xx, quickly, server healthy after); API key, Host and Origin checks; out of memory.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import weakref

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from xldm.cli import main as cli_main
from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.serve.app import ServerConfig, create_app
from xldm.request import Interrupted
from xldm.serve.jobs import Job, JobQueue, ModelStore, find_models
from xldm.speedups import fit_latent_preview, model_preview_map, preview_image
from xldm.weights.save import save_single_file

from running_server import RunningServer
from tiny_models import random_components

PROMPT = "a red heart"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    other = save_single_file(random_components(TINY_SDXL_BASE, seed=2), root / "other.safetensors")
    refiner = save_single_file(random_components(TINY_SDXL_REFINER, seed=1), root / "refiner.safetensors")
    return base, other, refiner


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def server(models, outputs):
    base, other, refiner = models
    config = ServerConfig(models=[base, other, refiner], refiner=refiner.name, queue_size=8, outputs=outputs,
                          dtype=torch.float32, device="cpu")
    running = RunningServer(create_app(config))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def txt2img(client, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "seed": 1, **fields}
    return client.post("/sdapi/v1/txt2img", json=body)


# --- generation ---------------------------------------------------------------------------------------------------

def test_txt2img_shapes_and_the_cli_image(client, models, tmp_path):
    base = models[0]
    settings = dict(steps=3, width=64, height=96, seed=7, cfg_scale=5.0, sampler_name="DPM++ 2M Karras",
                    negative_prompt="blurry", original_size=[512, 768], crop_top_left=[8, 0])
    r = txt2img(client, **settings)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    assert len(body["images"]) == 1
    assert body["parameters"]["prompt"] == PROMPT and body["parameters"]["seed"] == 7
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7] and info["sampler_name"] == "DPM++ 2M Karras"
    assert (info["width"], info["height"]) == (64, 96) and info["cfg_scale"] == 5.0 and info["steps"] == 3
    assert info["infotexts"][0].startswith(PROMPT) and "Seed: 7" in info["infotexts"][0]
    assert info["negative_prompt"] == "blurry" and info["batch_size"] == 1
    out = tmp_path / "cli.png"
    assert cli_main(["generate", PROMPT, "--model", str(base), "--steps", "3", "--width", "64", "--height", "96",
                     "--seed", "7", "--cfg", "5", "--sampler", "dpmpp_2m_karras", "--negative", "blurry",
                     "--original-size", "512x768", "--crop-top-left", "8,0", "--dtype", "fp32",
                     "--device", "cpu", "--out", str(out)]) == 0
    api, cli = png_pixels(body["images"][0]), png_pixels(out.read_bytes())
    assert api.shape == (96, 64, 3)
    assert np.abs(api.astype(int) - cli.astype(int)).max() == 0  # byte-for-byte the same pixels
    # the image carries its infotext, as the webui's do
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).info["parameters"] == info["infotexts"][0]


def test_n_iter_times_batch_size_and_seeds(client):
    r = txt2img(client, seed=100, batch_size=2, n_iter=2)
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 4 and info["all_seeds"] == [100, 101, 102, 103]
    assert ["Seed: 10%d" % k in t for k, t in enumerate(info["infotexts"])] == [True] * 4
    # image 3 (second batch, second image) made again alone from its seed: same pixels
    solo = txt2img(client, seed=103).json()["images"][0]
    assert np.array_equal(png_pixels(solo), png_pixels(r.json()["images"][3]))
    assert not np.array_equal(png_pixels(r.json()["images"][0]), png_pixels(r.json()["images"][1]))
    # seed -1 = random: recorded, consecutive over the images
    info = json.loads(txt2img(client, seed=-1, batch_size=2).json()["info"])
    assert 0 <= info["seed"] <= 2**32 - 2 and info["all_seeds"] == [info["seed"], info["seed"] + 1]


def test_img2img_inpaint_and_refiner_match_the_cli(client, models, tmp_path):
    base, _, refiner = models
    source = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    source.save(tmp_path / "src.png")
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [b64_png(source)], "steps": 4,
                                               "seed": 1, "cfg_scale": 5, "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["init_images"] is None  # the webui leaves them out unless include_init_images
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
    out = tmp_path / "cli.png"
    assert cli_main(["generate", PROMPT, "--model", str(base), "--init-image", str(tmp_path / "src.png"),
                     "--strength", "0.5", "--steps", "4", "--seed", "1", "--dtype", "fp32", "--device", "cpu",
                     "--out", str(out)]) == 0
    assert np.array_equal(png_pixels(r.json()["images"][0]), png_pixels(out.read_bytes()))

    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (10, 10, 40, 40))
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [b64_png(source)], "steps": 4,
                                               "seed": 1, "mask": b64_png(mask), "denoising_strength": 0.8})
    edited = png_pixels(r.json()["images"][0]).astype(int)
    assert edited.shape == (64, 80, 3)
    change = np.abs(edited - np.asarray(source).astype(int))
    assert change[10:40, 10:40].mean() > change[50:, 50:].mean()  # repainted inside the mask, kept outside

    r = txt2img(client, steps=4, seed=100, cfg_scale=5, refiner_checkpoint=refiner.name, refiner_switch_at=0.7)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["extra_generation_params"]["Refiner"] == refiner.name
    assert cli_main(["generate", PROMPT, "--model", str(base), "--refiner", str(refiner), "--refiner-start", "0.7",
                     "--steps", "4", "--width", "64", "--height", "64", "--seed", "100", "--dtype", "fp32",
                     "--device", "cpu", "--out", str(out), "--force"]) == 0
    assert np.array_equal(png_pixels(r.json()["images"][0]), png_pixels(out.read_bytes()))


def test_progress_preview_and_interrupt_within_one_step(client):
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=txt2img(client, steps=150, seed=5)))
    worker.start()
    deadline = time.time() + 30
    while True:
        p = client.get("/sdapi/v1/progress").json()
        if p["state"]["sampling_step"] >= 2 and p["current_image"]:
            break
        assert time.time() < deadline, p
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["state"]["sampling_steps"] == 150
    assert p["state"]["job_count"] == 1 and p["state"]["interrupted"] is False
    preview = png_pixels(p["current_image"])
    assert preview.shape == (8, 8, 3)  # the latent's size: 64 / 8
    assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
    assert client.post("/sdapi/v1/interrupt").json() == {}
    worker.join(30)
    r = result["r"]
    assert r.status_code == 200
    done = json.loads(r.json()["info"])["xldm"]
    assert done["interrupted"] is True and r.json()["images"] == []
    assert done["steps_done"] - done["interrupt_steps_done"] <= 1 and done["steps_done"] < 150
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_progress_preview_is_the_fitted_previewer_of_the_models_vae(models):
    """The server previews with the map fitted to the loaded model's own VAE (`xldm generate --preview`'s), one
    per VAE: two models with different VAEs get different maps, and the PNG is exactly that map's image."""
    base, other, _ = models
    store = ModelStore([base, other], dtype=torch.float32, device="cpu")
    queue = JobQueue()
    try:
        maps = {}
        for path in (base, other):
            pipe = store.pipeline(path.name, None)
            job = queue.submit(lambda job: None)  # (the worker runs it at once; the preview is read below)
            job.preview_map = maps[path.name] = model_preview_map(pipe.model)
            assert torch.equal(job.preview_map, fit_latent_preview(pipe.model.loaded.vae))
            x0 = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))
            job.x0, job.steps_done = x0, 1
            assert np.array_equal(png_pixels(queue.preview_png(job)), np.asarray(preview_image(x0, job.preview_map)))
            assert png_pixels(queue.preview_png(job)).shape == (6, 5, 3)  # latent resolution
        assert not torch.equal(maps[base.name], maps[other.name])
        job.preview_map = None  # not fitted yet: no preview rather than a wrong one
        job.steps_done = 2
        assert queue.preview_png(job) is None
    finally:
        queue.stop()


def test_job_progress_over_stages_and_batches():
    job = Job(id=1, run=lambda job: None, n_iter=2)
    job.started_at = time.time()
    x = torch.zeros(1, 4, 8, 8)
    job.begin_iteration(1, {"base": (0.0, 0.8), "refiner": (0.8, 0.2)})
    for i in range(4):
        job.step_callback("base", i, 8, x, x)
    assert abs(job.progress - (1 + 0.8 * 4 / 8) / 2) <= 1e-9  # second batch, half of the base's 80 %
    job.step_callback("refiner", 0, 2, x, x)
    assert abs(job.progress - (1 + 0.8 + 0.2 / 2) / 2) <= 1e-9 and job.steps_done == 5
    job.interrupted = True
    with pytest.raises(Interrupted):
        job.step_callback("refiner", 1, 2, x, x)


# --- the other endpoints ------------------------------------------------------------------------------------------

def test_models_samplers_options_and_switching(client, models):
    base, other, refiner = models
    listed = client.get("/sdapi/v1/sd-models").json()
    from xldm.hashes import file_sha256

    assert [m["title"] for m in listed] == [f"{p.name} [{file_sha256(p)[:10]}]" for p in (base, other, refiner)]
    assert [m["sha256"] for m in listed] == [file_sha256(p) for p in (base, other, refiner)]
    assert [m["kind"] for m in listed] == ["base", "base", "refiner"]
    assert set(listed[0]) == {"title", "model_name", "hash", "sha256", "filename", "config", "kind"}
    assert all("/" not in m["filename"] for m in listed)  # no server paths disclosed
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert "Euler a" in names and "DPM++ 2M Karras" in names and "DPM++ 3M SDE Karras" in names and "LCM" in names
    assert len(names) == 12
    assert "k_euler_a" in samplers[names.index("Euler a")]["aliases"]

    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == base.name
    first = png_pixels(txt2img(client, seed=3).json()["images"][0])
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other.name
    switched = png_pixels(txt2img(client, seed=3).json()["images"][0])
    assert np.abs(switched.astype(int) - first.astype(int)).max() > 0  # another model, another image
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": f"{base.name} [abc]"})  # the webui's title form
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == base.name
    # override_settings: for this request only
    r = txt2img(client, seed=3, override_settings={"sd_model_checkpoint": other.name})
    assert np.array_equal(png_pixels(r.json()["images"][0]), switched)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == base.name
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors"}).status_code == 422
    # sampler names the webui way, including its split sampler/scheduler form
    r = txt2img(client, sampler_name="DPM++ 2M", scheduler="Karras", seed=3)
    assert json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M Karras"
    assert txt2img(client, sampler_name="PLMS").status_code == 422
    # "SGM Uniform" is trailing spacing (few-step models): the Python API's pixels, written back into the infotext
    from xldm.pipeline import load
    from xldm.request import GenerationRequest

    r = txt2img(client, sampler_name="Euler a", scheduler="SGM Uniform", seed=3, steps=2, cfg_scale=1.0)
    assert r.status_code == 200, r.text
    assert "Schedule type: SGM Uniform" in json.loads(r.json()["info"])["infotexts"][0]
    trailing = load(base, dtype=torch.float32, device="cpu").generate(GenerationRequest(
        PROMPT, steps=2, cfg=1.0, seed=3, sampler="euler_a", timestep_spacing="trailing", width=64, height=64))
    assert np.array_equal(png_pixels(r.json()["images"][0]), np.asarray(trailing.images[0]))
    leading = png_pixels(txt2img(client, sampler_name="Euler a", seed=3, steps=2, cfg_scale=1.0).json()["images"][0])
    assert not np.array_equal(leading, np.asarray(trailing.images[0]))
    r = txt2img(client, sampler_name="DPM++ 2M Karras", scheduler="SGM Uniform")
    assert r.status_code == 422 and "does not change the DPM++ 2M Karras schedule" in r.text
    assert "'Automatic', 'Karras' or 'SGM Uniform'" in txt2img(client, scheduler="Beta").text


def test_png_info(client):
    image = txt2img(client, seed=11, negative_prompt="dull").json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": image})
    assert r.status_code == 200
    body = r.json()
    assert body["info"].startswith(PROMPT) and "Seed: 11" in body["info"]
    assert body["parameters"]["Seed"] == "11" and body["parameters"]["Negative prompt"] == "dull"
    assert body["parameters"]["Size-1"] == "64" and json.loads(body["items"]["xldm"])["seed"] == 11
    plain = client.post("/sdapi/v1/png-info", json={"image": b64_png(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


WEIGHTED = "a (red:1.4) heart BREAK [blue] sky, " + ", ".join(f"word{i}" for i in range(80))  # > 75 tokens


def test_cli_python_api_and_server_share_defaults_and_prompt_semantics(client, models, tmp_path):
    """One behaviour everywhere: with nothing but the prompt, seed and size, `xldm generate`, the Python API and
    txt2img use the same sampler, steps and CFG (GENERATE_DEFAULTS) and A1111's prompt semantics (chunks past 75
    tokens, (word:w), [word], BREAK): the same pixels.  Turned off everywhere (at 4 steps), they agree again."""
    from xldm.config import GENERATE_DEFAULTS
    from xldm.pipeline import load
    from xldm.request import GenerationRequest

    base = models[0]
    pipe = load(base, dtype=torch.float32, device="cpu")
    for plain in (False, True):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": WEIGHTED, "width": 64, "height": 64, "seed": 5,
                                                   **({"prompt_weighting": False, "steps": 4} if plain else {})})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sampler_name"] == "Euler" and GENERATE_DEFAULTS["sampler"] == "euler"
        assert (info["steps"], info["cfg_scale"]) == (4 if plain else GENERATE_DEFAULTS["steps"], GENERATE_DEFAULTS["cfg"])
        recorded = json.loads(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).info["xldm"])
        assert (recorded["long_prompts"], recorded["weighting"]) == (("truncate", False) if plain else ("chunk", True))
        out = tmp_path / f"cli{plain}.png"
        assert cli_main(["generate", WEIGHTED, "--model", str(base), "--width", "64", "--height", "64", "--seed", "5",
                         "--dtype", "fp32", "--device", "cpu", "--quiet", "--out", str(out),
                         *(["--no-prompt-weighting", "--steps", "4"] if plain else [])]) == 0
        request = GenerationRequest(prompt=WEIGHTED, width=64, height=64, seed=5,
                                    **({"long_prompts": "truncate", "weighting": False, "steps": 4} if plain else {}))
        api = np.asarray(pipe.generate(request).images[0])
        server, cli = png_pixels(r.json()["images"][0]), png_pixels(out.read_bytes())
        assert np.array_equal(server, cli) and np.array_equal(api, cli)
        assert json.loads(Image.open(out).info["xldm"])["weighting"] is not plain


def test_sd_model_hash_and_png_info_of_a_jpeg(client, models):
    import hashlib

    from xldm.pngmeta import encode_image

    r = txt2img(client, seed=12)
    info = json.loads(r.json()["info"])
    assert info["sd_model_hash"] == hashlib.sha256(models[0].read_bytes()).hexdigest()[:10]
    assert f"Model hash: {info['sd_model_hash']}, Model: base," in info["infotexts"][0]
    jpeg = encode_image(Image.new("RGB", (16, 16)), {"prompt": "a ö 桜", "steps": 3, "seed": 4, "cfg": 5.0,
                                                      "sampler": "euler"}, "JPEG")
    body = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(jpeg).decode()}).json()
    assert body["info"].startswith("a ö 桜\nSteps: 3, Sampler: Euler, CFG scale: 5.0, Seed: 4")
    assert body["parameters"]["Seed"] == "4"


def test_save_images_only_under_outputs(client, outputs):
    before = set(p.name for p in outputs.iterdir())
    r = txt2img(client, seed=21, save_images=True, batch_size=2)
    saved = json.loads(r.json()["info"])["xldm"]["saved"]
    assert saved == ["00000-21.png", "00001-22.png"]
    assert set(p.name for p in outputs.iterdir()) - before == set(saved)
    on_disk = np.asarray(Image.open(outputs / saved[1]).convert("RGB"))
    assert np.array_equal(on_disk, png_pixels(r.json()["images"][1]))
    txt2img(client, seed=23)  # save_images defaults to false, as in the webui's API
    assert len(list(outputs.iterdir())) == len(before) + 2


def test_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    for path in ("txt2img", "img2img", "progress", "interrupt", "sd-models", "samplers", "options", "png-info"):
        assert f"/sdapi/v1/{path}" in spec["paths"]
    steps = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]["steps"]
    assert steps["maximum"] == 150 and steps["minimum"] == 1
    docs = client.get("/docs")  # a plain list of the routes, not FastAPI's Swagger page (it loads from a CDN)
    assert docs.status_code == 200 and "/sdapi/v1/txt2img" in docs.text and "<script" not in docs.text
    assert "http" not in docs.text.lower()
    page = client.get("/")
    assert page.status_code == 200 and "<textarea id=\"prompt\"" in page.text
    assert "http" not in page.text.lower().replace("http-equiv", "")  # no external resources
    assert "http" not in client.get("/static/app.js").text


# --- refusals -----------------------------------------------------------------------------------------------------

def raw_request(url: str, request_line: str, headers: str = "", body: bytes = b"") -> int:
    """The status of a request sent byte for byte (no client-side path normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"{request_line}\r\nHost: {host}\r\n{headers}Content-Length: {len(body)}\r\n"
                  f"Connection: close\r\n\r\n".encode() + body)
        return int(s.recv(64).split()[1])


@pytest.mark.parametrize("raw, status", [
    (b'{"prompt": "x",', 400),
    (b"not json", 400),
    (b'{"prompt": "x", "cfg_scale": NaN}', 400),
    (b'{"prompt": "x", "cfg_scale": Infinity}', 400),
    (b'{"prompt": "x", "cfg_scale": -Infinity}', 400),
    (b"[" * 100000, 400),
])
def test_malformed_json_is_refused(server, raw, status):
    assert raw_request(server.url, "POST /sdapi/v1/txt2img HTTP/1.1", "Content-Type: application/json\r\n",
                       raw) == status


@pytest.mark.parametrize("fields", [
    {"steps": "5"}, {"steps": 2.5}, {"width": "64"}, {"prompt": 5}, {"seed": "abc"}, {"restore_faces": 1},
    {"batch_size": None}, {"original_size": [64]}, {"override_settings": []},
    {"width": 4096}, {"width": 100}, {"height": 0}, {"steps": 0}, {"steps": 151}, {"batch_size": 9},
    {"n_iter": 17}, {"cfg_scale": 31}, {"cfg_scale": -1},
    {"seed": -2}, {"seed": 2**32}, {"prompt": "x" * 8001}, {"negative_prompt": "x" * 8001},
    {"enable_hr": True, "hr_sampler_name": "DPM++ 2M"}, {"styles": ["cinematic"]},
    {"alwayson_scripts": {"controlnet": {}}},
    {"original_size": [0, 64]}, {"aesthetic_score": 11}, {"refiner_switch_at": 1.5},
    {"width": 2048, "height": 2048 + 8},
])
def test_wrong_types_and_out_of_range_are_422(client, fields):
    start = time.perf_counter()
    r = txt2img(client, **fields)
    assert r.status_code == 422, (fields, r.text)
    assert time.perf_counter() - start < 2.0  # refused before any work


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "a (red:" + "9" * 400 + ") heart"}, "prompt: prompt weight '" + "9" * 20 + "...' is not a finite"),
    ({"negative_prompt": "(dull:1" + "0" * 39 + ")"}, "negative_prompt: prompt weight of 'dull' is 1e+39, beyond"),
])
def test_prompt_weights_that_are_not_finite_are_422_before_queueing(client, fields, message):
    r = txt2img(client, **fields)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


PATHS = ["../base.safetensors", "..%2fbase.safetensors", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd",
         "..\\..\\windows\\win.ini", "C:\\models\\x.safetensors", "~/x.safetensors", "models/../base.safetensors"]


@pytest.mark.parametrize("path", PATHS)
def test_path_traversal_in_path_like_fields_is_refused(client, models, outputs, path):
    absolute = str(models[1])  # a real checkpoint's absolute path: still refused (names only)
    for value in (path, absolute):
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": value}).status_code == 422
        assert txt2img(client, refiner_checkpoint=value).status_code == 422
        assert txt2img(client, override_settings={"sd_model_checkpoint": value}).status_code == 422
    for key in ("outpath_samples", "outdir_samples", "sample_path", "filename", "hr_upscaler_dir"):
        assert txt2img(client, **{key: path}).status_code == 422
        assert client.post("/sdapi/v1/options", json={key: path}).status_code == 422
    assert client.post("/sdapi/v1/img2img", json={"init_images": [path]}).status_code == 422
    assert client.post("/sdapi/v1/png-info", json={"image": path}).status_code == 422
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0].name


@pytest.mark.parametrize("target", [
    # each names a file that exists (xldm/serve/app.py, xldm/cli.py, pyproject.toml, /etc/passwd)
    "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/cli.py", "/static/%2e%2e%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fpyproject.toml", "/static/..\\app.py", "/static/%252e%252e%252fapp.py",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/../../../../etc/passwd", "/file=/etc/passwd",
])
def test_static_files_stay_in_their_folder(server, target):
    assert raw_request(server.url, "GET /static/app.js HTTP/1.1") == 200
    assert raw_request(server.url, f"GET {target} HTTP/1.1") == 404


@pytest.mark.parametrize("image", [
    "http://127.0.0.1:9/x.png", "https://example.com/x.png", "file:///etc/passwd", "not base64!!",
    base64.b64encode(b"just some bytes").decode(),
    base64.b64encode(b"GIF89a" + b"\0" * 32).decode(),
])
def test_bad_images_are_refused(client, image):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image], "steps": 2})
    assert r.status_code == 422, r.text


def test_oversized_payloads_are_refused_quickly(client, server):
    start = time.perf_counter()
    huge = Image.new("L", (5000, 5000))  # 25 Mpixel, compresses to a few kB: refused from its header
    r = client.post("/sdapi/v1/img2img", json={"init_images": [b64_png(huge)], "steps": 2})
    assert r.status_code == 422 and "pixels" in r.text
    too_big = base64.b64encode(b"\0" * (17 * 2**20)).decode()  # 17 MiB decoded
    r = client.post("/sdapi/v1/img2img", json={"init_images": [too_big], "steps": 2})
    assert r.status_code == 422
    r = client.post("/sdapi/v1/txt2img", content=b" " * (49 * 2**20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413  # a body over 48 MiB
    assert time.perf_counter() - start < 10
    assert txt2img(client, seed=2).status_code == 200  # and the server is fine


def test_out_of_memory_fails_that_job_only(client, server, monkeypatch):
    store = server.app.state.server.store
    real = store.pipeline
    held: list[weakref.ref] = []

    def pipeline_running_out_of_memory(model, refiner):
        pipe = real(model, refiner)

        def run(request, callback=None):
            if request.prompt == "too big":
                big = torch.ones(64, 2**20)  # 256 MiB the job holds when it fails
                held.append(weakref.ref(big))
                callback("base", 0, 2, big[:1, :256].reshape(1, 4, 8, 8), big[:1, :256].reshape(1, 4, 8, 8))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return type(pipe).run(pipe, request, callback=callback)

        pipe.run = run
        return pipe

    monkeypatch.setattr(store, "pipeline", pipeline_running_out_of_memory)
    r = txt2img(client, prompt="too big")
    assert r.status_code == 500 and "out of memory" in r.json()["detail"]
    assert held[0]() is None  # what the failed job held is freed (no traceback or preview keeps it)
    r = txt2img(client, seed=4)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


# --- exposure -----------------------------------------------------------------------------------------------------

def test_api_key_host_and_origin(models):
    config = ServerConfig(models=[models[0]], api_key="s3cret", dtype=torch.float32, device="cpu")
    running = RunningServer(create_app(config))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            for path in ("/sdapi/v1/options", "/", "/openapi.json", "/sdapi/v1/progress"):
                r = c.get(path)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
            assert c.get("/sdapi/v1/options", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.post("/sdapi/v1/interrupt").status_code == 401
            assert c.get("/sdapi/v1/options", headers={"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get("/sdapi/v1/options", auth=("anyone", "s3cret")).status_code == 200  # webui --api-auth style
            assert c.get("/sdapi/v1/options", auth=("anyone", "wrong")).status_code == 401
            key = {"Authorization": "Bearer s3cret"}
            assert c.get("/", headers={**key, "Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
            assert c.post("/sdapi/v1/interrupt", headers={**key, "Origin": "http://evil.example"}).status_code == 403
            same = running.url
            assert c.post("/sdapi/v1/interrupt", headers={**key, "Origin": same}).status_code == 200
    finally:
        running.stop()


def test_serve_command_refuses_to_expose_without_a_key(models, capsys):
    import argparse

    from xldm.serve.cli import add_serve_parser, build_config

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(models[0])])
    assert (args.host, args.port, args.queue_size, args.api_key) == ("127.0.0.1", 7860, 8, None)
    config = build_config(args)
    assert config.allowed_hosts == {"127.0.0.1", "localhost", "::1"}
    with pytest.raises(ValueError, match="without --api-key"):
        build_config(parser.parse_args(["serve", "--model", str(models[0]), "--host", "0.0.0.0"]))
    config = build_config(parser.parse_args(["serve", "--model", str(models[0]), "--host", "0.0.0.0",
                                             "--allow-remote"]))
    assert config.api_key is None and config.allowed_hosts is None and "WARNING" in capsys.readouterr().err
    config = build_config(parser.parse_args(["serve", "--model", str(models[0]), "--host", "0.0.0.0",
                                             "--api-key", "k"]))
    assert config.api_key == "k"


def test_models_dir_skips_links_leading_outside(models, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "inside.safetensors").write_bytes(models[0].read_bytes())
    (folder / "outside.safetensors").symlink_to(models[1])  # a link out of the folder
    (folder / "notes.txt").write_text("not a model")
    assert [p.name for p in find_models(folder)] == ["inside.safetensors"]
