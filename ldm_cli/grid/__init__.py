"""`ldm grid`'s pure parts (no torch): the X/Y/Z axes in AUTOMATIC1111's syntax, the cells
and their options, the labelled grid image and the grid PNG's parameters text."""

from ldm_cli.grid.axes import AXES, AXIS_FLAGS, PROMPT, Axis, axis_kind, check_axes, parse_axis
from ldm_cli.grid.cells import Cell, cell_options, check_prompt_axis, grid_cells
from ldm_cli.grid.layout import Layout, draw_grid
from ldm_cli.grid.recipe import grid_parameters, rebuild_command
from ldm_cli.grid.values import expand_range, parse_values, split_values

__all__ = [
    "AXES",
    "AXIS_FLAGS",
    "PROMPT",
    "Axis",
    "Cell",
    "Layout",
    "axis_kind",
    "cell_options",
    "check_axes",
    "check_prompt_axis",
    "draw_grid",
    "expand_range",
    "grid_cells",
    "grid_parameters",
    "parse_axis",
    "parse_values",
    "rebuild_command",
    "split_values",
]
