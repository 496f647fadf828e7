"""The value lists of an X/Y/Z axis, in AUTOMATIC1111's xyz_grid syntax.

Values are comma separated, read as CSV (so `"a, b",c` is two values) and stripped. For a
number axis one value may also stand for several:

    1-5        1, 2, 3, 4, 5            (ends included; 5-1 counts down)
    1-10 (+3)  1, 4, 7, 10              (a step; `10-1 (-3)`: 10, 7, 4, 1)
    1-10 [4]   1, 4, 7, 10              (a count, evenly spaced; whole numbers are truncated)
    0.5-1.5 (+0.25), 1-2 [3]            (the same on a decimal axis: 1, 1.5, 2)

A1111 counts up with step 1 even from 5-1 (giving nothing); here 5-1 counts down, since an
empty axis is never what was meant. No torch, no numpy: this runs before anything loads.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable

from ldm_cli.core.errors import UserError

_NUMBER = r"[+-]?\s*\d+(?:\.\d*)?|[+-]?\s*\.\d+"
_RANGE = re.compile(
    rf"\s*(?P<start>{_NUMBER})\s*-\s*(?P<end>{_NUMBER})"
    rf"(?:\s*\((?P<step>[+-]\s*(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\s*\[(?P<count>\d+)\s*\])?\s*"
)
MAX_VALUES = 1000  # per axis; a grid of more cells than this is a typo, not a plan


def split_values(text: str) -> list[str]:
    """The comma-separated values of `text`, CSV-quoted where they hold commas, stripped."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as error:
        raise UserError(f"cannot read the values {text!r}: {error}") from None
    return [value.strip() for row in rows for value in row]


def _number(text: str, whole: bool) -> int | float:
    text = re.sub(r"\s+", "", text)
    try:
        return int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{text!r} is not {kind}") from None


def _stepped(start, end, step, whole: bool) -> list:
    if step == 0:
        raise UserError("a range's step must not be 0")
    if (end - start) * step < 0:
        raise UserError(f"the step {step:+g} never gets from {start:g} to {end:g}")
    values = []
    k = 0
    # a little slack so that 0-1 (+0.1) ends at 1 despite float rounding
    slack = 0 if whole else abs(step) * 1e-9
    while True:
        value = start + k * step
        if (step > 0 and value > end + slack) or (step < 0 and value < end - slack):
            return values
        values.append(value if whole else round(value, 10))
        if len(values) > MAX_VALUES:
            raise UserError(f"a range gives more than {MAX_VALUES} values")
        k += 1


def _counted(start, end, count: int, whole: bool) -> list:
    if count < 1:
        raise UserError("a range's count must be at least 1")
    if count > MAX_VALUES:
        raise UserError(f"a range gives more than {MAX_VALUES} values")
    if count == 1:
        return [start]
    values = [start + (end - start) * k / (count - 1) for k in range(count)]
    return [int(v) for v in values] if whole else [round(v, 10) for v in values]


def expand_range(text: str, whole: bool) -> list | None:
    """The numbers a range `text` stands for, or None when it is not a range."""
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    start, end = _number(match["start"], whole), _number(match["end"], whole)
    if match["count"] is not None:
        return _counted(start, end, int(match["count"]), whole)
    step = 1 if end >= start else -1
    if match["step"] is not None:
        step = _number(match["step"], whole)
    return _stepped(start, end, step, whole)


def number_values(text: str, whole: bool) -> list:
    """The numbers of a number axis: plain values and ranges, in order."""
    values: list = []
    for item in split_values(text):
        expanded = expand_range(item, whole)
        values += [_number(item, whole)] if expanded is None else expanded
    return values


def parse_values(text: str, kind: type, convert: Callable | None = None) -> list:
    """The values of an axis of `kind` (int, float or str); `convert` checks and normalises
    each one (raising UserError)."""
    numbers = kind in (int, float)
    values = number_values(text, whole=kind is int) if numbers else split_values(text)
    if not values or (kind is str and any(v == "" for v in values)):
        raise UserError(f"no values in {text!r}" if not values else f"an empty value in {text!r}")
    if len(values) > MAX_VALUES:
        raise UserError(f"more than {MAX_VALUES} values in {text!r}")
    return [convert(v) for v in values] if convert is not None else values
