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


@contextlib.contextmanager
def browser_page(tmp_path):
    """A page in headless Chromium with a throw-away profile, 1100 x 760, downloads allowed."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            accept_downloads=True, viewport={"width": 1100, "height": 760})
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
    running = cpu_server([base, refiner], refiner.name)
    yield running
    running.stop()


def test_page_generates_shows_progress_and_downloads(server, tmp_path):
    with browser_page(tmp_path) as page:
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


@pytest.fixture(scope="module")
def bundled_server():
    from xldm.config import DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH

    running = cpu_server([DEFAULT_MODEL_PATH, DEFAULT_REFINER_PATH], DEFAULT_REFINER_PATH.name)
    yield running
    running.stop()


def test_page_with_the_bundled_model_draws_a_red_heart(bundled_server, tmp_path):
    with browser_page(tmp_path) as page:
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
