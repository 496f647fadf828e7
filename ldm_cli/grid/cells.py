"""The cells of an X/Y/Z grid and the `ldm generate` options of each.

Cells are listed Z outermost, then Y, then X (A1111's order when no axis is costly to change),
so image k of a run is cell (k % nx, k // nx % ny, k // (nx * ny)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ldm_cli.core.errors import UserError
from ldm_cli.grid.axes import AXIS_FLAGS, PROMPT, Axis


@dataclass(frozen=True)
class Cell:
    """Cell (x, y, z): its index along each axis (0 along an axis not given)."""

    x: int
    y: int
    z: int

    def values(self, axes: list[Axis | None]) -> list[tuple[Axis, int]]:
        """(axis, index of its value) for each axis given."""
        indices = (self.x, self.y, self.z)
        return [(axis, i) for axis, i in zip(axes, indices, strict=True) if axis is not None]


def grid_cells(axes: list[Axis | None]) -> list[Cell]:
    """Every cell, Z outermost and X innermost."""
    counts = [len(axis.values) if axis is not None else 1 for axis in axes]
    return [Cell(x, y, z) for z, y, x in itertools.product(*map(range, reversed(counts)))]


def check_prompt_axis(axes: list[Axis | None], prompt: str, negative_prompt: str) -> None:
    """Prompt S/R's first value must be in the prompt or the negative prompt (as in A1111)."""
    for axis, flag in zip(axes, AXIS_FLAGS, strict=True):
        if axis is not None and axis.option == PROMPT:
            search = axis.values[0]
            if search not in prompt and search not in negative_prompt:
                raise UserError(
                    f"{flag} prompt=...: {search!r} is not in the prompt or the negative prompt"
                )


def cell_options(cell: Cell, axes: list[Axis | None], base: dict) -> dict:
    """`base` (generate's options, `prompt` and `negative_prompt` included) with the cell's
    axis values set; Prompt S/R replaces last, in the prompt and the negative prompt."""
    options = dict(base)
    replacements = []
    for axis, index in cell.values(axes):
        if axis.option == PROMPT:
            replacements.append((axis.values[0], axis.values[index]))
        else:
            options[axis.option] = axis.values[index]
    for search, value in replacements:
        options["prompt"] = options["prompt"].replace(search, value)
        options["negative_prompt"] = options["negative_prompt"].replace(search, value)
    return options
