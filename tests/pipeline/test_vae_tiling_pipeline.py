"""`--vae-tiling` / `Pipeline.vae_tiling`: which runs are tiled, what the PNG records, and the
CLI option, on a tiny random checkpoint (its f=2 VAE makes a 64-cell tile 128 px)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import read_parameters
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import (  # noqa: F401 (an autouse fixture)
    ldm,
    one_thread_per_command,
    pixels,
    written,
)
from tests.image_helpers import photo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=4)


@pytest.fixture(scope="module")
def pipe(tiny):
    return ldm_cli.load(tiny, device="cpu", dtype="fp32")


def _generate(pipe, mode: str, size: int):
    pipe.vae_tiling = mode
    try:
        (image,) = pipe.generate("a red circle", steps=1, seed=3, width=size, height=size)
    finally:
        pipe.vae_tiling = "auto"
    return np.asarray(image), image.info["parameters"]


def test_tiling_changes_the_image_only_when_there_are_several_tiles(pipe):
    untiled, text = _generate(pipe, "off", 160)
    assert "VAE tiling" not in text
    auto, text = _generate(pipe, "auto", 160)  # 160 x 160 px is far below 1024 x 1024
    assert np.array_equal(auto, untiled) and "VAE tiling" not in text
    tiled, text = _generate(pipe, "on", 160)  # 80 x 80 latent cells: 2 x 2 tiles
    assert "VAE tiling: on" in text
    assert tiled.shape == untiled.shape and not np.array_equal(tiled, untiled)
    single, text = _generate(pipe, "on", 128)  # 64 x 64 cells: one tile
    assert np.array_equal(single, _generate(pipe, "off", 128)[0])
    assert "VAE tiling" not in text


def test_the_hires_pass_counts(pipe):
    from ldm_cli.pipeline.tasks.hires import HiresFix

    req = Request("a cat", width=96, height=96)
    hires = HiresFix(scale=2)  # the second pass decodes 192 x 192 px
    pipe.vae_tiling = "on"
    try:
        assert "VAE tiling: on" in pipe.text_to_image_parameters(req, hires)
        assert "VAE tiling" not in pipe.parameters_text(req)
    finally:
        pipe.vae_tiling = "auto"
    assert "VAE tiling" not in pipe.text_to_image_parameters(replace(req, width=128), hires)


def test_img2img_encodes_and_decodes_in_tiles(pipe):
    image = photo("astronaut", 160, 144)
    results = {}
    for mode in ("off", "on"):
        pipe.vae_tiling = mode
        try:
            (out,) = pipe.img2img(image, "a cat", strength=0.5, steps=2, seed=1)
        finally:
            pipe.vae_tiling = "auto"
        results[mode] = (np.asarray(out), out.info["parameters"])
    assert results["on"][0].shape == results["off"][0].shape == (144, 160, 3)
    assert not np.array_equal(results["on"][0], results["off"][0])
    assert "VAE tiling: on" in results["on"][1] and "VAE tiling" not in results["off"][1]


def test_load_takes_the_mode_and_refuses_a_bad_one(tiny):
    assert ldm_cli.load(tiny, device="cpu", dtype="fp32", vae_tiling="on").vae_tiling == "on"
    with pytest.raises(UserError, match="unknown VAE tiling 'always'"):
        ldm_cli.load(tiny, device="cpu", vae_tiling="always")


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "a cat"],
        ["img2img", "in.png", "a cat"],
        ["inpaint", "in.png", "mask.png", "a cat"],
        ["outpaint", "in.png", "a cat", "--left", "8"],
        ["upscale", "in.png"],
    ],
)
def test_a_bad_value_is_a_one_line_error(command, tmp_path):
    proc = ldm(*command, "--vae-tiling", "sometimes", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown --vae-tiling 'sometimes'; use auto, on or off"


def test_help_documents_the_option():
    out = ldm("generate", "--help").stdout
    assert "--vae-tiling" in out and "1024x1024" in out


def test_cli_records_tiling_and_from_png_repeats_it(tiny, tmp_path):
    common = ["--model", str(tiny), "--steps", "1", "--seed", "5", "-W", "160", "-H", "136"]
    (first,) = written(ldm("generate", "a cat", *common, "--vae-tiling", "on", "-o", str(tmp_path)))
    assert "VAE tiling: on" in read_parameters(first)
    again = tmp_path / "again"
    # the default (auto) follows the PNG: tiled again, so the pixels repeat exactly
    (second,) = written(
        ldm("generate", "--from-png", str(first), "-m", str(tiny), "-o", str(again))
    )
    assert np.array_equal(pixels(first), pixels(second))
    assert "VAE tiling: on" in read_parameters(second)
    off = tmp_path / "off"
    (plain,) = written(ldm("generate", "a cat", *common, "--vae-tiling", "off", "-o", str(off)))
    assert "VAE tiling" not in read_parameters(plain)
    assert not np.array_equal(pixels(first), pixels(plain))
