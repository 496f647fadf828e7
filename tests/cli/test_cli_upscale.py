"""`ldm upscale`, run as a user would, on a tiny random x4 checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ldm_cli.cli import upscale as cli_upscale
from ldm_cli.core.config import TINY_SD1, TINY_X4, X4_UPSCALER
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.pipeline.tasks import upscale
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import (  # noqa: F401 (an autouse fixture)
    ldm,
    one_thread_per_command,
    pixels,
    written,
)
from tests.image_helpers import photo
from tests.upscaler_helpers import real_layout_shapes, write_sparse_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscale")
    photo("chelsea", 16).save(folder / "cat.png")
    photo("coffee", 18, 10).convert("P").save(folder / "odd.png")
    return {
        "x4": random_checkpoint(TINY_X4, folder / "tiny-x4.safetensors", seed=8),
        "sd1": random_checkpoint(TINY_SD1, folder / "tiny-sd1.safetensors", seed=9),
        "cat": folder / "cat.png",
        "odd": folder / "odd.png",
    }


def test_cli_defaults_match_the_library():
    assert cli_upscale.MAX_NOISE_LEVEL == upscale.MAX_NOISE_LEVEL
    assert cli_upscale.DEFAULT_NOISE_LEVEL == upscale.DEFAULT_NOISE_LEVEL
    assert cli_upscale.DEFAULT_TILE_SIZE == upscale.DEFAULT_TILE_SIZE
    assert cli_upscale.DEFAULT_SAMPLER == upscale.DEFAULT_SAMPLER


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom ldm_cli.cli import app\n"
        "try:\n    app(['upscale', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "--noise-level" in out and "--tile-size" in out
    assert "HEAVY []" in out


def test_upscale_writes_a_4x_png_with_its_parameters(files, tmp_path):
    args = ("upscale", str(files["cat"]), "a tabby cat", "--model", str(files["x4"]))
    opts = ("--steps", "3", "--seed", "7", "--noise-level", "40", "--out", str(tmp_path))
    (path,) = written(ldm(*args, *opts))
    assert path.name == "00001-7-a-tabby-cat.png"
    assert pixels(path).shape == (64, 64, 3)
    p = parse_parameters(read_parameters(path))
    assert (p.prompt, p.steps, p.seed, p.sampler) == ("a tabby cat", 3, 7, "ddim")
    assert (p.width, p.height, p.model_name) == (64, 64, "tiny-x4")
    assert p.extra["Noise level"] == "40"
    assert "Color fix" not in p.extra  # a checkpoint's output as diffusers gives it
    (again,) = written(ldm(*args, *opts))
    assert (pixels(again) == pixels(path)).all()


def test_cfg_defaults_to_the_checkpoints_own(files, tmp_path):
    """A checkpoint whose ldm_config names default_cfg (the embedded upscaler: 1) is run at
    that scale without --cfg; --cfg still overrides it; `ldm info` shows it."""
    unguided = random_checkpoint(
        TINY_X4.with_(default_cfg=1.0), tmp_path / "unguided.safetensors", seed=8
    )
    args = ("upscale", str(files["cat"]), "a tabby cat", "--steps", "2", "--seed", "1")
    for model, extra, scale in [
        (unguided, (), 1.0),
        (unguided, ("--cfg", "4"), 4.0),
        (files["x4"], (), 7.5),
    ]:
        out = tmp_path / f"{model.stem}-{scale:g}"
        (path,) = written(ldm(*args, "--model", str(model), *extra, "--out", str(out)))
        assert parse_parameters(read_parameters(path)).cfg_scale == scale
    assert "guidance:    1 by default" in ldm("info", str(unguided)).stdout
    assert "guidance:" not in ldm("info", str(files["x4"])).stdout


def test_default_model_tiles_and_odd_sizes(files, tmp_path):
    """No prompt: named after the input; an odd size is padded and cropped back, with a notice;
    --tile-size 8 splits the 20x12 padded input into tiles."""
    env = dict(os.environ, LDM_DEFAULT_UPSCALER=str(files["x4"]))
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_cli.cli", "upscale", str(files["odd"]), "--diffusion"]
        + ["--steps", "2"]
        + ["--seed", "3", "--tile-size", "8", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = written(proc)
    assert path.name == "00001-3-odd-x4.png"
    assert pixels(path).shape == (40, 72, 3)
    assert "18x10 is not a multiple of 4" in proc.stderr
    assert "the result cropped back to 72x40\n" in proc.stderr  # 4x the input, as written
    p = parse_parameters(read_parameters(path))
    assert (p.prompt, p.width, p.height) == ("", 72, 40)
    assert (p.extra["Tile size"], p.extra["Tile overlap"]) == ("8", "1")
    assert p.extra["Color fix"] == "gaussian"  # the embedded model's default


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--model", "{sd1}"), "tiny-sd1.safetensors is not an x4 upscaler checkpoint (it is sd1)"),
        (("--model", "{x4}", "--noise-level", "351"), "--noise-level must be between 0 and 350"),
        (
            ("--model", "{x4}", "--tile-size", "6"),
            "--tile-size must be 0 (no tiling) or a multiple",
        ),
        (("--model", "{x4}", "--sampler", "nope"), "unknown sampler 'nope'"),
        (("--model", "{x4}", "--color-fix", "blue"), "--color-fix must be auto, gaussian or"),
    ],
)
def test_bad_input_is_a_one_line_error(files, tmp_path, extra, message):
    extra = tuple(arg.format(**files) for arg in extra)
    proc = ldm("upscale", str(files["cat"]), *extra, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


def test_missing_embedded_upscaler_is_a_one_line_error(files, tmp_path):
    env = dict(os.environ, LDM_DEFAULT_UPSCALER=str(tmp_path / "absent.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_cli.cli", "upscale", str(files["cat"]), "--diffusion"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1
    assert "the embedded x4 diffusion upscaler is missing" in proc.stderr


def test_info_on_the_real_layout(tmp_path):
    path = write_sparse_checkpoint(tmp_path / "x4.safetensors", real_layout_shapes(X4_UPSCALER))
    out = ldm("info", str(path)).stdout
    assert "family:      x4-upscaler (Stable Diffusion x4 upscaler)" in out
    assert "prediction:  v" in out
    assert "473,398,020 parameters" in out
    assert "55,325,927 parameters" in out
