"""What a grid PNG says about how it was made.

Its `parameters` text is A1111's for a grid: the infotext of its first cell, with the axes
added to the last line (`X Type: Steps, X Values: "10,20,30", ...`, as A1111's X/Y/Z plot
writes them) and `Grid command`: the `ldm grid` command line that rebuilds the grid, seeds
drawn at random included, so `ldm generate --from-png GRID` renders its first cell again.
"""

from __future__ import annotations

import shlex

from ldm_cli.core.pngmeta import quote
from ldm_cli.grid.axes import AXIS_FLAGS, Axis


def rebuild_command(argv: list[str], drawn_seed: int | None, axes: list[Axis | None]) -> str:
    """The command line as given (`argv` after the program name) with what was drawn at
    random pinned: later options win, so `--seed N` and the drawn axes are appended."""
    words = ["ldm", *argv]
    if drawn_seed is not None:
        words += ["--seed", str(drawn_seed)]
    for axis, flag in zip(axes, AXIS_FLAGS, strict=True):
        if axis is not None and axis.drew_seeds:
            words += [flag, axis.spec]
    return shlex.join(words)


def axis_fields(axes: list[Axis | None], z_index: int | None) -> dict[str, str]:
    """A1111's `X Type` / `X Values` fields per axis, and which Z value this image shows."""
    fields = {}
    for axis, flag in zip(axes, AXIS_FLAGS, strict=True):
        if axis is None:
            continue
        name = flag.removeprefix("--").upper()
        fields[f"{name} Type"] = axis.kind.label
        fields[f"{name} Values"] = axis.spec.partition("=")[2]
        if name == "Z" and z_index is not None:
            fields["Z Value"] = axis.label(z_index)
    return fields


def grid_parameters(
    first_cell: str, axes: list[Axis | None], command: str, z_index: int | None = None
) -> str:
    """The grid PNG's parameters text: `first_cell`'s, its last line extended."""
    fields = {**axis_fields(axes, z_index), "Grid command": command}
    extra = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    return f"{first_cell}, {extra}"
