"""`xldm serve` against hostile input, part 2: a full queue refuses before the body is read, a stalled body times
out, `comments` is bounded, other loopback addresses, --outputs naming a file, an unreadable checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import threading
import time

import pytest
import torch
from starlette.testclient import TestClient
from test_serve_api import client, models, outputs, server, txt2img

from xldm.cli import main as cli_main
from xldm.serve.app import ServerConfig, create_app
from xldm.serve.guard import RequestGuard
from xldm.serve.cli import add_serve_parser, build_config
from xldm.serve.jobs import JobQueue, QueueFull

__all__ = ["client", "models", "outputs", "server"]


def asgi_call(app, method: str, path: str, chunks: list[bytes], stall: bool = False, host: str = "127.0.0.1"):
    """Call `app` with a hand-written receive: `chunks` (then a stall, or the end); -> (status, body, reads)."""
    reads, sent = [], []

    async def receive():
        reads.append(len(reads))
        if len(reads) <= len(chunks):
            more = stall or len(reads) < len(chunks)
            return {"type": "http.request", "body": chunks[len(reads) - 1], "more_body": more}
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    length = str(sum(map(len, chunks))).encode()
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", host.encode()), (b"content-type", b"application/json"),
                         (b"content-length", length)], "http_version": "1.1", "scheme": "http",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 7860), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, len(reads)


def test_full_queue_refuses_generation_before_reading_the_body(models):
    app = create_app(ServerConfig(models=[models[0]], queue_size=0, dtype=torch.float32, device="cpu"))
    release = threading.Event()
    app.state.server.queue.submit(lambda job: release.wait(30))  # one job running, none may wait: full
    try:
        body = json.dumps({"prompt": "x" * 100_000, "steps": 2}).encode()
        for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
            status, headers, text, reads = asgi_call(app, "POST", path, [body])
            assert status == 503 and b"the queue is full" in text and b"retry-after" in headers, (status, text)
            assert reads == 0  # refused before one byte of the body was read
        status, _, text, _ = asgi_call(app, "POST", "/sdapi/v1/png-info", [b'{"image": ""}'])
        assert status != 503, text  # other endpoints still read their body and answer
        assert asgi_call(app, "GET", "/sdapi/v1/options", [b""])[0] == 200
    finally:
        release.set()


def test_queue_size_zero_runs_one_job_and_lets_none_wait():
    queue = JobQueue(max_waiting=0)
    try:
        assert queue.full() is None  # idle: the next job runs at once
        release = threading.Event()
        first = queue.submit(lambda job: release.wait(30) and "first")
        with pytest.raises(QueueFull, match="the queue is full"):
            queue.submit(lambda job: "second")
        release.set()
        assert first.future.result(timeout=30) == "first"
        deadline = time.time() + 30
        while queue.full() is not None:  # the worker lets go of the finished job
            assert time.time() < deadline
            time.sleep(0.01)
        assert queue.submit(lambda job: "third").future.result(timeout=30) == "third"
    finally:
        queue.stop()


def test_stalled_body_times_out_with_408():
    async def ok(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(ok, api_key=None, allowed_hosts=None, max_body=1000, body_timeout=0.2)
    status, _, text, _ = asgi_call(guard, "POST", "/sdapi/v1/txt2img", [b'{"prompt":'], stall=True)
    assert status == 408 and b"the request body did not arrive within 0.2 s" in text, (status, text)
    assert asgi_call(guard, "POST", "/sdapi/v1/txt2img", [b'{"prompt":', b' "x"}'])[:3:2] == (200, b"ok")


def test_comments_is_bounded(client):
    r = txt2img(client, comments={f"k{i}": i for i in range(65)})
    assert r.status_code == 422 and "comments" in r.text and "64" in r.text, r.text
    assert txt2img(client, comments={"k": 1}).status_code == 200


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_other_loopback_address_is_served(models):
    config = build_config(serve_args("--model", str(models[0]), "--host", "127.0.0.2"))
    config.dtype, config.device = torch.float32, "cpu"
    with TestClient(create_app(config), base_url="http://127.0.0.2:7860") as c:
        assert c.get("/sdapi/v1/options").status_code == 200
        assert c.get("/sdapi/v1/sd-models", headers={"host": "evil.example:7860"}).status_code == 403
        assert c.get("/sdapi/v1/sd-models").status_code == 200


def test_outputs_naming_a_file_is_refused(models, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    assert cli_main(["serve", "--model", str(models[0]), "--outputs", str(file), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--outputs" in err and str(file) in err and "not a folder" in err and "Traceback" not in err


def test_unreadable_checkpoint_in_models_dir_is_skipped(models, tmp_path, caplog):
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "a_broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    shutil.copy(models[0], folder / "good.safetensors")
    config = build_config(serve_args("--models-dir", str(folder)))
    config.dtype, config.device = torch.float32, "cpu"
    with caplog.at_level(logging.WARNING), TestClient(create_app(config), base_url="http://127.0.0.1") as c:
        assert "a_broken.safetensors" in caplog.text and "cannot be read" in caplog.text
        assert [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()] == ["good"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "good.safetensors"
    (folder / "good.safetensors").unlink()
    config = build_config(serve_args("--models-dir", str(folder)))
    try:
        create_app(config)
    except ValueError as e:
        assert "no models" in str(e)
    else:
        raise AssertionError("a folder of only unreadable checkpoints must not start")


def test_a_named_model_that_was_skipped_is_an_error_not_another_model(models, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    config = build_config(serve_args("--model", str(broken), "--model", str(models[0])))
    config.dtype, config.device = torch.float32, "cpu"
    with pytest.raises(KeyError, match="broken.safetensors"):
        create_app(config)


def test_serve_checks_the_device_as_generate_does(models):
    with pytest.raises(ValueError, match="'nonsense' is not a device"):
        build_config(serve_args("--model", str(models[0]), "--device", "nonsense"))
    with pytest.raises(ValueError, match="--queue-size is the number of jobs that may wait .0 or more., got -1"):
        build_config(serve_args("--model", str(models[0]), "--queue-size", "-1"))
