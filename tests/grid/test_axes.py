"""`NAME=VALUES` axes, the cells they make and the grid PNG's parameters text."""

from __future__ import annotations

import shlex

import pytest

from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import parse_parameters
from ldm_cli.grid import (
    AXES,
    axis_kind,
    cell_options,
    check_axes,
    check_prompt_axis,
    grid_cells,
    grid_parameters,
    parse_axis,
    rebuild_command,
)


def test_option_names_and_a1111_labels_name_the_same_axis():
    assert axis_kind("cfg") is axis_kind("CFG Scale") is axis_kind("cfg_scale")
    assert axis_kind("hires-strength") is axis_kind("Denoising")
    assert axis_kind("Prompt S/R") is axis_kind("prompt")
    assert axis_kind("CLIP-SKIP") is axis_kind("Clip skip")
    assert {a.option for a in AXES} >= {"steps", "cfg", "sampler", "scheduler", "seed", "width"}


def test_axis_values_are_typed_checked_and_spelled_out():
    axis = parse_axis("Steps=1-10 [4]")
    assert (axis.option, axis.values, axis.spec) == ("steps", (1, 4, 7, 10), "steps=1,4,7,10")
    axis = parse_axis("cfg=5-6 (+0.5)")
    assert axis.values == (5.0, 5.5, 6.0)
    assert [axis.label(i) for i in range(3)] == ["CFG scale: 5", "CFG scale: 5.5", "CFG scale: 6"]
    axis = parse_axis("sampler=Euler a, dpmpp_2m,k_lms")  # A1111 names and ours
    assert axis.values == ("euler_a", "dpmpp_2m", "lms")
    assert axis.label(1) == "DPM++ 2M"
    assert parse_axis("scheduler=Karras,automatic,trailing").values == (
        "karras",
        "auto",
        "trailing",
    )


def test_seed_minus_one_is_drawn_once_and_pinned_in_the_spec():
    axis = parse_axis("seed=1,-1,3")
    assert axis.drew_seeds and axis.values[0] == 1 and axis.values[2] == 3
    assert 0 <= axis.values[1] < 2**32
    assert axis.spec == f"seed=1,{axis.values[1]},3"
    assert not parse_axis("seed=1-3").drew_seeds


def test_prompt_axis_keeps_its_values_as_written():
    axis = parse_axis('prompt=red,"dark, blue",')
    assert axis.values == ("red", "dark, blue", "")  # an empty replacement deletes the text
    assert axis.label(1) == "dark, blue"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("steps", "write NAME=VALUES"),
        ("=1,2", "write NAME=VALUES"),
        ("stepz=1,2", "unknown axis 'stepz'; axes: prompt, seed, steps"),
        ("steps=0,10", "steps must be between 1 and 10000, got 0"),
        ("steps=1.5", "'1.5' is not a whole number"),
        ("sampler=euler,warp", "unknown sampler 'warp'"),
        ("scheduler=fancy", "unknown schedule type 'fancy'"),
        ("cfg=0", "cfg must be above 0"),
        ("eta=2", "eta must be between 0 and 1"),
        ("width=0", "width must be between 1 and 16384"),
        ("seed=-2", "seed must be between 0 and 2\\*\\*64-1"),
        ("prompt=,cat", "needs the text to search for"),
        ("steps=", "no values"),
    ],
)
def test_bad_axes_are_one_line_errors_naming_the_flag(spec, needle):
    with pytest.raises(UserError, match=needle) as error:
        parse_axis(spec, "--y")
    assert str(error.value).startswith("--y ") and "\n" not in str(error.value)


def test_one_option_on_two_axes_is_refused():
    with pytest.raises(UserError, match="--x and --z both vary steps"):
        check_axes([parse_axis("steps=1,2"), None, parse_axis("steps=3")])


def test_prompt_search_text_must_be_in_the_prompt_or_negative_prompt():
    axes = [parse_axis("prompt=cat,dog"), None, None]
    check_prompt_axis(axes, "a cat", "")
    check_prompt_axis(axes, "a bird", "no cat")
    with pytest.raises(UserError, match="'cat' is not in the prompt or the negative prompt"):
        check_prompt_axis(axes, "a bird", "blurry")


def test_cells_run_x_fastest_then_y_then_z():
    axes = [parse_axis("steps=1,2,3"), parse_axis("cfg=5,7"), parse_axis("seed=1,2")]
    cells = grid_cells(axes)
    assert len(cells) == 12
    assert [(c.x, c.y, c.z) for c in cells[:4]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0)]
    assert (cells[6].x, cells[6].y, cells[6].z) == (0, 0, 1)
    assert len(grid_cells([None, parse_axis("cfg=5,7"), None])) == 2


def test_cell_options_set_each_axis_and_prompt_sr_replaces_in_both_prompts():
    axes = [parse_axis("steps=1,2"), parse_axis("prompt=cat,dog"), None]
    base = {"prompt": "a cat, cat", "negative_prompt": "cat hair", "steps": 9, "cfg": 7.0}
    cells = grid_cells(axes)
    first = cell_options(cells[0], axes, base)
    assert first == {**base, "steps": 1}  # the first value of prompt S/R keeps the prompt
    last = cell_options(cells[3], axes, base)
    assert last == {"prompt": "a dog, dog", "negative_prompt": "dog hair", "steps": 2, "cfg": 7.0}
    assert base["prompt"] == "a cat, cat"


def test_rebuild_command_pins_what_was_drawn():
    axes = [parse_axis("seed=-1,5"), None, None]
    argv = ["grid", "a cat", "--x", "seed=-1,5", "--seed", "-1"]
    command = rebuild_command(argv, 1234, axes)
    words = shlex.split(command)
    assert words[:7] == ["ldm", *argv]
    assert words[7:] == ["--seed", "1234", "--x", axes[0].spec]
    assert rebuild_command(["grid", "x y"], None, [None, None, None]) == "ldm grid 'x y'"


def test_grid_parameters_are_the_first_cells_with_the_axes_as_a1111_writes_them():
    first = "a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64"
    axes = [parse_axis("steps=1,2"), parse_axis("sampler=euler,dpmpp_2m"), parse_axis("cfg=7,9")]
    text = grid_parameters(first, axes, "ldm grid 'a cat' --x steps=1,2", z_index=1)
    params = parse_parameters(text)
    assert (params.prompt, params.steps, params.sampler, params.seed) == ("a cat", 1, "euler", 3)
    assert params.extra["X Type"] == "Steps" and params.extra["X Values"] == "1,2"
    assert params.extra["Y Type"] == "Sampler"
    assert params.extra["Y Values"] == "euler,dpmpp_2m"
    assert params.extra["Z Value"] == "CFG scale: 9"
    assert params.extra["Grid command"] == "ldm grid 'a cat' --x steps=1,2"
