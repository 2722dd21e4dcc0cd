"""The page at `/` in a real browser: headless Debian Chromium driven by Playwright against a running server.

Loads the page, types a prompt, generates, sees the progress bar move with a preview, sees the image in the
gallery with its parameters, downloads it, and checks the download has the same pixels as the API gives for
the same settings (max abs diff 0).  Skipped only when Chromium is not installed (`.ci/install-browser`).
A second test drives the page against the bundled default model, as `xldm serve` with no flags serves it.
Set XLDM_SCREENSHOT=FILE.png to also write a screenshot of that page (docs/serve.png is made this way).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from xldm.config import TINY_SDXL_BASE, TINY_SDXL_REFINER
from xldm.serve.app import ServerConfig, create_app
from xldm.weights.save import save_single_file

from running_server import RunningServer
from tiny_models import random_components

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (run .ci/install-browser)")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module; each test gets its own context (fresh storage) from it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def browser_page(browser):
    """A page in a new browser context (no cookies, no storage), 1100 x 760, downloads allowed."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 760})
    try:
        yield context.new_page()
    finally:
        context.close()


def cpu_server(models, refiner):
    return RunningServer(create_app(ServerConfig(models=models, refiner=refiner, dtype=torch.float32, device="cpu")))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    refiner = save_single_file(random_components(TINY_SDXL_REFINER, seed=1), root / "refiner.safetensors")
    other = save_single_file(random_components(TINY_SDXL_BASE, seed=2), root / "other.safetensors")
    running = cpu_server([base, refiner, other], refiner.name)
    yield running
    running.stop()


def test_page_generates_shows_progress_and_downloads(server, browser, tmp_path):
    with browser_page(browser) as page:
        external = []
        local = (server.url, "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(local) else external.append(r.url))
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#size option').length > 0")
        assert page.locator("#size").input_value() == "64x64"  # the model's native size, from the buckets
        assert page.locator("#sampler option").count() == 12  # SAMPLER_NAMES: lcm and the SDE samplers included
        # the shared defaults (xldm.config.GENERATE_DEFAULTS), as the CLI and the API use them
        assert [page.locator(f"#{name}").input_value() for name in ("sampler", "steps", "cfg")] == ["Euler", "30", "5"]
        assert page.locator("#refiner").is_enabled()

        page.fill("#prompt", "a lighthouse at dusk")
        page.fill("#negative", "blurry")
        page.fill("#steps", "40")
        page.fill("#cfg", "5")
        page.fill("#seed", "1234")
        page.select_option("#sampler", "Euler a")
        page.check("#refiner")
        page.click("#advanced summary")
        page.fill("#orig-w", "128")
        page.fill("#orig-h", "128")
        page.click("#generate")

        # progress: the bar moves and a preview appears while the job runs
        page.wait_for_function("parseFloat(document.getElementById('bar-fill').style.width) > 0"
                               " && document.getElementById('progress-text').textContent.includes('%')",
                               timeout=30000)
        page.wait_for_selector("#preview[src^='data:image/png']", state="visible", timeout=30000)
        assert page.locator("#interrupt").is_enabled()

        figure = page.locator("figure.result").first
        figure.wait_for(timeout=60000)
        params = figure.locator("pre.params").text_content()
        assert params.startswith("a lighthouse at dusk") and "Seed: 1234" in params and "Steps: 40" in params
        assert "Sampler: Euler a" in params and "Negative prompt: blurry" in params
        # A1111 names checkpoints by their file stem (modules/sd_models.py name_for_extra)
        assert "Refiner: refiner," in params and "Refiner switch at: 0.8" in params and "Model: base," in params
        assert page.evaluate("document.querySelector('figure.result img').naturalWidth") == 64
        assert page.locator("#progress-text").text_content().startswith("done")

        with page.expect_download() as download_info:
            figure.locator("a.download").click()
        download = download_info.value
        assert download.suggested_filename == "xldm-1234.png"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        page.wait_for_selector("#generate:enabled")  # ready for the next one
        assert page.locator("#interrupt").is_disabled() and page.locator("#preview").is_hidden()
        assert external == []  # the page loaded nothing from anywhere else

    downloaded = np.asarray(Image.open(saved).convert("RGB"))
    assert Image.open(saved).info["parameters"] == params  # the file carries its parameters
    body = {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "steps": 40, "cfg_scale": 5,
            "seed": 1234, "sampler_name": "Euler a", "width": 64, "height": 64, "original_size": [128, 128],
            "crop_top_left": [0, 0], "aesthetic_score": 6, "negative_aesthetic_score": 2.5,
            "refiner_checkpoint": "refiner.safetensors", "refiner_switch_at": 0.8}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        api = c.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    api_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(api))).convert("RGB"))
    assert np.abs(downloaded.astype(int) - api_pixels.astype(int)).max() == 0


def open_page(page, url):
    """Load the page and wait until its lists (config, models, LoRAs, optional blocks) have loaded."""
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def init_png(tmp_path) -> tuple[Path, str]:
    """A 64 x 64 init image (a colour ramp) as a file and as base64."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8)
    path = tmp_path / "init.png"
    Image.fromarray(pixels).save(path)
    return path, base64.b64encode(path.read_bytes()).decode("ascii")


def wait_for_results(page, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('figure.result').length >= {count}", timeout=60000)
    page.wait_for_selector("#generate:enabled")
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def newest_result_pixels(page) -> np.ndarray:
    png = bytes(page.evaluate("async () => { const r = await fetch(document.querySelector("
                              "'figure.result img').src); return Array.from(new Uint8Array("
                              "await r.arrayBuffer())); }"))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def api_pixels(server, route: str, **fields) -> np.ndarray:
    """The image the API gives for the page's settings (its defaults written out, as a client would send)."""
    body = {"negative_prompt": "", "sampler_name": "Euler", "cfg_scale": 5, "width": 64, "height": 64,
            "crop_top_left": [0, 0], "aesthetic_score": 6, "negative_aesthetic_score": 2.5, **fields}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        response = c.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    image = response.json()["images"][0]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))


def sent_bodies(page, route: str) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith(route) else None)
    return bodies


def test_sizes_are_labelled_by_aspect_ratio_and_absent_features_stay_hidden(server, browser):
    with browser_page(browser) as page:
        open_page(page, server.url)
        options = page.eval_on_selector_all("#size option", "os => os.map(o => [o.value, o.textContent])")
        assert len(options) == 23 and page.locator("#size").input_value() == "64x64"
        for value, label in options:  # the label's ratio is the size's own ratio
            width, height = map(int, value.split("x"))
            ratio = label.split(" ")[0]
            a, b = map(float, ratio.split(":"))
            assert abs(a / b - width / height) < 0.006, (value, label)
            assert label.endswith(f"· {value}")
        assert dict(options)["64x64"] == "1:1 · 64x64"
        # SDXL's 1024^2 buckets (SDXL paper, App. I): exact ratios, and the common name where within 2%
        labels = page.evaluate("[[1024,1024],[1344,768],[768,1344],[1152,896],[1216,832],[1536,640],[1472,704]]"
                               ".map(([w, h]) => aspectLabel(w, h))")
        assert labels == ["1:1", "7:4 ≈16:9", "4:7 ≈9:16", "9:7", "19:13", "12:5", "2.09:1"]
        # hires fix and ControlNet show only when the server has their routes
        with httpx.Client(base_url=server.url) as c:
            has_upscalers = c.get("/sdapi/v1/upscalers").status_code != 404
            has_controlnet = c.get("/controlnet/model_list").status_code != 404
        assert page.locator("#hires-box").is_visible() == has_upscalers
        assert page.locator("#cn-box").is_visible() == has_controlnet


def test_hires_fix_and_controlnet_send_a1111_fields(server, browser, tmp_path):
    """With the routes answered (intercepted here), the blocks appear and the txt2img request carries A1111's
    hires-fix fields and the ControlNet extension's unit; the server's refusal is shown as it comes."""
    control_path, control_b64 = init_png(tmp_path)
    with browser_page(browser) as page:
        page.route("**/sdapi/v1/upscalers", lambda route: route.fulfill(
            json=[{"name": "None"}, {"name": "Lanczos"}, {"name": "R-ESRGAN 4x+"}]))
        page.route("**/sdapi/v1/latent-upscale-modes", lambda route: route.fulfill(json=[{"name": "Latent"}]))
        page.route("**/controlnet/model_list", lambda route: route.fulfill(json={"model_list": ["canny-small"]}))
        sent = []

        def refuse(route):
            sent.append(route.request.post_data_json)
            route.fulfill(status=422, json={"detail": "hr_upscaler: not this one"})

        page.route("**/sdapi/v1/txt2img", refuse)
        open_page(page, server.url)
        assert page.locator("#hires-box").is_visible() and page.locator("#cn-box").is_visible()
        assert page.eval_on_selector_all("#hr-upscaler option", "os => os.map(o => o.value)") == [
            "Latent", "Lanczos", "R-ESRGAN 4x+"]
        page.click("#hires-box summary")
        page.check("#hr-enable")
        page.fill("#hr-scale", "1.5")
        page.select_option("#hr-upscaler", "Lanczos")
        page.fill("#hr-strength", "0.4")
        page.fill("#hr-steps", "3")
        page.click("#cn-box summary")
        page.check("#cn-enable")
        page.set_input_files("#cn-file", str(control_path))
        page.wait_for_selector("#cn-preview", state="visible")
        page.select_option("#cn-module", "canny")
        page.fill("#cn-weight", "0.8")
        page.fill("#cn-start", "0.1")
        page.fill("#cn-end", "0.9")
        page.fill("#prompt", "a tower")
        page.click("#generate")
        page.wait_for_selector("#error", state="visible")
        assert page.locator("#error").text_content() == "txt2img: HTTP 422: hr_upscaler: not this one"
        body = sent[0]
        assert {k: body[k] for k in ("enable_hr", "hr_scale", "hr_upscaler", "denoising_strength",
                                      "hr_second_pass_steps")} == {
            "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.4,
            "hr_second_pass_steps": 3}
        assert body["alwayson_scripts"] == {"controlnet": {"args": [{
            "image": control_b64, "module": "canny", "model": "canny-small", "weight": 0.8,
            "guidance_start": 0.1, "guidance_end": 0.9}]}}
        # hires fix is txt2img's: the img2img tab hides it and sends none of its fields
        page.click("#modes [data-mode=img2img]")
        assert page.locator("#hires-box").is_hidden() and page.locator("#cn-box").is_visible()


def test_img2img_with_an_uploaded_image_matches_the_api(server, browser, tmp_path):
    path, init_b64 = init_png(tmp_path)
    with browser_page(browser) as page:
        open_page(page, server.url)
        assert page.locator("#init-box").is_hidden()
        page.click("#modes [data-mode=img2img]")
        page.click("#generate")  # no init image yet: said so, nothing sent
        assert page.locator("#error").text_content() == "img2img: choose or drop an init image first"
        bodies = sent_bodies(page, "/sdapi/v1/img2img")
        page.set_input_files("#init-file", str(path))
        page.wait_for_selector("#init-preview", state="visible")
        page.fill("#prompt", "a harbour")
        page.fill("#steps", "3")
        page.fill("#seed", "77")
        page.fill("#strength", "0.6")
        page.click("#generate")
        wait_for_results(page, 1)
        params = page.locator("figure.result pre.params").first.text_content()
        assert "Denoising strength: 0.6" in params and "Seed: 77" in params
        pixels = newest_result_pixels(page)
    assert bodies[0]["init_images"] == [init_b64] and bodies[0]["denoising_strength"] == 0.6
    assert "mask" not in bodies[0]
    api = api_pixels(server, "img2img", prompt="a harbour", steps=3, seed=77, init_images=[init_b64],
                     denoising_strength=0.6)
    assert np.abs(pixels.astype(int) - api.astype(int)).max() == 0


def test_inpainting_sends_the_painted_mask(server, browser, tmp_path):
    _, init_b64 = init_png(tmp_path)
    with browser_page(browser) as page:
        open_page(page, server.url)
        page.click("#modes [data-mode=inpaint]")
        dropped = page.evaluate_handle(  # the init image dropped onto its box rather than chosen
            "(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));"
            " const dt = new DataTransfer(); dt.items.add(new File([bytes], 'init.png', {type: 'image/png'}));"
            " return dt; }", init_b64)
        page.dispatch_event("#init-drop", "drop", {"dataTransfer": dropped})
        page.wait_for_selector("#mask-canvas", state="visible")
        assert page.locator("#init-preview").get_attribute("src") == f"data:image/png;base64,{init_b64}"
        page.fill("#prompt", "a window")
        page.fill("#steps", "2")
        page.fill("#seed", "5")
        page.click("#generate")  # nothing painted yet
        assert page.locator("#error").text_content() == "inpainting: paint the area to repaint on the image first"
        box = page.locator("#mask-canvas").bounding_box()  # 256 px on screen for 64 image pixels
        scale = box["width"] / 64
        page.fill("#brush", "8")
        page.mouse.move(box["x"] + 12 * scale, box["y"] + 32 * scale)  # a stroke across rows 28..36, x 8..56
        page.mouse.down()
        page.mouse.move(box["x"] + 52 * scale, box["y"] + 32 * scale, steps=8)
        page.mouse.up()
        page.check("#eraser")  # erase the stroke's right part again
        page.mouse.move(box["x"] + 44 * scale, box["y"] + 32 * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + 60 * scale, box["y"] + 32 * scale, steps=4)
        page.mouse.up()
        bodies = sent_bodies(page, "/sdapi/v1/img2img")
        page.click("#generate")
        wait_for_results(page, 1)
        pixels = newest_result_pixels(page)
    body = bodies[0]
    assert body["init_images"] == [init_b64] and body["inpainting_mask_invert"] == 0
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))).convert("L"))
    assert mask.shape == (64, 64)
    assert mask[32, 14:38].min() == 255  # painted
    assert mask[32, 48:].max() == 0 and mask[:20].max() == 0 and mask[44:].max() == 0  # erased / never painted
    api = api_pixels(server, "img2img", prompt="a window", steps=2, seed=5, init_images=[init_b64],
                     denoising_strength=0.75, mask=body["mask"], inpainting_mask_invert=0)
    assert np.abs(pixels.astype(int) - api.astype(int)).max() == 0


def test_history_survives_a_reload_reuses_seeds_sends_to_img2img_and_reads_dropped_pngs(server, browser):
    with browser_page(browser) as page:
        open_page(page, server.url)
        assert page.locator("figure.history-item").count() == 0
        page.fill("#prompt", "a red kite")
        page.fill("#negative", "fog")
        page.fill("#steps", "2")
        page.fill("#seed", "4321")
        page.select_option("#sampler", "Euler a")
        page.click("#generate")
        wait_for_results(page, 1)
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        item = page.locator("figure.history-item").first
        assert page.locator("figure.history-item").count() == 1 and page.locator("figure.result").count() == 0
        params = item.locator("pre.params").text_content()
        assert params.startswith("a red kite") and "Seed: 4321" in params
        assert page.locator("#seed").input_value() == "-1"
        item.locator("button.reuse-seed").click()
        assert page.locator("#seed").input_value() == "4321"
        stored = item.locator("img").get_attribute("src")
        item.locator("button.send-img2img").click()
        page.wait_for_selector("#init-preview", state="visible")
        assert page.locator("#modes [data-mode=img2img]").get_attribute("aria-selected") == "true"
        assert page.locator("#init-preview").get_attribute("src") == stored

        # dropping the PNG outside the init-image box reads its parameters into the form
        page.click("#modes [data-mode=txt2img]")
        for field, value in (("#prompt", "something else"), ("#negative", ""), ("#steps", "30"), ("#seed", "-1")):
            page.fill(field, value)
        page.select_option("#sampler", "Euler")
        dropped = page.evaluate_handle(
            "(url) => { const bytes = Uint8Array.from(atob(url.split(',')[1]), (c) => c.charCodeAt(0));"
            " const dt = new DataTransfer(); dt.items.add(new File([bytes], 'kite.png', {type: 'image/png'}));"
            " return dt; }", stored)
        page.dispatch_event("#output", "drop", {"dataTransfer": dropped})
        page.wait_for_function("document.getElementById('progress-text').textContent.startsWith('parameters')")
        assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
        assert [page.locator(f).input_value() for f in ("#prompt", "#negative", "#steps", "#seed", "#sampler",
                                                         "#size")] == [
            "a red kite", "fog", "2", "4321", "Euler a", "64x64"]
        # a PNG without parameters is said to have none
        plain = page.evaluate_handle(
            "async () => { const c = document.createElement('canvas'); c.width = c.height = 8;"
            " const blob = await new Promise((r) => c.toBlob(r, 'image/png')); const dt = new DataTransfer();"
            " dt.items.add(new File([blob], 'plain.png', {type: 'image/png'})); return dt; }")
        page.dispatch_event("#output", "drop", {"dataTransfer": plain})
        page.wait_for_selector("#error", state="visible")
        assert page.locator("#error").text_content() == "plain.png carries no generation parameters"


def test_model_picker_switches_the_checkpoint_and_shows_refusals(server, browser):
    def checkpoint():
        with httpx.Client(base_url=server.url) as c:
            return c.get("/sdapi/v1/options").json()["sd_model_checkpoint"]

    with browser_page(browser) as page:
        open_page(page, server.url)
        # the bases of /sdapi/v1/sd-models; the refiner cannot be the main model
        assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [
            "base.safetensors", "other.safetensors"]
        assert page.locator("#model").input_value() == "base.safetensors"
        page.select_option("#model", "other.safetensors")
        page.wait_for_function("document.getElementById('progress-text').textContent === "
                               "'model: other.safetensors'")
        assert checkpoint() == "other.safetensors" and page.locator("#error").is_hidden()
        # a name the server does not have (as when a file was removed since the page loaded): its 422, shown
        page.evaluate("document.getElementById('model').add(new Option('gone', 'gone.safetensors'))")
        page.select_option("#model", "gone.safetensors")
        page.wait_for_selector("#error", state="visible")
        error = page.locator("#error").text_content()
        assert error.startswith("switching to gone.safetensors: HTTP 422: ") and "not found" in error
        assert page.locator("#model").input_value() == "other.safetensors" == checkpoint()
        page.select_option("#model", "base.safetensors")
        page.wait_for_function("document.getElementById('progress-text').textContent === 'model: base.safetensors'")
    assert checkpoint() == "base.safetensors"


@pytest.fixture(scope="module")
def bundled_server():
    from xldm.config import DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH

    running = cpu_server([DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH], DEFAULT_REFINER_PATH.name)
    yield running
    running.stop()


def test_page_with_the_bundled_model_draws_a_red_heart(bundled_server, browser):
    with browser_page(browser) as page:
        page.goto(bundled_server.url + "/")
        page.wait_for_function("document.querySelectorAll('#size option').length > 0")
        assert page.locator("#size").input_value() == "128x128"  # the bundled model's native size
        for prompt, seed in (("grinning face", 1), ("red heart", 3)):
            count = page.locator("figure.result").count()
            page.fill("#prompt", prompt)
            page.fill("#seed", str(seed))
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('figure.result').length > {count}",
                                   timeout=60000)
            page.wait_for_selector("#generate:enabled")
        figure = page.locator("figure.result").first  # the newest first
        assert figure.locator("pre.params").text_content().startswith("red heart")
        png = bytes(page.evaluate("async () => { const r = await fetch(document.querySelector("
                                  "'figure.result img').src); return Array.from(new Uint8Array("
                                  "await r.arrayBuffer())); }"))
        if os.environ.get("XLDM_SCREENSHOT"):
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=os.environ["XLDM_SCREENSHOT"], full_page=True)
    # The image the page shows is a red heart's colours: red well above green and blue where it is not white.
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    ink = rgb[rgb.min(axis=2) < 200]
    assert len(ink) > 0.1 * rgb.shape[0] * rgb.shape[1]
    red, green, blue = ink.mean(axis=0)
    assert red > green + 60 and red > blue + 60, (red, green, blue)
