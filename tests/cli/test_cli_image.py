"""`ldm img2img`, `ldm inpaint`, `ldm outpaint` and the hires fix, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.image_inputs import blur_mask
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import (  # noqa: F401 (an autouse fixture)
    ldm,
    one_thread_per_command,
    pixels,
    written,
)
from tests.image_helpers import box_mask, photo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    photo("coffee", 62, 45).convert("P").save(folder / "odd-palette.png")
    photo("astronaut").save(folder / "photo.png")
    box_mask(64, 64, (16, 16, 40, 48)).save(folder / "mask.png")
    box_mask(32, 32, (0, 0, 8, 8)).save(folder / "small-mask.png")
    box_mask(64, 64, (0, 0, 0, 0)).save(folder / "empty-mask.png")
    return folder


def test_help_lists_the_image_commands_without_importing_torch():
    code = (
        "import sys\nfrom ldm_cli.cli import app\n"
        "for args in (['--help'], ['img2img', '--help'], ['inpaint', '--help'],"
        " ['outpaint', '--help'], ['generate', '--help']):\n"
        "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "HEAVY []" in out
    for option in (
        "img2img",
        "outpaint",
        "--strength",
        "--mask-blur",
        "--inpaint-full-res",
        "--inpaint-full-res-padding",
        "--left",
        "--bottom",
        "--hires-scale",
        "--hires-strength",
        "--hires-steps",
    ):
        assert option in out, option


def test_img2img_keeps_an_odd_size_and_says_so(tiny, inputs, tmp_path):
    proc = ldm(
        "img2img",
        str(inputs / "odd-palette.png"),
        "a cup of coffee",
        "--strength",
        "0.6",
        "--steps",
        "4",
        "--seed",
        "3",
        "--sampler",
        "dpmpp_2m",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path),
    )
    (path,) = written(proc)
    assert pixels(path).shape == (45, 62, 3)
    assert "62x45" in proc.stderr and "64x48" in proc.stderr
    params = parse_parameters(read_parameters(path))
    assert params.extra["Denoising strength"] == "0.6"
    assert (params.sampler, params.seed, params.steps) == ("dpmpp_2m", 3, 4)


def test_inpaint_writes_the_input_outside_the_blurred_mask(tiny, inputs, tmp_path):
    args = ("a green circle", "--steps", "3", "--seed", "1", "--mask-blur", "3", "-N", "2")
    proc = ldm(
        "inpaint",
        str(inputs / "photo.png"),
        str(inputs / "mask.png"),
        *args,
        "--model",
        str(tiny),
        "--out",
        str(tmp_path),
    )
    paths = written(proc)
    assert [p.name.split("-")[1] for p in paths] == ["1", "2"]
    from PIL import Image

    keep = blur_mask(Image.open(inputs / "mask.png"), 3) == 0
    original = pixels(inputs / "photo.png")
    for path in paths:
        assert np.array_equal(pixels(path)[keep], original[keep])
        assert parse_parameters(read_parameters(path)).extra["Mask blur"] == "3"


def test_outpaint_grows_the_image(tiny, inputs, tmp_path):
    proc = ldm(
        "outpaint",
        str(inputs / "photo.png"),
        "a landscape",
        "--right",
        "32",
        "--top",
        "8",
        "--steps",
        "2",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path),
    )
    (path,) = written(proc)
    assert pixels(path).shape == (72, 96, 3)


def test_hires_fix_from_the_command_line_and_back_from_the_png(tiny, tmp_path):
    args = ("--steps", "2", "--seed", "8", "--model", str(tiny))
    hires = ("--hires-scale", "2", "--hires-strength", "0.5", "--hires-steps", "4")
    (first,) = written(ldm("generate", "a cat", *args, *hires, "--out", str(tmp_path / "a")))
    assert pixels(first).shape == (128, 128, 3)
    params = parse_parameters(read_parameters(first))
    assert (params.width, params.height) == (64, 64)
    assert params.extra["Hires upscale"] == "2" and params.extra["Hires steps"] == "4"
    assert params.extra["Denoising strength"] == "0.5"
    again = ldm("generate", "--from-png", str(first), "--model", str(tiny), "--out", str(tmp_path))
    (second,) = written(again)
    assert np.array_equal(pixels(first), pixels(second))


@pytest.mark.parametrize(
    "args, needle",
    [
        (("img2img", "{in}/missing.png", "x"), "not found"),
        (("img2img", "{in}/photo.png", "x", "--strength", "2"), "between 0 and 1"),
        (("inpaint", "{in}/photo.png", "{in}/small-mask.png", "x"), "32x32"),
        (("inpaint", "{in}/photo.png", "{in}/empty-mask.png", "x"), "empty"),
        (("inpaint", "{in}/photo.png", "{in}/photo.png", "x", "--mask-blur", "-1"), "blur"),
        (("outpaint", "{in}/photo.png", "x"), "at least one of"),
        (("outpaint", "{in}/photo.png", "x", "--left", "-4"), "--left"),
        (("generate", "x", "--hires-scale", "0"), "--hires-scale"),
        (("generate", "x", "--hires-upscaler", "Lanczos"), "--hires-upscaler needs --hires-scale"),
        (
            ("generate", "x", "--hires-scale", "2", "--hires-upscaler", "nope"),
            "--hires-upscaler must",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(tiny, inputs, args, needle):
    filled = [a.replace("{in}", str(inputs)) for a in args]
    proc = ldm(*filled, "--model", str(tiny), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
