"""`--api-auth` on every route, the body size limit and the pixel limit, checked before any
job is queued (the pool here never starts: no route may reach it)."""

from __future__ import annotations

import base64
import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm_cli.core.embedded import default_model_path
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import MAX_SIDE
from ldm_cli.server.app import Settings, create_app
from ldm_cli.server.checkpoints import Checkpoints
from ldm_cli.server.guard import parse_credentials
from ldm_cli.server.workers import WorkerPool

USERS = [("alice", "s3cret"), ("bob", "hunter2")]


def _app(tmp_path, credentials=None, max_body=50 * 1024 * 1024):
    def never(path, device):
        raise AssertionError("no job may reach the model")

    pool = WorkerPool(never, ["cpu"], default_model_path())
    settings = Settings(tmp_path, None, credentials, max_body)
    return create_app(pool, Checkpoints(default_model_path(), None), settings)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_no_route_answers_without_the_credentials(tmp_path):
    app = _app(tmp_path, USERS)
    client = TestClient(app)
    routes = [(m, _concrete(r.path)) for r in app.app.routes for m in (r.methods or {"GET"})]
    assert (
        len(routes) > 15 and ("GET", "/docs") in routes and ("POST", "/sdapi/v1/txt2img") in routes
    )
    wrong = [None, ("alice", "wrong"), ("mallory", "s3cret"), ("alice", ""), ("bob", "s3cret")]
    for method, path in [*routes, ("GET", "/no/such/route")]:
        for auth in wrong:
            answer = client.request(method, path, auth=auth)
            assert answer.status_code == 401, (method, path, auth)
            assert answer.headers["www-authenticate"] == "Basic"
    assert client.get("/sdapi/v1/samplers", auth=("bob", "hunter2")).status_code == 200
    assert client.get("/sdapi/v1/options", auth=("alice", "s3cret")).status_code == 200
    bad_header = {"Authorization": "Basic !!!"}
    assert client.get("/sdapi/v1/samplers", headers=bad_header).status_code == 401


def test_api_auth_option_is_checked():
    assert parse_credentials("a:b,c:d:e") == [("a", "b"), ("c", "d:e")]
    for text in ("nocolon", ":pass", "user:", "a:b,"):
        with pytest.raises(UserError, match="--api-auth must be USER:PASSWORD"):
            parse_credentials(text)


def test_bodies_over_the_limit_are_refused(tmp_path):
    client = TestClient(_app(tmp_path, max_body=4096))
    big = {"prompt": "x" * 5000}
    answer = client.post("/sdapi/v1/txt2img", json=big)
    assert answer.status_code == 413 and "4096 bytes" in answer.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    answer = client.post(
        "/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_images_over_the_pixel_limit_and_bad_fields_are_4xx_naming_the_field(tmp_path):
    client = TestClient(_app(tmp_path))
    cases = [
        ({"init_images": [_png(MAX_SIDE + 1, 1)]}, 400, "init_images[0]: the image is 16385x1"),
        ({"init_images": [_png(64, 64)], "mask": _png(32, 32)}, 400, "mask: it is 32x32"),
        ({"init_images": [_png(64, 64)], "denoising_strength": 2}, 400, "denoising_strength"),
        ({"init_images": [_png(64, 64)], "width": 0}, 400, "width must be between 1"),
        ({"init_images": [_png(64, 64)], "batch_size": 0}, 400, "batch_size"),
        ({"init_images": [_png(64, 64)], "seed": -5}, 400, "seed"),
        ({"init_images": [_png(64, 64)], "scheduler": "Sideways"}, 400, "scheduler:"),
        ({"init_images": [_png(64, 64)], "prompt": "<lora:../../etc/x:1>"}, 400, "LoRA folder"),
        ({"init_images": "abc"}, 422, "init_images"),
        ({"init_images": [_png(64, 64)], "alwayson_scripts": {"ControlNet": {"args": [
            {"model": "missing [0000]", "image": _png(64, 64)}]}}}, 400, "not found"),
        ({"init_images": [_png(64, 64)], "override_settings": {"sd_model_checkpoint": "nope"}},
         400, "sd_model_checkpoint"),
    ]  # fmt: skip
    for body, status, words in cases:
        answer = client.post("/sdapi/v1/img2img", json=body)
        assert answer.status_code == status, (body.keys(), answer.text)
        assert words in str(answer.json()["detail"]), answer.text
    answer = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing"})
    assert answer.status_code == 400 and "not found" in answer.json()["detail"]
    assert client.post("/sdapi/v1/png-info", json={"image": "%%%"}).status_code == 400
