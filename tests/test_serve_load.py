"""`xldm serve` under load: a real server with a queue of 8 and 30 requests at once.

The extra requests get 503 with Retry-After at once; the accepted ones all complete, one at a time, in the order
they were accepted, each with the image of its own seed; an interrupt stops only the running job.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from xldm.config import TINY_SDXL_BASE
from xldm.serve.app import ServerConfig, create_app
from xldm.weights.save import save_single_file

from running_server import RunningServer
from tiny_models import random_components

CLIENTS = 30
QUEUE = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "base.safetensors"
    base = save_single_file(random_components(TINY_SDXL_BASE, seed=0), path)
    running = RunningServer(create_app(ServerConfig(models=[base], queue_size=QUEUE, dtype=torch.float32,
                                                    device="cpu")))
    yield running
    running.stop()


def client(url: str) -> httpx.Client:
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    return httpx.Client(base_url=url, timeout=120, transport=httpx.HTTPTransport(socket_options=nodelay))


def request(url: str, seed: int, steps: int = 2) -> httpx.Response:
    with client(url) as c:
        return c.post("/sdapi/v1/txt2img", json={"prompt": "load", "steps": steps, "width": 64, "height": 64,
                                                 "seed": seed})


def wait_until_running(url: str) -> None:
    with client(url) as c:
        deadline = time.time() + 30
        while c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
            assert time.time() < deadline
            time.sleep(0.02)


def test_thirty_concurrent_requests_with_a_queue_of_eight(server):
    # A longer job runs first, so that all 30 arrive while it runs: exactly QUEUE of them find a place.
    blocker: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: blocker.update(r=request(server.url, 999, steps=30)))
    first.start()
    wait_until_running(server.url)
    barrier = threading.Barrier(CLIENTS)
    responses: dict[int, httpx.Response] = {}
    sent_at: dict[int, float] = {}

    def one(seed: int) -> None:
        barrier.wait()
        sent_at[seed] = time.perf_counter()
        responses[seed] = request(server.url, seed)
        sent_at[seed] = time.perf_counter() - sent_at[seed]

    threads = [threading.Thread(target=one, args=(1000 + k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in (*threads, first):
        t.join(120)
    assert blocker["r"].status_code == 200
    assert len(responses) == CLIENTS  # none lost: every request got an answer

    accepted = {seed: r for seed, r in responses.items() if r.status_code == 200}
    refused = {seed: r for seed, r in responses.items() if r.status_code == 503}
    assert len(accepted) + len(refused) == CLIENTS, sorted({r.status_code for r in responses.values()})
    assert len(accepted) == QUEUE and len(refused) == CLIENTS - QUEUE  # the running job holds no place
    for seed, r in refused.items():
        assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["detail"]
        assert sent_at[seed] < 2.0  # refused at once, not after waiting

    jobs = []
    for seed, r in accepted.items():
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [seed] and len(r.json()["images"]) == 1  # its own image, complete
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 64)
        jobs.append(info["xldm"])
    jobs.append(json.loads(blocker["r"].json()["info"])["xldm"])
    jobs.sort(key=lambda j: j["job"])
    for earlier, later in zip(jobs, jobs[1:]):
        assert later["started_at"] >= earlier["finished_at"]  # one at a time, in the order accepted (FIFO)
        assert later["queued_at"] >= earlier["queued_at"]

    # the server is healthy afterwards and its queue is empty
    with client(server.url) as c:
        assert c.get("/sdapi/v1/progress").json()["state"]["queued"] == 0
    assert request(server.url, 7).status_code == 200


def test_interrupt_stops_only_the_running_job(server):
    results: dict[str, httpx.Response] = {}
    long = threading.Thread(target=lambda: results.update(long=request(server.url, 1, steps=150)))
    long.start()
    wait_until_running(server.url)
    with client(server.url) as c:
        deadline = time.time() + 30
        queued = [threading.Thread(target=lambda s=s: results.update({f"q{s}": request(server.url, s)}))
                  for s in (2, 3)]
        for t in queued:
            t.start()
        while c.get("/sdapi/v1/progress").json()["state"]["queued"] < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        assert c.post("/sdapi/v1/interrupt").status_code == 200
    for t in (long, *queued):
        t.join(60)
    stopped = json.loads(results["long"].json()["info"])["xldm"]
    assert stopped["interrupted"] and stopped["steps_done"] - stopped["interrupt_steps_done"] <= 1
    assert stopped["steps_done"] < 150
    for key in ("q2", "q3"):
        done = json.loads(results[key].json()["info"])
        assert not done["xldm"]["interrupted"] and len(results[key].json()["images"]) == 1
    # queued jobs are not the interrupted one: same pixels as the same request alone
    alone = request(server.url, 2).json()["images"][0]
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(alone))))
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(results["q2"].json()["images"][0]))))
    assert np.array_equal(a, b)
