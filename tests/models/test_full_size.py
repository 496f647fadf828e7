"""The full SD 1.5 architecture: a random checkpoint in the real file layout (1,145 tensors,
fp16, with the schedule/EMA extras) loads strictly and renders end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_cli.checkpoints.detect import detect_config
from ldm_cli.checkpoints.file import read_header
from ldm_cli.core.config import SD15
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15") / "sd15-random.safetensors"
    return random_checkpoint(SD15, path, seed=0, dtype=torch.float16, with_metadata=False)


def test_real_layout_is_detected_from_shapes(sd15):
    header = read_header(sd15)
    assert len(header.tensors) == 1145
    assert not header.metadata.get("ldm_config")
    assert detect_config(header) == SD15


def test_info_reports_the_real_parameter_counts(sd15):
    out = ldm("info", str(sd15)).stdout
    assert "family:      sd1" in out
    assert "859,520,964 parameters  (F16 x686)" in out
    assert "83,653,863 parameters" in out
    assert "123,060,480 parameters" in out


def test_generate_256_two_steps_reproducible_and_from_png(sd15, tmp_path):
    args = (
        "generate",
        "a castle on a hill",
        "-n",
        "lowres",
        "--width",
        "256",
        "--height",
        "256",
        "--steps",
        "2",
        "--seed",
        "42",
        "--model",
        str(sd15),
        "--out",
        str(tmp_path),
    )
    (first,) = written(ldm(*args))
    p = parse_parameters(read_parameters(first))
    assert (p.prompt, p.negative_prompt, p.steps, p.seed) == ("a castle on a hill", "lowres", 2, 42)
    assert (p.width, p.height, p.sampler, p.model_name) == (256, 256, "euler_a", "sd15-random")
    assert pixels(first).shape == (256, 256, 3)
    # the same pixels from the PNG's own parameters: the run repeats exactly (a third full-size
    # run of the same command would show no more)
    (again,) = written(
        ldm(
            "generate",
            "--from-png",
            str(first),
            "--model",
            str(sd15),
            "--out",
            str(tmp_path / "again"),
        )
    )
    assert np.array_equal(pixels(first), pixels(again))
