"""The `ldm` command end to end on a tiny random SD 1.x checkpoint (fast)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_cli.cli.generate import SAMPLER_HELP
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from ldm_cli.testing import random_checkpoint
from tests.cli_helpers import ldm, pixels, written

NAME = re.compile(r"^\d{5}-(\d+)-[a-z0-9-]+\.png$")


EMBEDDED = WEIGHTS_DIR / DEFAULT_NAME


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=5)


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom ldm_cli.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    app(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "HEAVY []" in out
    assert "--negative-prompt" in out and "dpmpp_2m" in out


@pytest.mark.parametrize("args", [[], ["dataset"]])
def test_a_command_without_arguments_prints_its_usage(args):
    proc = ldm(*args, check=False)
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("Usage: ") and first.endswith(
        " ".join([*args, "[OPTIONS] COMMAND"]) + " [ARGS]..."
    )
    assert "Commands" in proc.stderr


def test_version():
    import ldm_cli

    assert ldm("--version").stdout == f"ldm {ldm_cli.__version__}\n"


def test_sampler_help_lists_exactly_the_sampler_table():
    from ldm_cli.samplers import SAMPLERS

    assert list(SAMPLER_HELP) == list(SAMPLERS)


def test_generate_writes_png_with_a1111_parameters(tiny, tmp_path):
    proc = ldm(
        "generate",
        "a red circle",
        "-n",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "42",
        "--sampler",
        "dpmpp_2m",
        "--scheduler",
        "karras",
        "--cfg",
        "6.5",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path),
    )
    (path,) = written(proc)
    assert NAME.match(path.name) and path.name.split("-")[1] == "42"
    text = read_parameters(path)
    lines = text.splitlines()
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: blurry"
    digest = hashlib.sha256(tiny.read_bytes()).hexdigest()[:10]
    assert lines[2] == (
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
        f"Size: 64x64, Model hash: {digest}, Model: tiny"
    )
    p = parse_parameters(text)
    assert (p.sampler, p.scheduler, p.steps, p.seed) == ("dpmpp_2m", "karras", 3, 42)


def test_same_command_twice_is_identical_and_never_overwrites(tiny, tmp_path):
    args = (
        "generate",
        "a blue square",
        "--steps",
        "2",
        "--seed",
        "7",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path),
    )
    (first,) = written(ldm(*args))
    (second,) = written(ldm(*args))
    assert first != second and first.exists()
    assert np.array_equal(pixels(first), pixels(second))


def test_from_png_reproduces_bit_identically(tiny, tmp_path):
    (orig,) = written(
        ldm(
            "generate",
            "a star, at night: (detailed)",
            "-n",
            "x, y",
            "--steps",
            "3",
            "--seed",
            "99",
            "--sampler",
            "euler_a",
            "--model",
            str(tiny),
            "--out",
            str(tmp_path),
        )
    )
    (again,) = written(
        ldm(
            "generate",
            "--from-png",
            str(orig),
            "--model",
            str(tiny),
            "--out",
            str(tmp_path / "again"),
        )
    )
    assert np.array_equal(pixels(orig), pixels(again))
    assert read_parameters(orig) == read_parameters(again)


def test_from_png_takes_what_the_command_line_gives(tiny, tmp_path):
    made = ("generate", "a cat", "--steps", "2", "--seed", "5", "--model", str(tiny))
    (orig,) = written(ldm(*made, "--out", str(tmp_path / "a")))
    again = ("generate", "--from-png", str(orig), "--model", str(tiny), "-o", str(tmp_path / "b"))
    paths = written(ldm(*again, "--steps", "3", "-N", "2"))
    assert [p.name[:8] for p in paths] == ["00001-5-", "00002-6-"]
    assert [parse_parameters(read_parameters(p)).steps for p in paths] == [3, 3]
    # the settings the command line leaves alone are the PNG's: steps 2 gives the same pixels
    (same,) = written(ldm(*again, "--steps", "2"))
    assert np.array_equal(pixels(orig), pixels(same))


def test_from_png_refuses_an_image_to_image_png(tiny, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "red").save(source)
    (made,) = written(
        ldm(
            "img2img",
            str(source),
            "a cat",
            "--steps",
            "2",
            "--model",
            str(tiny),
            "-o",
            str(tmp_path),
        )
    )
    proc = ldm(
        "generate",
        "--from-png",
        str(made),
        "--model",
        str(tiny),
        "-o",
        str(tmp_path / "x"),
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: {made} was made by `ldm img2img` (or A1111's equivalent) from an input image; "
        "--from-png re-renders text-to-image PNGs only\n"
    )


@pytest.mark.skipif(not EMBEDDED.exists(), reason="the embedded model is not in weights/")
def test_from_png_keeps_clip_skip_1_on_a_model_whose_own_is_2(tmp_path):
    (orig,) = written(
        ldm(
            "generate",
            "a red circle",
            "--clip-skip",
            "1",
            "--steps",
            "2",
            "--seed",
            "1",
            "-o",
            str(tmp_path),
        )
    )
    assert parse_parameters(read_parameters(orig)).extra["Clip skip"] == "1"
    (again,) = written(ldm("generate", "--from-png", str(orig), "-o", str(tmp_path)))
    assert np.array_equal(pixels(orig), pixels(again))
    (default,) = written(
        ldm("generate", "a red circle", "--steps", "2", "--seed", "1", "-o", str(tmp_path))
    )
    assert parse_parameters(read_parameters(default)).extra["Clip skip"] == "2"


def test_seed_k_does_not_depend_on_batch_size(tiny, tmp_path):
    common = (
        "generate",
        "a green star",
        "--steps",
        "3",
        "--seed",
        "10",
        "--sampler",
        "euler_a",
        "-N",
        "3",
        "--model",
        str(tiny),
    )
    one = written(ldm(*common, "-b", "1", "--out", str(tmp_path / "b1")))
    three = written(ldm(*common, "-b", "3", "--out", str(tmp_path / "b3")))
    assert [p.name.split("-")[1] for p in one] == ["10", "11", "12"]
    for a, b in zip(one, three, strict=True):
        assert a.name == b.name
        diff = np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max()
        assert diff <= 1, f"batching changed {a.name} by {diff}"


def test_prompts_file_of_three_lines_gives_three_images(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# shapes\n\na red circle\n"
        '--prompt "a cat" --negative_prompt "blurry" --steps 2 --seed 5 --cfg_scale 6\n'
        "a yellow triangle on a black background\n"
    )
    proc = ldm(
        "generate",
        "--prompts-file",
        str(prompts),
        "--steps",
        "3",
        "--seed",
        "1",
        "--model",
        str(tiny),
        "--out",
        str(tmp_path / "out"),
    )
    paths = written(proc)
    assert len(paths) == 3
    params = [parse_parameters(read_parameters(p)) for p in paths]
    assert [p.prompt for p in params] == [
        "a red circle",
        "a cat",
        "a yellow triangle on a black background",
    ]
    assert (params[1].steps, params[1].seed, params[1].cfg_scale) == (2, 5, 6.0)
    assert params[1].negative_prompt == "blurry"
    assert (params[0].steps, params[0].seed) == (3, 1)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("generate", "x", "--model", "/nonexistent.safetensors"), "not found"),
        (("generate", "x", "--sampler", "nope"), "unknown sampler"),
        (("generate", "x", "--scheduler", "nope"), "unknown scheduler"),
        (("generate", "x", "--steps", "0"), "--steps"),
        (("generate", "--width", "70", "x"), "multiples of"),
        (("generate",), "exactly one of"),
        (("info", "/nonexistent.safetensors"), "not found"),
    ],
)
def test_bad_input_gives_one_line_error(tiny, tmp_path, args, needle):
    args = tuple(a for a in args)
    if "--model" not in args and args[0] == "generate":
        args = (*args, "--model", str(tiny))
    out = tmp_path / "out"
    proc = (
        ldm(*args, "--out", str(out), check=False)
        if args[0] == "generate"
        else ldm(*args, check=False)
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_info_names_family_and_counts(tiny):
    out = ldm("info", str(tiny)).stdout
    assert "family:      sd1" in out and "prediction:  eps" in out
    assert "clip skip:   1" in out
    assert "unet:" in out and "parameters" in out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_on_stdout_is_a_one_line_error(tiny):
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "ldm_cli.cli", "info", str(tiny)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert proc.returncode == 1
    assert proc.stderr == "error: No space left on device\n"
