"""`xldm serve` against hostile or unusual input: each refusal is a clear 4xx, nothing the server holds changes,
and the next request is answered.  Also inputs that must NOT be refused (raw-base64 JPEGs, which start "/9j/")."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import torch
from PIL import Image
from test_serve_api import b64_png, client, models, outputs, server, txt2img

from xldm.serve.jobs import JobQueue, OutOfMemory, QueueFull

__all__ = ["client", "models", "outputs", "server"]


def b64_jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def options(client) -> dict:
    r = client.get("/sdapi/v1/options")
    assert r.status_code == 200
    return r.json()


def test_raw_base64_jpeg_is_accepted_as_init_image_mask_and_png_info(client):
    jpeg = b64_jpeg(noise(64, 64))
    assert jpeg.startswith("/9j/")  # looks like an absolute path, is an image
    mask = b64_jpeg(Image.new("RGB", (64, 64), "white"))
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [jpeg], "mask": mask, "steps": 2,
                                               "seed": 1, "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    r = client.post("/sdapi/v1/png-info", json={"image": jpeg})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == ""
    # real paths and URLs are still refused, with the same message, and never opened
    for path in ("/etc/passwd", "/9j/etc/passwd", "http://127.0.0.1:9/x.png", "~/x.png"):
        r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [path], "steps": 2})
        assert r.status_code == 422 and "URLs and paths are not accepted" in r.text, (path, r.text)
    assert txt2img(client, seed=3).status_code == 200


def test_img2img_init_image_size_is_bounded(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64_png(noise(4096, 8))],
                                               "steps": 2, "seed": 1})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "4096x8" in detail and "[8, 2048]" in detail and "width and height" in detail
    # given width/height, the same image is resized to an allowed size
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64_png(noise(4096, 8))],
                                               "width": 64, "height": 64, "steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    assert txt2img(client, seed=3).status_code == 200


def test_rejected_request_keeps_the_server_settings(client, server, monkeypatch):
    before = options(client)
    assert before["sdxl_crop_top"] != 24
    keep = {"sdxl_crop_top": 24, "sdxl_refiner_high_aesthetic_score": 3.5}
    r = txt2img(client, sampler_name="no such sampler", override_settings=keep,
                override_settings_restore_afterwards=False)
    assert r.status_code == 422 and "no such sampler" in r.text
    assert options(client) == before  # refused: nothing kept

    queue = server.app.state.server.queue

    def full(*args, **kwargs):
        raise QueueFull(8, 5)

    with monkeypatch.context() as m:
        m.setattr(queue, "submit", full)
        r = txt2img(client, override_settings=keep, override_settings_restore_afterwards=False)
        assert r.status_code == 503 and "the queue is full" in r.json()["detail"]
    assert options(client) == before  # not queued: nothing kept

    # queued: kept, as the webui keeps them
    r = txt2img(client, override_settings=keep, override_settings_restore_afterwards=False)
    assert r.status_code == 200, r.text
    after = options(client)
    assert after == {**before, **keep}
    assert client.post("/sdapi/v1/options", json={k: before[k] for k in keep}).status_code == 200
    assert options(client) == before


def test_deep_json_and_lone_surrogates_are_refused(client):
    depth = 200
    deep = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "comments": {"a": json.loads("[" * depth + "]" * depth)}}
    r = client.post("/sdapi/v1/txt2img", json=deep)
    assert r.status_code == 400, r.text
    assert "nested deeper than 64 levels" in r.json()["detail"]
    raw = b'{"prompt": "x\\ud800y", "steps": 2, "width": 64, "height": 64, "seed": 1}'
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["detail"]
    # a proper pair (an emoji escaped as two surrogates) and moderate nesting are fine
    raw = b'{"prompt": "x\\ud83d\\ude00", "steps": 2, "width": 64, "height": 64, "seed": 1, "comments": {"a": [[1]]}}'
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert txt2img(client, seed=3).status_code == 200


def test_cpu_out_of_memory_is_reported_as_out_of_memory(client, server, monkeypatch):
    store = server.app.state.server.store
    real = store.pipeline

    def pipeline_out_of_cpu_memory(model, refiner):
        pipe = real(model, refiner)

        def run(request, callback=None):
            if request.prompt == "too big":
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 274877906944 bytes. Error code 12 (simulated)")
            return type(pipe).run(pipe, request, callback=callback)

        pipe.run = run
        return pipe

    monkeypatch.setattr(store, "pipeline", pipeline_out_of_cpu_memory)
    r = txt2img(client, prompt="too big")
    assert r.status_code == 500 and "out of memory" in r.json()["detail"], r.text
    assert "RuntimeError" in r.json()["detail"]
    r = txt2img(client, seed=4)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_only_allocator_failures_count_as_out_of_memory():
    class FakeJob:
        id = 1

    for error in (RuntimeError("not enough memory: you tried to allocate 9 GB"), torch.cuda.OutOfMemoryError("x"),
                  RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes")):
        assert isinstance(JobQueue._describe(FakeJob(), error), OutOfMemory), error
    other = JobQueue._describe(FakeJob(), RuntimeError("a RuntimeError about something else"))
    assert type(other) is RuntimeError and str(other) == "a RuntimeError about something else"
