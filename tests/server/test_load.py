"""`ldm serve` under load: 20 concurrent requests (txt2img and img2img, some with bad fields,
two clients that disconnect mid-job) are each answered correctly or with a 4xx naming the
field, none is lost, and the server stays up with its memory flat."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from tests.image_helpers import photo

SIZE = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5, "sampler_name": "Euler a"}


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INIT = _b64(photo("astronaut"))
GOOD = [
    ("txt2img", {"prompt": "a red circle", "seed": 1, **SIZE}),
    ("txt2img", {"prompt": "a blue square", "seed": 2, "batch_size": 2, **SIZE}),
    ("img2img", {"prompt": "a star", "seed": 3, "init_images": [INIT], **SIZE}),
    ("img2img", {"prompt": "a star", "seed": 4, "denoising_strength": 0.5,
                 "init_images": [f"data:image/png;base64,{INIT}"], **SIZE}),
]  # fmt: skip
BAD = [  # (route, body, status, a word the error must contain)
    ("txt2img", {"prompt": "x", **SIZE, "steps": 0}, 400, "steps"),
    ("txt2img", {"prompt": "x", **SIZE, "width": 63}, 400, "63x64"),
    ("txt2img", {"prompt": "x", **SIZE, "sampler_name": "Nope"}, 400, "sampler_name"),
    ("txt2img", {"prompt": "x", **SIZE, "steps": "many"}, 422, "steps"),
    ("img2img", {"prompt": "x", **SIZE, "init_images": ["not an image"]}, 400, "init_images"),
    ("img2img", {"prompt": "x", **SIZE}, 400, "init_images"),
]


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _pixels(answer: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in answer["images"]]


def _post(url: str, route: str, body: dict) -> httpx.Response:
    with httpx.Client(timeout=120) as client:
        return client.post(f"{url}/sdapi/v1/{route}", json=body)


def _leaving_client(port: int, task_id: str) -> socket.socket:
    """A client that sends a long job and will close its connection without reading."""
    body = json.dumps({"prompt": "slow", "seed": 9, **SIZE, "steps": 5000,
                       "force_task_id": task_id}).encode()  # fmt: skip
    head = (
        f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(head + body)
    return connection


def _position(url: str, task_id: str):
    return httpx.get(f"{url}/sdapi/v1/progress", params={"id_task": task_id}).json()["state"][
        "queue_position"
    ]


def _wait(condition, what: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.05)


def _round(live, expected) -> None:
    leaving = [_leaving_client(live.port, "leaving-0")]
    _wait(lambda: _position(live.url, "leaving-0") == 0, "the first long job never ran")
    leaving.append(_leaving_client(live.port, "leaving-1"))
    _wait(lambda: _position(live.url, "leaving-1") == 1, "the second long job never queued")
    jobs = [(k % len(GOOD), *GOOD[k % len(GOOD)]) for k in range(12)]
    with ThreadPoolExecutor(18) as pool:
        good = [pool.submit(_post, live.url, route, body) for _, route, body in jobs]
        bad = [pool.submit(_post, live.url, route, body) for route, body, _, _ in BAD]
        time.sleep(0.3)  # every request is in: the two long jobs hold the queue's head
        for connection in leaving:
            connection.close()  # mid-job (running) and while waiting (queued)
        for future, (k, _, _) in zip(good, jobs, strict=True):
            answer = future.result()
            assert answer.status_code == 200, answer.text
            got = _pixels(answer.json())
            assert len(got) == len(expected[k])
            assert all(np.array_equal(a, b) for a, b in zip(got, expected[k], strict=True))
        for future, (_, _, status, word) in zip(bad, BAD, strict=True):
            answer = future.result()
            assert answer.status_code == status, answer.text
            assert word in json.dumps(answer.json()["detail"])
            assert "Traceback" not in answer.text
    for task in ("leaving-0", "leaving-1"):
        _wait(lambda task=task: _position(live.url, task) is None, f"{task} was not dropped")


def test_twenty_concurrent_requests_are_all_answered_and_memory_stays_flat(live):
    expected = [_pixels(_post(live.url, route, body).json()) for route, body in GOOD]
    _round(live, expected)  # the first round settles the allocator's pools
    before = _rss_mb()
    _round(live, expected)
    grown = _rss_mb() - before
    state = httpx.get(f"{live.url}/sdapi/v1/progress").json()["state"]
    assert state["job_count"] == 0 and state["queue_size"] == 0
    assert grown < 40, f"RSS grew by {grown:.0f} MB over a round of 20 requests"
