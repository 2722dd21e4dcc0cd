"""`xldm serve` with a LoRA folder, a VAE folder and an embeddings folder, over real HTTP with tiny random models:
`<lora:NAME:W>` prompt tags (applied, recorded as A1111's "Lora hashes", refused with a 422 when missing or
unfitting), /sdapi/v1/loras, refresh-loras, sd-vae, embeddings, and the sd_vae / CLIP_stop_at_last_layers options."""

from __future__ import annotations

import argparse
import base64
import io
import json
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from xldm.config import TINY_SD15, TINY_SDXL_BASE
from xldm.models.vae import AutoencoderKL
from xldm.lora import Adapter, write_kohya
from xldm.serve.app import ServerConfig, create_app
from xldm.serve.cli import add_serve_parser, build_config
from xldm.weights.io import tensor_data_sha256
from xldm.weights.save import save_single_file

from lora_files import random_lora, save_kohya
from running_server import RunningServer
from tiny_models import random_components

METADATA = {"ss_output_name": "hearts_v2", "ss_network_dim": "4", "ss_network_alpha": "4",
            "ss_tag_frequency": json.dumps({"10_hearts": {"red": 3, "heart": 5}})}


def write_lora(path, config, seed=0, metadata=None):
    adapters = {key: Adapter(tensors) for key, tensors in random_lora(config, seed=seed, scale=0.5).items()}
    write_kohya(path, config, adapters, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_lora")
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), root / "base.safetensors")
    loras, vaes, embeddings = (root / name for name in ("loras", "vaes", "embeddings"))
    for folder in (loras, vaes, embeddings):
        folder.mkdir()
    write_lora(loras / "hearts.safetensors", TINY_SDXL_BASE, metadata=METADATA)
    save_kohya(loras / "sd15_only.safetensors", TINY_SD15, random_lora(TINY_SD15, seed=1))
    save_file(random_components(TINY_SDXL_BASE, seed=5).vae.state_dict(), str(vaes / "other_vae.safetensors"))
    wide = AutoencoderKL(replace(TINY_SDXL_BASE.vae, z_channels=16))  # an SD3/Flux-like 16-channel VAE
    save_file(wide.state_dict(), str(vaes / "wide_vae.safetensors"))
    save_file({"weight": torch.zeros(2)}, str(vaes / "not_a_vae.safetensors"))
    save_file({"clip_g": torch.zeros(2, 1280), "clip_l": torch.zeros(2, 768)}, str(embeddings / "xl_style.safetensors"))
    save_file({"emb_params": torch.zeros(3, 768)}, str(embeddings / "sd15_style.safetensors"))
    (embeddings / "old.pt").write_bytes(b"not opened")
    (embeddings / "broken.safetensors").write_bytes(b"\x00" * 4)
    return {"root": root, "base": base, "loras": loras, "vaes": vaes, "embeddings": embeddings}


@pytest.fixture(scope="module")
def client(folders):
    config = ServerConfig(models=[folders["base"]], dtype=torch.float32, device="cpu", lora_dir=folders["loras"],
                          vae_dir=folders["vaes"], embeddings_dir=folders["embeddings"])
    running = RunningServer(create_app(config))
    with httpx.Client(base_url=running.url, timeout=120) as c:
        yield c
    running.stop()


def txt2img(client, prompt="a red heart", **fields) -> httpx.Response:
    return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                  "seed": 3, **fields})


def generated(client, prompt="a red heart", **fields) -> tuple[np.ndarray, str]:
    response = txt2img(client, prompt, **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")).astype(int)
    return pixels, json.loads(body["info"])["infotexts"][0]


def test_loras_lists_files_with_metadata(client, folders):
    listed = {entry["name"]: entry for entry in client.get("/sdapi/v1/loras").json()}
    assert sorted(listed) == ["hearts", "sd15_only"]
    hearts = listed["hearts"]
    assert hearts["alias"] == "hearts_v2" and hearts["path"] == "hearts.safetensors"
    assert hearts["metadata"]["ss_network_dim"] == "4"
    assert hearts["metadata"]["ss_tag_frequency"] == {"10_hearts": {"red": 3, "heart": 5}}  # JSON parsed
    assert listed["sd15_only"] == {"name": "sd15_only", "alias": "sd15_only", "path": "sd15_only.safetensors",
                                   "metadata": {}}
    assert str(folders["root"]) not in json.dumps(list(listed.values()))


def test_lora_tag_changes_the_image_and_is_recorded(client, folders):
    plain, plain_text = generated(client)
    with_lora, text = generated(client, "a red heart <lora:hearts:0.8>")
    assert np.abs(plain - with_lora).max() > 0
    expected_hash = tensor_data_sha256(folders["loras"] / "hearts.safetensors")[:12]
    assert f'Lora hashes: "hearts: {expected_hash}"' in text and len(expected_hash) == 12
    assert text.startswith("a red heart <lora:hearts:0.8>") and "Lora hashes" not in plain_text
    again, _ = generated(client, "a red heart <lora:hearts:0.8>")
    assert np.array_equal(again, with_lora)  # the same tag, the same pixels
    back, _ = generated(client)
    assert np.array_equal(back, plain)  # the LoRA is gone for the next request
    stripped, text = generated(client, "a red heart <lora:hearts:0.8>", disable_extra_networks=True)
    assert np.array_equal(stripped, plain) and "Lora hashes" not in text


def test_missing_or_unfitting_lora_is_422_before_queueing(client, folders):
    response = txt2img(client, "a red heart <lora:no_such_lora:1>")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "no_such_lora" in detail and "hearts" in detail and str(folders["root"]) not in detail
    response = txt2img(client, "<lora:sd15_only:1>")
    assert response.status_code == 422
    assert "sd15_only.safetensors" in response.json()["detail"] and "does not fit" in response.json()["detail"]
    assert txt2img(client, "<lora:../base:1>").status_code == 422  # only names inside the folder
    assert txt2img(client, "<lora:hearts:nan>").status_code == 422
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    response = client.post("/sdapi/v1/img2img", json={"prompt": "<lora:gone:1>", "steps": 2, "seed": 1,
                                                      "init_images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert response.status_code == 422 and "<lora:gone>" in response.json()["detail"]
    assert client.get("/sdapi/v1/progress").json()["state"]["queued"] == 0


def test_refresh_loras_picks_up_a_new_file(client, folders):
    names = lambda: sorted(e["name"] for e in client.get("/sdapi/v1/loras").json())  # noqa: E731
    write_lora(folders["loras"] / "later.safetensors", TINY_SDXL_BASE, seed=7)
    try:
        assert "later" not in names()
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert names() == ["hearts", "later", "sd15_only"]
        _, text = generated(client, "<lora:later:1> <lora:hearts:0.5>")
        assert "Lora hashes: \"later: " in text and ", hearts: " in text
    finally:
        (folders["loras"] / "later.safetensors").unlink()
        client.post("/sdapi/v1/refresh-loras")
    assert names() == ["hearts", "sd15_only"]


def test_sd_vae_lists_and_switches(client):
    names = ["not_a_vae.safetensors", "other_vae.safetensors", "wide_vae.safetensors"]
    assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": n, "filename": n} for n in names]
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"
    own, own_text = generated(client)
    assert "VAE:" not in own_text
    response = client.post("/sdapi/v1/options", json={"sd_vae": "missing.safetensors"})
    assert response.status_code == 422 and "missing.safetensors" in response.json()["detail"]
    assert client.post("/sdapi/v1/options", json={"sd_vae": "other_vae.safetensors"}).status_code == 200
    try:
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "other_vae.safetensors"
        other, text = generated(client)
        assert np.abs(own - other).max() > 0 and "VAE: other_vae.safetensors" in text
        assert json.loads(txt2img(client).json()["info"])["sd_vae_name"] == "other_vae.safetensors"
    finally:
        assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
    again, _ = generated(client)
    assert np.array_equal(again, own)
    once, text = generated(client, override_settings={"sd_vae": "other_vae.safetensors"})
    assert np.array_equal(once, other) and "VAE: other_vae.safetensors" in text
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"  # restored afterwards
    assert txt2img(client, override_settings={"sd_vae": "nope"}).status_code == 422
    response = client.post("/sdapi/v1/options", json={"sd_vae": "not_a_vae.safetensors"})
    assert response.status_code == 422 and "holds no VAE" in response.json()["detail"]
    response = txt2img(client, override_settings={"sd_vae": "wide_vae.safetensors"})
    assert response.status_code == 422 and "16-channel latents" in response.json()["detail"]
    assert client.get("/sdapi/v1/options").json()["sd_vae"] == "Automatic"


def test_clip_skip_option(client):
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    plain, plain_text = generated(client)
    assert "Clip skip" not in plain_text
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        skipped, text = generated(client)
        assert np.abs(plain - skipped).max() > 0 and "Clip skip: 2" in text
        response = txt2img(client)
        assert json.loads(response.json()["info"])["clip_skip"] == 2
        overridden, text = generated(client, override_settings={"CLIP_stop_at_last_layers": 1})
        assert np.array_equal(overridden, plain) and "Clip skip" not in text
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    once, text = generated(client, override_settings={"CLIP_stop_at_last_layers": 2})
    assert np.array_equal(once, skipped) and "Clip skip: 2" in text
    for bad in (0, "2", 1.5):
        assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": bad}).status_code == 422
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1


def test_embeddings_lists_files_with_header_shapes(client):
    listing = client.get("/sdapi/v1/embeddings").json()
    empty = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert listing == {
        "loaded": {"old": {**empty, "shape": None, "vectors": None},
                   "sd15_style": {**empty, "shape": 768, "vectors": 3},
                   "xl_style": {**empty, "shape": 2048, "vectors": 2}},
        "skipped": {"broken": {**empty, "shape": None, "vectors": None}}}


def test_folders_unset_gives_empty_lists_and_tags_422(folders):
    config = ServerConfig(models=[folders["base"]], dtype=torch.float32, device="cpu")
    running = RunningServer(create_app(config))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            assert c.get("/sdapi/v1/loras").json() == []
            assert c.get("/sdapi/v1/sd-vae").json() == []
            assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
            response = txt2img(c, "<lora:hearts:1>")
            assert response.status_code == 422 and "--lora-dir" in response.json()["detail"]
    finally:
        running.stop()


def test_serve_flags(folders):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(folders["base"]), "--lora-dir", str(folders["loras"]),
                              "--vae-dir", str(folders["vaes"]), "--embeddings-dir", str(folders["embeddings"])])
    config = build_config(args)
    assert (config.lora_dir, config.vae_dir, config.embeddings_dir) == (folders["loras"], folders["vaes"],
                                                                        folders["embeddings"])
    args = parser.parse_args(["serve", "--model", str(folders["base"]), "--lora-dir", str(folders["root"] / "no")])
    with pytest.raises(ValueError, match="--lora-dir"):
        build_config(args)


def test_page_lists_loras_and_adds_a_tag(client, tmp_path):
    from test_serve_browser import CHROMIUM, FLAGS

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (run .ci/install-browser)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            _lists_loras_and_adds_a_tag(client, browser)
        finally:
            browser.close()


def _lists_loras_and_adds_a_tag(client, browser):
    from test_serve_browser import browser_page

    with browser_page(browser) as page:
        page.goto(str(client.base_url).rstrip("/") + "/")
        page.wait_for_function("document.querySelectorAll('#lora-list .lora').length > 0")
        page.click("#lora-box summary")
        assert page.locator("#lora-list .lora").all_inner_texts() == ["hearts (hearts_v2)", "sd15_only"]
        assert page.locator("#lora-count").inner_text() == "(2)"
        page.fill("#prompt", "a red heart")
        page.click("#lora-list .lora >> nth=0")
        assert page.locator("#prompt").input_value() == "a red heart <lora:hearts:1>"
