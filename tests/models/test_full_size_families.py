"""SD 2.1 and SDXL at full size: random checkpoints in the original layout (fp16) are named by
`ldm info` with the real parameter counts and render end to end at 64x64 in one step."""

from __future__ import annotations

import os

import pytest
import torch

from ldm_cli.core.config import SD21, SDXL_BASE
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written

pytestmark = pytest.mark.slow


def _available_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _render(path, out) -> None:
    args = ("generate", "a castle", "--model", str(path), "-W", "64", "-H", "64")
    (image,) = written(ldm(*args, "--steps", "1", "--seed", "1", "--out", str(out)))
    assert pixels(image).shape == (64, 64, 3)


def test_sd21_full_size(tmp_path):
    path = random_checkpoint(SD21, tmp_path / "sd21.safetensors", seed=0, dtype=torch.float16)
    out = ldm("info", str(path), "--prediction", "v").stdout
    assert "family:      sd2 (Stable Diffusion 2.x)" in out
    assert "865,910,724 parameters" in out
    assert "354,032,641 parameters" in out
    _render(path, tmp_path / "out")


# Building 3.5 B random parameters inside the test process peaks near 17 GiB, too much beside
# the other pytest worker on a 24 GiB machine: opt in with LDM_TEST_SDXL_FULL=1 (measured: info
# 0.4 s, 64x64 one-step generate 38 s on the 2-core CPU).
@pytest.mark.skipif(
    os.environ.get("LDM_TEST_SDXL_FULL") != "1" or _available_gib() < 20,
    reason="opt in with LDM_TEST_SDXL_FULL=1 and >= 20 GiB free RAM",
)
def test_sdxl_full_size(tmp_path):
    path = random_checkpoint(SDXL_BASE, tmp_path / "sdxl.safetensors", seed=0, dtype=torch.float16)
    out = ldm("info", str(path)).stdout
    assert "family:      sdxl (Stable Diffusion XL)" in out
    assert "2,567,463,684 parameters" in out
    assert "694,659,841 parameters" in out
    _render(path, tmp_path / "out")
