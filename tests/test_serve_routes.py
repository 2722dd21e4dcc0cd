"""`xldm serve`'s smaller A1111 routes and refusals over real HTTP, and the sampler options eta / s_churn.

One server per module, built from `xldm serve` arguments (`build_config`): a --models-dir of tiny random single-file
models, a refiner, --cors-allow-origins.  Each discovery route answers in the webui's shape; fields xldm would not
apply are a 422 naming them; a refiner never becomes the main model; CORS headers only for the allowed origin (and
none without the flag); eta / s_churn are applied, with the Python API's pixels (compared as uint8 arrays)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.diffusion.denoiser import Denoiser
from xldm.diffusion.samplers import sample
from xldm.diffusion.schedules import SAMPLER_NAMES, make_schedule
from xldm.serve.app import create_app
from xldm.serve.cli import add_serve_parser, build_config
from xldm.serve.schemas import sampler_options
from xldm.weights.save import save_single_file

from running_server import RunningServer
from tiny_models import random_components

PROMPT = "a red heart"
PAGE = "http://page.example:3000"  # the origin --cors-allow-origins lets in


def serve_config(*flags: str):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return build_config(parser.parse_args(["serve", *flags, "--dtype", "fp32", "--device", "cpu"]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), folder / "base.safetensors")
    refiner = save_single_file(random_components(TINY_SDXL_REFINER, seed=1),
                               tmp_path_factory.mktemp("refiners") / "refiner.safetensors")
    return folder, base, refiner


@pytest.fixture(scope="module")
def client(models):
    folder, _, refiner = models
    running = RunningServer(create_app(serve_config("--models-dir", str(folder), "--refiner", str(refiner),
                                                    "--cors-allow-origins", PAGE)))
    with httpx.Client(base_url=running.url, timeout=120) as c:
        yield c
    running.stop()


def txt2img(client, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 4, **fields}
    return client.post("/sdapi/v1/txt2img", json=body)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def detail(r: httpx.Response) -> str:
    return json.dumps(r.json()["detail"])


# --- discovery routes -----------------------------------------------------------------------------------------------

def test_discovery_routes_answer_in_the_webuis_shape(client):
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert [s["name"] for s in schedulers] == ["automatic", "karras", "sgm_uniform"]
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for s in schedulers)
    memory = client.get("/sdapi/v1/memory").json()
    assert set(memory) == {"ram", "cuda"} and set(memory["ram"]) == {"free", "used", "total"}
    assert all(isinstance(memory["ram"][k], int) and memory["ram"][k] > 0 for k in ("used", "total"))
    assert "error" in memory["cuda"] or set(memory["cuda"]) >= {"system", "active", "allocated", "reserved"}
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["models_dir"] is True and flags["refiner"] is True  # folders and files: only whether given
    assert flags["api_key"] is False and flags["cors_allow_origins"] == PAGE and flags["port"] == 7860
    assert "/" not in json.dumps({k: v for k, v in flags.items() if k != "cors_allow_origins"})  # no server paths
    for route in ("face-restorers", "prompt-styles", "hypernetworks"):
        assert client.get(f"/sdapi/v1/{route}").json() == []
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert upscalers and all({"name", "model_name", "model_path", "model_url", "scale"} <= set(u) for u in upscalers)
    assert "Lanczos" in [u["name"] for u in upscalers]
    modes = client.get("/sdapi/v1/latent-upscale-modes").json()
    assert modes and all(set(m) == {"name"} for m in modes) and "Latent" in [m["name"] for m in modes]
    for route in ("extra-single-image", "extra-batch-images"):
        r = client.post(f"/sdapi/v1/{route}", json={"image": ""})
        assert r.status_code == 422 and "not available" in r.json()["detail"]
    assert client.post("/sdapi/v1/skip").json() == {}  # nothing running: a no-op
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_refresh_checkpoints_offers_new_files_and_drops_gone_ones(client, models):
    folder, base, _ = models
    names = lambda: [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()]  # noqa: E731
    assert "extra" not in names()
    shutil.copy(base, folder / "extra.safetensors")
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    listed = client.get("/sdapi/v1/sd-models").json()
    extra = next(m for m in listed if m["filename"] == "extra.safetensors")
    assert extra["kind"] == "base" and len(extra["sha256"]) == 64
    assert extra["title"] == f"extra.safetensors [{extra['sha256'][:10]}]"
    (folder / "extra.safetensors").unlink()
    client.post("/sdapi/v1/refresh-checkpoints")
    assert not any(m["filename"] == "extra.safetensors" for m in client.get("/sdapi/v1/sd-models").json())


# --- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route,extra", [("txt2img", {}), ("img2img", {"init_images": ["x"]})])
def test_unknown_fields_are_refused_by_name(client, route, extra):
    r = client.post(f"/sdapi/v1/{route}", json={"prompt": PROMPT, "sampler_nmae": "Euler", "cfg": 3, **extra})
    assert r.status_code == 422
    assert "cfg, sampler_nmae: not a field xldm applies" in detail(r)


def test_a_refiner_never_becomes_the_main_model(client):
    refiner = next(m for m in client.get("/sdapi/v1/sd-models").json() if m["kind"] == "refiner")
    for name in (refiner["model_name"], refiner["title"]):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert 400 <= r.status_code < 500 and "refiner" in r.text
        r = txt2img(client, override_settings={"sd_model_checkpoint": name})
        assert 400 <= r.status_code < 500 and "refiner" in r.text
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "base.safetensors"


def test_cors_headers_only_for_the_allowed_origin(client, models):
    r = client.get("/sdapi/v1/samplers", headers={"Origin": PAGE})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
    preflight = client.options("/sdapi/v1/txt2img", headers={
        "Origin": PAGE, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == PAGE
    assert "POST" in preflight.headers["access-control-allow-methods"]
    other = client.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
    # without --cors-allow-origins: no CORS headers at all, cross-origin refused
    plain = RunningServer(create_app(serve_config("--model", str(models[1]))))
    try:
        with httpx.Client(base_url=plain.url, timeout=60) as c:
            r = c.get("/sdapi/v1/samplers")
            assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
            r = c.get("/sdapi/v1/samplers", headers={"Origin": PAGE})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    finally:
        plain.stop()


# --- eta and churn --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def python_api(models):
    import xldm

    return xldm.load(models[1], dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("sampler,fields,infotext", [
    ("Euler", {"s_churn": 2.0, "s_tmax": 0, "s_noise": 0.95}, "Sigma churn: 2.0, Sigma noise: 0.95"),
    ("Euler a", {"eta": 0.5}, "Eta: 0.5"),
    ("DDIM", {"eta": 0.7}, "Eta DDIM: 0.7"),
])
def test_eta_and_churn_are_applied_as_in_the_python_api(client, python_api, sampler, fields, infotext):
    default = txt2img(client, sampler_name=sampler)
    r = txt2img(client, sampler_name=sampler, **fields)
    assert r.status_code == 200, r.text
    image = pixels(r.json()["images"][0])
    assert np.abs(image.astype(int) - pixels(default.json()["images"][0]).astype(int)).max() > 0
    assert infotext in json.loads(r.json()["info"])["infotexts"][0]
    from xldm.pngmeta import A1111_SAMPLER_NAMES

    options = {k: (float("inf") if k == "s_tmax" and v == 0 else v) for k, v in fields.items()}
    ours = python_api(PROMPT, steps=3, width=64, height=64, seed=4, sampler=A1111_SAMPLER_NAMES[sampler],
                      **options).images[0]
    assert np.array_equal(np.asarray(ours.convert("RGB")), image)


def test_webui_clients_default_options_change_nothing(client):
    """webuiapi sends eta=1.0, s_churn=0, s_tmax=0, s_tmin=0, s_noise=1 with every request, whatever the sampler."""
    sent = {"eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1}
    for sampler in ("Euler", "DPM++ 2M", "Euler a"):
        plain, given = txt2img(client, sampler_name=sampler), txt2img(client, sampler_name=sampler, **sent)
        assert given.status_code == 200, given.text
        assert np.array_equal(pixels(plain.json()["images"][0]), pixels(given.json()["images"][0]))
        info = json.loads(given.json()["info"])["infotexts"][0]
        assert "Eta" not in info and "Sigma" not in info


@pytest.mark.parametrize("fields,words", [
    ({"sampler_name": "Euler", "eta": 0.5}, ["eta=0.5", "Euler sampler adds no noise", "Euler a", "DDIM"]),
    ({"sampler_name": "DPM++ 2M", "s_churn": 1.0}, ["s_churn=1", "has no churn", "Euler"]),
    ({"sampler_name": "Heun", "s_noise": 0.5}, ["s_noise=0.5", "Euler"]),
    ({"sampler_name": "Euler", "s_noise": 0.5}, ["s_noise", "s_churn > 0"]),
    ({"sampler_name": "Euler", "s_min_uncond": 1.0}, ["s_min_uncond=1"]),
])
def test_options_the_sampler_cannot_apply_are_422(client, fields, words):
    r = txt2img(client, **fields)
    assert r.status_code == 422
    for word in words:
        assert word in detail(r), detail(r)


def test_webuiapi_client_runs_txt2img_img2img_and_the_discovery_calls(client):
    """The `webuiapi` client library as an A1111 user calls it: discovery, model selection, txt2img, img2img; every
    call answers without an error, and the images have the asked size and an infotext naming the model."""
    webuiapi = pytest.importorskip("webuiapi")
    url = httpx.URL(str(client.base_url))
    api = webuiapi.WebUIApi(host=url.host, port=url.port, sampler="Euler", steps=2)
    models = api.util_get_model_names()
    base = next(name for name in models if name.startswith("base.safetensors"))
    assert "Euler" in api.util_get_sampler_names() and "Euler a" in api.util_get_sampler_names()
    for call in (api.get_options, api.get_cmd_flags, api.get_sd_vae, api.get_upscalers, api.get_sd_models,
                 api.get_hypernetworks, api.get_face_restorers, api.get_prompt_styles, api.get_scripts,
                 api.get_embeddings, api.get_memory, api.get_schedulers, api.get_loras, api.get_progress):
        assert call() is not None, call.__name__
    api.util_set_model(base)
    assert api.util_get_current_model().split(" [")[0] in base
    first = api.txt2img(prompt=PROMPT, width=64, height=48, seed=5)
    assert first.image.size == (64, 48)
    assert "Model: " in first.info["infotexts"][0] and "Model hash: " in first.info["infotexts"][0]
    second = api.img2img(images=[first.image], prompt=PROMPT, denoising_strength=0.5, width=64, height=48, seed=5)
    assert second.image.size == (64, 48)
    assert "Denoising strength: 0.5" in second.info["infotexts"][0]
    assert not np.array_equal(np.asarray(first.image), np.asarray(second.image))


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sampler_options_tell_the_truth(sampler):
    """/sdapi/v1/samplers' option flags describe xldm's samplers: `second_order` ones call the network more than
    once a step, noise-drawing ones (`uses_ensd`, `brownian_noise`; DDIM at eta 1) depend on the generator, and
    `scheduler: karras` ones step on Karras sigmas (the schedule's largest is the training maximum's)."""
    options = sampler_options(sampler)
    calls = []

    def model_fn(x, t):
        calls.append(1)
        return 0.1 * x

    steps = 4
    schedule = make_schedule(sampler, steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * schedule.init_noise_sigma
    eta = 1.0 if sampler == "ddim" else None
    runs = [sample(sampler, Denoiser("epsilon", model_fn), x.clone(), schedule, eta=eta,
                   generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    per_run = len(calls) // 2
    assert (per_run > steps) == (options.get("second_order") == "True"), (sampler, per_run)
    stochastic = not torch.equal(runs[0], runs[1])
    assert stochastic == ("uses_ensd" in options or "brownian_noise" in options), sampler
    assert (options.get("scheduler") == "karras") == sampler.endswith("_karras")


def test_samplers_route_lists_the_options(client):
    items = {item["name"]: item for item in client.get("/sdapi/v1/samplers").json()}
    assert items["DPM++ 2M Karras"]["options"] == {"scheduler": "karras"}
    assert items["Euler"]["options"] == {}
    assert items["DPM++ SDE Karras"]["options"]["brownian_noise"] == "True"
