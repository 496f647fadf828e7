"""Switching checkpoints among --models-dir files, ControlNet units in the extension's format,
the LoRA list, and a pool of two CPU workers (what several GPUs do, one model per device)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.embedded import WEIGHTS_DIR
from ldm_cli.server.app import Settings
from ldm_cli.server.launch import build
from ldm_cli.server.schemas import Txt2ImgRequest
from ldm_cli.server.translate import txt2img_work
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import pixels
from tests.image_helpers import photo
from tests.server.in_process import ldm_files

CANNY = WEIGHTS_DIR / "ldm-shapes-canny.safetensors"
SIZE = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 7, "sampler_name": "Euler a"}


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _images(answer) -> list[Image.Image]:
    assert answer.status_code == 200, answer.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in answer.json()["images"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "models" / "sub").mkdir(parents=True)
    random_checkpoint(TINY_SD1, root / "models" / "sub" / "tiny.safetensors", seed=5)
    (root / "controlnet").mkdir()
    shutil.copy(CANNY, root / "controlnet" / CANNY.name)
    (root / "lora" / "styles").mkdir(parents=True)
    (root / "lora" / "styles" / "ink.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def client(folders):
    settings = Settings(folders / "lora", folders / "controlnet")
    pool, app = build(_embedded(), settings, folders / "models", "auto", None, ["cpu"])
    yield TestClient(app)
    pool.close()


def _embedded() -> Path:
    from ldm_cli.core.embedded import default_model_path

    return default_model_path()


def test_sd_model_checkpoint_switches_among_the_models_dir_files(client):
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles[0].startswith("ldm-shapes.safetensors [") and titles[1] == "sub/tiny.safetensors"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/tiny"}).json() is None
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SIZE}).json()["info"])
    assert info["sd_model_name"] == "tiny" and "Model: tiny" in info["infotexts"][0]
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert title.startswith("sub/tiny.safetensors [")
    assert title in [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    override = {"override_settings": {"sd_model_checkpoint": titles[0]}}
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **SIZE, **override})
    assert "Model: ldm-shapes" in json.loads(answer.json()["info"])["infotexts"][0]
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ldm-shapes"})
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles[0]


def test_controlnet_units_equal_ldm_generate_with_control(client, tmp_path):
    picture = photo("astronaut")
    picture.save(tmp_path / "control.png")
    unit = {"image": _b64(picture), "module": "canny", "model": "ldm-shapes-canny [abcdef12]",
            "weight": 0.8, "guidance_start": 0, "guidance_end": 1}  # fmt: skip
    body = {
        "prompt": "a circle",
        "seed": 4,
        **SIZE,
        "alwayson_scripts": {"controlnet": {"args": [unit]}},
    }
    (served,) = _images(client.post("/sdapi/v1/txt2img", json=body))
    (file,) = ldm_files(
        tmp_path / "out", "generate", "a circle", "--seed", "4", "-W", "64", "-H", "64",
        "--steps", "2", "--cfg", "7", "--sampler", "euler_a", "--control", str(CANNY),
        "--control-image", str(tmp_path / "control.png"), "--preprocess", "canny",
        "--control-weight", "0.8",
    )  # fmt: skip
    assert np.array_equal(np.asarray(served), pixels(file))
    assert "ControlNet 0" in served.info["parameters"]
    models = client.get("/controlnet/model_list").json()["model_list"]
    assert [m.split(" [")[0] for m in models] == ["ldm-shapes-canny"]


def test_hires_fix_equals_ldm_generate_with_hires_scale(client, tmp_path):
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Lanczos", "denoising_strength": 0.6}
    body = {"prompt": "a triangle", "seed": 6, **SIZE, **hires}
    (served,) = _images(client.post("/sdapi/v1/txt2img", json=body))
    (file,) = ldm_files(
        tmp_path, "generate", "a triangle", "--seed", "6", "-W", "64", "-H", "64", "--steps",
        "2", "--cfg", "7", "--sampler", "euler_a", "--hires-scale", "2", "--hires-upscaler",
        "Lanczos", "--hires-strength", "0.6",
    )  # fmt: skip
    assert served.size == (128, 128) and np.array_equal(np.asarray(served), pixels(file))
    assert "Hires upscale: 2" in served.info["parameters"]


def test_loras_lists_the_lora_folder(client, folders):
    (lora,) = client.get("/sdapi/v1/loras").json()
    assert lora["name"] == "ink" and Path(lora["path"]).parent.name == "styles"


def test_png_info_reads_back_the_parameters(client):
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 7, **SIZE})
    info = client.post("/sdapi/v1/png-info", json={"image": answer.json()["images"][0]}).json()
    assert info["parameters"]["Seed"] == "7" and info["parameters"]["Size-1"] == "64"
    assert info["info"] == json.loads(answer.json()["info"])["infotexts"][0]


def test_two_cpu_workers_run_two_jobs_at_once_with_the_same_pixels(folders):
    settings = Settings(folders / "lora")
    pool, _ = build(_embedded(), settings, None, "auto", None, ["cpu", "cpu"])
    try:
        short = Txt2ImgRequest(prompt="a square", seed=3, **SIZE)
        results = [pool.submit(txt2img_work(short, None)) for _ in range(4)]
        first = [np.asarray(image) for _, image in results[0].future.result(timeout=60)]
        for job in results[1:]:
            again = [np.asarray(image) for _, image in job.future.result(timeout=60)]
            assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
        long = Txt2ImgRequest(prompt="slow", seed=1, **{**SIZE, "steps": 5000})
        jobs = [pool.submit(txt2img_work(long, None)) for _ in range(3)]
        deadline = time.time() + 30
        while len(pool.running()) < 2 or min(j.step for j in pool.running()) < 1:
            assert time.time() < deadline, "the two workers never ran together"
            time.sleep(0.05)
        assert len(pool.queued()) == 1 and pool.position(jobs[2].id) == 1
        assert {w.device for w in pool.workers} == {"cpu"} and len(pool.workers) == 2
        pool.cancel(jobs[2])  # taken out of the queue
        assert jobs[2].future.cancelled() and pool.queued() == []
        assert pool.interrupt() == 2
        assert [j.future.result(timeout=30) for j in jobs[:2]] == [[], []]
    finally:
        pool.close()
