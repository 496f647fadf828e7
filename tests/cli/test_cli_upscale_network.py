"""`ldm upscale` with feed-forward networks (the default ldm-sr, --upscaler FILE), run as a
user would; random compact networks stand in for the embedded ones (LDM_SR_X2/LDM_SR_X4)."""

from __future__ import annotations

import os

import pytest
import torch

from ldm_cli.core.config import TINY_X4
from ldm_cli.core.pngmeta import read_parameters
from ldm_cli.models.sr_compact import CompactShape
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import (  # noqa: F401 (an autouse fixture)
    ldm,
    one_thread_per_command,
    pixels,
    written,
)
from tests.image_helpers import photo
from tests.sr_helpers import compact_state, write_compact


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscale-network")
    photo("chelsea", 30, 20).save(folder / "cat.png")
    torch.save({"params": compact_state(CompactShape(4, 8, 2), 3)}, folder / "4x-Pickled.pth")
    return {
        "x2": write_compact(folder / "sr-x2.safetensors", CompactShape(2, 8, 2), 1),
        "x4": write_compact(folder / "sr-x4.safetensors", CompactShape(4, 8, 2), 2),
        "mine": write_compact(folder / "4x-Mine.safetensors", CompactShape(4, 8, 1), 4),
        "pth": folder / "4x-Pickled.pth",
        "diffusion": random_checkpoint(TINY_X4, folder / "tiny-x4.safetensors", seed=8),
        "cat": folder / "cat.png",
    }


@pytest.fixture(autouse=True)
def embedded_networks(files, monkeypatch):
    monkeypatch.setenv("LDM_SR_X2", str(files["x2"]))
    monkeypatch.setenv("LDM_SR_X4", str(files["x4"]))
    monkeypatch.setenv("LDM_DEFAULT_UPSCALER", str(files["diffusion"]))


def upscale(*args, check=True):
    return ldm("upscale", *args, check=check)


def test_the_default_is_the_embedded_network_at_4x(files, tmp_path):
    proc = upscale(str(files["cat"]), "--out", str(tmp_path))
    (path,) = written(proc)
    assert path.name == "00001-cat-x4.png"
    assert pixels(path).shape == (80, 120, 3)
    assert read_parameters(path) == (
        "Postprocess upscale by: 4, Postprocess upscaler: ldm-sr, Source size: 30x20"
    )
    (again,) = written(upscale(str(files["cat"]), "--out", str(tmp_path)))
    assert again.name == "00002-cat-x4.png"  # never replaces
    assert (pixels(again) == pixels(path)).all()  # deterministic: no seed


@pytest.mark.parametrize(
    "scale, shape", [("2", (40, 60, 3)), ("3", (60, 90, 3)), ("1.5", (30, 45, 3))]
)
def test_other_scales(files, tmp_path, scale, shape):
    (path,) = written(upscale(str(files["cat"]), "--scale", scale, "--out", str(tmp_path)))
    assert pixels(path).shape == shape
    assert f"Postprocess upscale by: {scale}," in read_parameters(path)


def test_an_upscaler_file_and_a_tiled_run(files, tmp_path):
    args = (str(files["cat"]), "--upscaler", str(files["mine"]), "--tile-size", "16")
    (path,) = written(upscale(*args, "--tile-overlap", "4", "--out", str(tmp_path)))
    assert path.name == "00001-cat-x4.png"
    assert read_parameters(path) == (
        "Postprocess upscale by: 4, Postprocess upscaler: 4x-Mine, Source size: 30x20, "
        "Tile size: 16, Tile overlap: 4"
    )


def test_a_pth_file_needs_allow_pickle(files, tmp_path):
    args = (str(files["cat"]), "--upscaler", str(files["pth"]), "--out", str(tmp_path))
    proc = upscale(*args, check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "--allow-pickle" in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    (path,) = written(upscale(*args, "--allow-pickle"))
    assert pixels(path).shape == (80, 120, 3)


def test_the_diffusion_upscaler_on_a_photo_says_it_is_out_of_its_domain(files, tmp_path):
    proc = upscale(str(files["cat"]), "--diffusion", "--steps", "1", "--out", str(tmp_path))
    assert "does not look like the shapes scenes" in proc.stderr
    (path,) = written(proc)
    assert pixels(path).shape == (80, 120, 3)
    assert "Noise level: 20" in read_parameters(path)


def test_an_upscaled_png_is_not_a_from_png_source(files, tmp_path):
    (path,) = written(upscale(str(files["cat"]), "--out", str(tmp_path)))
    proc = ldm("generate", "--from-png", str(path), "--out", str(tmp_path / "g"), check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (("a cat",), "PROMPT only apply to diffusion upscalers"),
        (("--steps", "3", "--seed", "2"), "--steps, --seed only apply to diffusion upscalers"),
        (
            (
                "--color-fix",
                "none",
            ),
            "--color-fix only apply to diffusion upscalers",
        ),
        (("--upscaler", "{mine}", "--diffusion"), "give one of them"),
        (("--model", "{diffusion}", "--scale", "2"), "upscale 4x only"),
        (("--scale", "17"), "--scale must be from 1 to 16"),
        (("--tile-size", "8"), "--tile-size must be 0 (no tiling) or at least 16"),
        (("--tile-size", "32", "--tile-overlap", "16"), "less than half the tile size"),
        (("--upscaler", "{diffusion}"), "is not an upscaler spandrel knows"),
        (("--upscaler", "absent.pth"), "upscaler file not found"),
    ],
)
def test_bad_input_is_a_one_line_error(files, tmp_path, extra, message):
    extra = tuple(arg.format(**{k: str(v) for k, v in files.items()}) for arg in extra)
    proc = upscale(str(files["cat"]), *extra, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_missing_embedded_network_is_a_one_line_error(files, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_SR_X4", str(tmp_path / "absent.safetensors"))
    proc = upscale(str(files["cat"]), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "the embedded x4 upscaler is missing" in proc.stderr


def test_help_names_the_choices_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom ldm_cli.cli import app\n"
        "try:\n    app(['upscale', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'spandrel') if m in sys.modules))"
    )
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "--upscaler" in out.stdout and "--diffusion" in out.stdout and "--scale" in out.stdout
    assert "HEAVY []" in out.stdout


def test_info_describes_an_upscaler_file(files):
    out = ldm("info", str(files["mine"])).stdout
    assert "family:      image upscaler (RealESRGAN Compact, x4)" in out
    assert "parameters:  4,328" in out
    proc = ldm("info", str(files["pth"]), check=False)
    assert proc.returncode != 0 and "--allow-pickle" in proc.stderr


def test_a_1024_input_runs_tile_by_tile_in_bounded_memory(files, tmp_path):
    """1024 x 1024 -> 4096 x 4096: 25 tiles of 256, one progress tick each, and a peak RSS above
    the loaded process's that the output itself (48 MiB of pixels, 268 MiB of float accumulators)
    dominates. (The baseline is measured: torch's own resident size differs between machines.)"""
    import json
    import subprocess
    import sys

    from PIL import Image

    photo("astronaut", 1024).save(tmp_path / "big.png")
    code = f"""
import json, resource
from ldm_cli.pipeline.tasks.image_upscaler import load_upscaler
from PIL import Image
upscaler = load_upscaler({str(files["x4"])!r})
upscaler.upscale(Image.new("RGB", (300, 300)))  # torch's lazy set-up, counted in the baseline
ticks = []
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
out = upscaler.upscale({str(tmp_path / "big.png")!r}, progress=lambda i, n: ticks.append([i, n]))
out.save({str(tmp_path / "out.png")!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({{"ticks": ticks, "growth_mib": peak - base, "peak_mib": peak}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ticks"] == [[i, 25] for i in range(1, 26)]
    assert result["growth_mib"] < 500, result
    assert Image.open(tmp_path / "out.png").size == (4096, 4096)
