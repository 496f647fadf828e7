"""A real A1111 client (webuiapi) against a live `ldm serve` on the embedded model: its images
equal, pixel for pixel and parameters text for parameters text, those `ldm generate`,
`ldm img2img` and `ldm inpaint` write with the same settings."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image

from ldm_cli.core.pngmeta import read_parameters
from tests.cli_helpers import pixels
from tests.image_helpers import box_mask, photo
from tests.server.in_process import ldm_files

STEPS = 3
COMMON = ("--steps", str(STEPS), "--cfg", "7", "--sampler", "euler_a")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    photo("astronaut").save(folder / "photo.png")
    box_mask(64, 64, (16, 16, 40, 48)).save(folder / "mask.png")
    return folder


@pytest.fixture(scope="module")
def api(live):
    return webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=STEPS)


def _same(served: list[Image.Image], files, expected_count: int) -> None:
    assert len(served) == len(files) == expected_count
    for image, path in zip(served, files, strict=True):
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels(path))
        assert image.info["parameters"] == read_parameters(path)


def test_txt2img_equals_ldm_generate(api, tmp_path):
    result = api.txt2img(
        prompt="a red circle on a blue background", negative_prompt="green", seed=11,
        width=64, height=64, cfg_scale=7, batch_size=2, n_iter=2,
    )  # fmt: skip
    files = ldm_files(
        tmp_path, "generate", "a red circle on a blue background", "-n", "green", "--seed", "11",
        *COMMON, "-N", "4", "-b", "2",
    )  # fmt: skip
    _same(result.images, files, 4)
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert result.info["infotexts"] == [read_parameters(p) for p in files]


def test_img2img_equals_ldm_img2img(api, inputs, tmp_path):
    result = api.img2img(
        images=[Image.open(inputs / "photo.png")], prompt="a yellow star", seed=3,
        denoising_strength=0.6, width=64, height=64, cfg_scale=7, batch_size=2,
    )  # fmt: skip
    files = ldm_files(
        tmp_path, "img2img", str(inputs / "photo.png"), "a yellow star", "--strength", "0.6",
        "--seed", "3", *COMMON, "-N", "2", "-b", "2",
    )  # fmt: skip
    _same(result.images, files, 2)


def test_inpainting_equals_ldm_inpaint(api, inputs, tmp_path):
    result = api.img2img(
        images=[Image.open(inputs / "photo.png")], mask_image=Image.open(inputs / "mask.png"),
        prompt="a green square", seed=8, denoising_strength=0.9, mask_blur=2,
        inpaint_full_res=False, width=64, height=64, cfg_scale=7,
    )  # fmt: skip
    files = ldm_files(
        tmp_path, "inpaint", str(inputs / "photo.png"), str(inputs / "mask.png"),
        "a green square", "--strength", "0.9", "--mask-blur", "2", "--seed", "8", *COMMON,
    )  # fmt: skip
    _same(result.images, files, 1)
    # webuiapi's defaults: A1111's "only masked" (a box around the mask at width x height)
    only_masked = api.img2img(
        images=[Image.open(inputs / "photo.png")], mask_image=Image.open(inputs / "mask.png"),
        prompt="a green square", seed=8, width=32, height=48, cfg_scale=7,
    )  # fmt: skip
    files = ldm_files(
        tmp_path / "only-masked", "inpaint", str(inputs / "photo.png"), str(inputs / "mask.png"),
        "a green square", "--inpaint-full-res", "--inpaint-full-res-padding", "0", "-W", "32",
        "-H", "48", "--strength", "0.75", "--seed", "8", *COMMON,
    )  # fmt: skip
    _same(only_masked.images, files, 1)


def test_model_sampler_and_scheduler_lists(api):
    assert api.util_get_model_names() == [api.get_options()["sd_model_checkpoint"]]
    assert api.util_get_model_names()[0].startswith("ldm-shapes.safetensors [")
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(names)
    assert {"automatic", "karras", "normal"} <= set(api.util_get_scheduler_names())


def test_interrupt_stops_a_job_at_the_next_step_with_a_live_preview(api, live):
    answer = {}

    def long_job():
        answer["result"] = api.txt2img(prompt="a cat", seed=1, steps=5000, width=64, height=64)

    thread = threading.Thread(target=long_job)
    thread.start()
    deadline = time.time() + 30
    while True:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            break
        assert time.time() < deadline, progress
        time.sleep(0.05)
    assert progress["state"]["sampling_steps"] == 5000
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (128, 128) and np.asarray(preview).std() > 0  # the x0 estimate
    assert api.interrupt() == {}
    stopped_at = time.time()
    thread.join(timeout=30)
    assert time.time() - stopped_at < 5
    assert answer["result"].images == []  # stopped before any image was finished
    assert api.get_progress()["state"]["job_count"] == 0
