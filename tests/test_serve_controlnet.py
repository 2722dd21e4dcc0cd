"""sd-webui-controlnet's API on `xldm serve`: units in `alwayson_scripts.controlnet.args` on files of
`--controlnet-dir`, the `/controlnet/*` routes, the same pixels as `xldm generate` / the Python API with the same
unit, and refusals (a missing or unfitting file, an unknown module, settings xldm does not apply) before any work.
Tiny random models, fp32 on CPU, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xldm.config import TINY_SD15, TINY_SDXL_BASE
from xldm.controlnet import ControlUnit
from xldm.models.controlnet import ControlNet, ControlNetConfig
from xldm.pipeline import Pipeline
from xldm.pngmeta import parse_a1111_parameters
from xldm.serve.app import ServerConfig, create_app
from xldm.serve.server import crop_to_aspect
from xldm.serve.networks import legacy_model_hash
from xldm.weights.save import save_single_file

from running_server import RunningServer
from tiny_models import random_components

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red heart"
HINT = (8, 16, 24, 32)  # a small hint network


def random_controlnet_file(path, unet_config, seed: int) -> None:
    """An original-layout ControlNet file (`control_model.*`), every tensor random (zero convs too)."""
    torch.manual_seed(seed)
    net = ControlNet(ControlNetConfig(unet=unet_config, hint_channels=HINT))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_serve")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    controlnets = root / "controlnets"
    (controlnets / "sub").mkdir(parents=True)
    random_controlnet_file(controlnets / "canny_tiny.safetensors", TINY_SDXL_BASE.unet, seed=10)
    random_controlnet_file(controlnets / "sub" / "depth_tiny.safetensors", TINY_SDXL_BASE.unet, seed=11)
    random_controlnet_file(controlnets / "sd15_canny.safetensors", TINY_SD15.unet, seed=12)
    (controlnets / "broken.safetensors").write_bytes(b"not a safetensors file")
    square = np.zeros((96, 80, 3), np.uint8)
    square[20:70, 15:60] = 255
    rng = np.random.default_rng(3)
    return dict(base=base, controlnets=controlnets, sketch=Image.fromarray(square),
                noise=Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)))


@pytest.fixture(scope="module")
def client(files):
    config = ServerConfig(models=[files["base"]], dtype=torch.float32, device="cpu",
                          controlnet_dir=files["controlnets"])
    running = RunningServer(create_app(config))
    with httpx.Client(base_url=running.url, timeout=120) as c:
        yield c
    running.stop()


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def txt2img(client, units, **fields) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 5,
            "alwayson_scripts": {"controlnet": {"args": units}}, **fields}
    return client.post("/sdapi/v1/txt2img", json=body)


def test_model_module_and_version_routes(client, files):
    models = client.get("/controlnet/model_list").json()["model_list"]
    names = {m.rsplit(" [", 1)[0]: m for m in models}
    assert set(names) == {"broken", "canny_tiny", "sd15_canny", "sub/depth_tiny"}  # listed; checked when used
    assert names["canny_tiny"] == f"canny_tiny [{legacy_model_hash(files['controlnets'] / 'canny_tiny.safetensors')}]"
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == ["none", "canny"]
    assert [s["value"] for s in modules["module_detail"]["canny"]["sliders"]] == [100, 200]
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_unit_gives_the_python_api_and_cli_image(client, files, tmp_path):
    """The server's image with two units (canny with thresholds, and a plain map under a window) equals the
    Python API's at the same settings, and its infotext has the CLI's `ControlNet N` entries."""
    title = next(m for m in client.get("/controlnet/model_list").json()["model_list"] if m.startswith("canny_tiny"))
    units = [
        {"image": b64(files["sketch"]), "module": "canny", "model": title, "weight": 1.5, "threshold_a": 50,
         "threshold_b": 150, "guidance_start": 0.1, "guidance_end": 1.0, "resize_mode": "Just Resize",
         "control_mode": "Balanced", "pixel_perfect": False, "processor_res": 512},
        {"enabled": False, "image": "not even an image", "model": "absent"},  # skipped, not checked
        {"input_image": b64(files["noise"]), "module": "none", "model": "sub/depth_tiny", "weight": 0.8,
         "guidance_start": 0.0, "guidance_end": 0.6, "resize_mode": 0},
    ]
    r = txt2img(client, units)
    assert r.status_code == 200, r.text
    served = pixels(r.json()["images"][0])
    folder = files["controlnets"]
    ours = Pipeline(files["base"], device="cpu", dtype=torch.float32)(
        PROMPT, steps=3, width=64, height=64, seed=5,
        controlnets=(ControlUnit(folder / "canny_tiny.safetensors", files["sketch"], 1.5, 0.1, 1.0, "canny:50,150"),
                     ControlUnit(folder / "sub" / "depth_tiny.safetensors", files["noise"], 0.8, 0.0, 0.6)))
    assert np.abs(served.astype(int) - np.asarray(ours.images[0]).astype(int)).max() == 0
    without = pixels(txt2img(client, []).json()["images"][0])
    assert np.abs(without.astype(int) - served.astype(int)).max() > 0  # the units steer the image
    infotext = parse_a1111_parameters(json.loads(r.json()["info"])["infotexts"][0])
    assert infotext["ControlNet 0"] == ("Module: canny, Model: canny_tiny.safetensors, Weight: 1.5, "
                                        "Guidance Start: 0.1, Guidance End: 1")
    assert infotext["ControlNet 1"].startswith("Module: none, Model: depth_tiny.safetensors, Weight: 0.8")


def test_crop_and_resize_is_the_centre_crop(client, files):
    """The extension's default resize ("Crop and Resize"): the centre with the output's aspect, then resized."""
    unit = {"image": b64(files["noise"]), "model": "canny_tiny", "module": "none"}  # 80x48 onto 64x64
    r = txt2img(client, [unit])
    assert r.status_code == 200, r.text
    cropped = crop_to_aspect(files["noise"], 64, 64)
    assert cropped.size == (48, 48)
    assert np.array_equal(np.asarray(cropped), np.asarray(files["noise"])[:, 16:64])
    ours = Pipeline(files["base"], device="cpu", dtype=torch.float32)(
        PROMPT, steps=3, width=64, height=64, seed=5,
        controlnets=(ControlUnit(files["controlnets"] / "canny_tiny.safetensors", cropped),))
    assert np.abs(pixels(r.json()["images"][0]).astype(int) - np.asarray(ours.images[0]).astype(int)).max() == 0


def test_img2img_takes_units(client, files):
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 5, "denoising_strength": 0.6,
            "init_images": [b64(files["noise"])],
            "alwayson_scripts": {"controlnet": {"args": [{"image": b64(files["sketch"]), "model": "canny_tiny",
                                                          "module": "canny", "resize_mode": 0}]}}}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert "ControlNet 0" in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("unit, expected", [
    ({"model": "missing_net"}, "missing_net"),
    ({"model": "sd15_canny"}, "sd15_canny.safetensors"),
    ({"model": "broken"}, "broken.safetensors"),
    ({"module": "depth_midas"}, "depth_midas"),
    ({"control_mode": "ControlNet is more important"}, "control_mode"),
    ({"control_mode": 2}, "control_mode"),
    ({"pixel_perfect": True}, "pixel_perfect"),
    ({"low_vram": True}, "low_vram"),
    ({"resize_mode": "Resize and Fill"}, "resize_mode"),
    ({"processor_res": 1024}, "processor_res"),
    ({"image": None}, "no control image"),
    ({"image": "aGVsbG8="}, "not a PNG, JPEG or WebP"),
    ({"guidance_start": 0.7, "guidance_end": 0.3}, "start 0.7 must be below end 0.3"),
    ({"weight": -1}, "weight"),
    ({"no_such_setting": 1}, "no_such_setting"),
])
def test_bad_units_are_422_naming_the_problem(client, files, unit, expected):
    good = {"image": b64(files["sketch"]), "model": "canny_tiny", "module": "canny", "resize_mode": 0}
    start = time.perf_counter()
    r = txt2img(client, [{**good, **unit}])
    assert r.status_code == 422, r.text
    assert expected in json.dumps(r.json()["detail"]), r.text
    assert str(files["controlnets"]) not in r.text  # the server's folders are not disclosed
    assert time.perf_counter() - start < 5.0  # refused before the job is queued


@pytest.mark.parametrize("scripts", [{"controlnet": {}}, {"controlnet": {"args": {}}}, {"adetailer": {"args": []}},
                                     {"controlnet": {"args": [], "extra": 1}}])
def test_other_scripts_and_malformed_controlnet_are_422(client, scripts):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1, "width": 64, "height": 64,
                                               "alwayson_scripts": scripts})
    assert r.status_code == 422, r.text
