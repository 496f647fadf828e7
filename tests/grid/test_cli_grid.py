"""`ldm grid` end to end on the embedded model: every cell is the image `ldm generate` gives
for its settings, bit for bit, and the grid shows them under their labels.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.core.pngmeta import parse_parameters, read_parameters
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401

pytestmark = pytest.mark.skipif(
    not (WEIGHTS_DIR / DEFAULT_NAME).exists(), reason="the embedded model is not in weights/"
)

PROMPT, NEGATIVE = "a red circle", "blurry red"
AXES = ("--x", "steps=1-2", "--y", "sampler=euler, DPM++ 2M", "--z", "prompt=red,blue")
STEPS, SAMPLERS, WORDS = (1, 2), ("euler", "dpmpp_2m"), ("red", "blue")


def ldm_grid(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return ldm("grid", *args, check=check)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2x2 grid with a Prompt S/R Z axis and a random seed: 8 cells, then 2 grids."""
    out = tmp_path_factory.mktemp("grid")
    args = (PROMPT, "-n", NEGATIVE, *AXES, "--cfg", "4", "--seed", "-1", "-o", str(out))
    paths = written(ldm_grid(*args))
    assert len(paths) == 10 and all(p.parent == out for p in paths)
    cells, grids = paths[:8], paths[8:]
    seed = parse_parameters(read_parameters(cells[0])).seed
    return {"args": args, "cells": cells, "grids": grids, "seed": seed, "out": out}


def _cell_settings(index: int) -> tuple[int, str, str]:
    """(steps, sampler, Prompt S/R word) of cell `index`: X fastest, then Y, then Z."""
    return STEPS[index % 2], SAMPLERS[index // 2 % 2], WORDS[index // 4]


def test_each_cell_is_what_ldm_generate_writes_for_its_settings(run, tmp_path):
    seed = run["seed"]
    lines = []
    for index in range(8):
        steps, sampler, word = _cell_settings(index)
        prompt, negative = PROMPT.replace("red", word), NEGATIVE.replace("red", word)
        lines.append(
            f"--prompt {shlex.quote(prompt)} --negative_prompt {shlex.quote(negative)} "
            f"--steps {steps} --sampler {sampler} --cfg 4 --seed {seed}"
        )
    prompts = tmp_path / "cells.txt"
    prompts.write_text("\n".join(lines) + "\n")
    references = written(ldm("generate", "--prompts-file", str(prompts), "-o", str(tmp_path)))
    assert len(references) == 8
    for cell, reference in zip(run["cells"], references, strict=True):
        assert np.array_equal(pixels(cell), pixels(reference)), cell.name
        assert read_parameters(cell) == read_parameters(reference)
    # and one cell against its own single command line, not a prompts file
    (single,) = written(
        ldm(
            "generate",
            "a blue circle",
            "-n",
            "blurry blue",
            "--steps",
            "2",
            "--sampler",
            "dpmpp_2m",
            "--cfg",
            "4",
            "--seed",
            str(seed),
            "-o",
            str(tmp_path),
        )  # fmt: skip
    )
    assert np.array_equal(pixels(run["cells"][7]), pixels(single))
    assert read_parameters(run["cells"][7]) == read_parameters(single)


def test_a_random_seed_is_drawn_once_for_every_cell(run):
    seeds = {parse_parameters(read_parameters(p)).seed for p in run["cells"]}
    assert seeds == {run["seed"]}
    text = read_parameters(run["cells"][5])
    params = parse_parameters(text)
    assert (params.prompt, params.negative_prompt) == ("a blue circle", "blurry blue")
    assert (params.steps, params.sampler, params.cfg_scale) == (2, "euler", 4.0)


def test_grid_images_show_the_cells_under_their_labels(run):
    for z, path in enumerate(run["grids"]):
        grid = Image.open(path).convert("RGB")
        left, top = grid.width - 2 * 64, grid.height - 2 * 64  # the label bands
        assert 40 < left < 128 and 20 < top < 96  # "DPM++ 2M" on the left; title and steps
        array = np.asarray(grid)
        for index in range(4 * z, 4 * z + 4):
            x, y = left + 64 * (index % 2), top + 64 * (index // 2 % 2)
            assert np.array_equal(array[y : y + 64, x : x + 64], pixels(run["cells"][index]))
        white = np.all(array == 255, axis=2)
        assert white[:top, :left][top // 2 :].all()  # the corner under the title is empty
        for column in range(2):  # a label over each column, one left of each row
            assert not white[:top, left + 64 * column : left + 64 * (column + 1)].all()
            assert not white[top + 64 * column : top + 64 * (column + 1), :left].all()


def test_grid_metadata_says_how_to_rebuild_it(run):
    texts = [read_parameters(p) for p in run["grids"]]
    params = [parse_parameters(t) for t in texts]
    assert [p.prompt for p in params] == ["a red circle", "a blue circle"]  # the first cells
    assert texts[1].startswith(read_parameters(run["cells"][4]) + ", X Type: Steps")
    extra = params[0].extra
    assert (extra["X Type"], extra["X Values"]) == ("Steps", "1,2")
    assert (extra["Y Type"], extra["Y Values"]) == ("Sampler", "euler,dpmpp_2m")
    assert (extra["Z Type"], extra["Z Values"]) == ("Prompt S/R", "red,blue")
    assert [p.extra["Z Value"] for p in params] == ["red", "blue"]
    words = shlex.split(extra["Grid command"])
    assert words[:-2] == ["ldm", "grid", *run["args"]]
    assert words[-2:] == ["--seed", str(run["seed"])]  # the seed that -1 drew


def _run_in_process(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    from ldm_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["ldm", "grid", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--x", "stepz=1,2"], "--x 'stepz=1,2': unknown axis 'stepz'"),
        (["--y", "steps=0,1"], "--y 'steps=0,1': steps must be between 1 and 10000, got 0"),
        (["--x", "sampler=euler,nope"], "unknown sampler 'nope'"),
        (["--x", "prompt=dog,cat"], "'dog' is not in the prompt or the negative prompt"),
        (["--x", "steps=1,2", "--z", "steps=3"], "--x and --z both vary steps"),
        ([], "give at least one axis"),
        (["--x", "hires-strength=0.3,0.5"], "need --hires-scale"),
        (["--x", "hires-scale=1.5,20"], "--hires-scale must be from 1 to 8, got 20"),
        (["--x", "steps=1", "--sampler", "warp"], "unknown sampler 'warp'"),
        (["--x", "cfg=1-3 (+0)"], "step must not be 0"),
    ],
)
def test_bad_axes_are_one_line_errors_and_write_nothing(
    monkeypatch, capsys, tmp_path, args, needle
):
    out = tmp_path / "out"
    code, err = _run_in_process(monkeypatch, capsys, ["a cat", *args, "-o", str(out)])
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists()


def test_a_value_the_model_refuses_fails_before_any_cell_is_written(monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    args = ["a cat", "--x", "steps=1,2", "--y", "width=64,100", "-o", str(out)]
    code, err = _run_in_process(monkeypatch, capsys, args)
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() or not list(Path(out).iterdir())


def test_ctrl_c_keeps_the_cells_already_written(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    args = ["grid", "a cat", "--x", "seed=1-3", "--steps", "60", "-o", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_cli.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = Path(proc.stdout.readline().strip())  # the first cell is written and named
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.strip().endswith("interrupted")
    kept = sorted(out.iterdir())  # no temporary files or reservations left
    assert kept[0] == first and len(kept) < 4 and all(p.suffix == ".png" for p in kept)
    assert not any("grid" in p.name for p in kept)
    assert [str(p) for p in kept[1:]] == rest.split()
