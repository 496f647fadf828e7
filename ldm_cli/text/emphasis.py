"""Emphasis: AUTOMATIC1111's ``(word)``, ``[word]``, ``(word:1.3)`` and ``BREAK``, in plain Python.

``parse_attention`` turns the text of one prompt at one step (editing and alternation already
resolved by :mod:`ldm_cli.text.grammar`) into runs of text with their weights, exactly as
A1111's ``parse_prompt_attention``:

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:w)``
  multiplies it by ``w``; nested brackets multiply (``((x))`` is 1.21, ``((x:1.5))`` 1.65);
* brackets left open are closed at the end of the prompt (``(x`` is ``x`` at 1.1); a closing
  bracket that closes nothing is text;
* ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the characters themselves; a backslash
  before anything else is dropped (``\\:`` is ``:``);
* the word ``BREAK`` (capitals, standing alone) becomes the run ``("BREAK", -1.0)``, which
  starts a new 75-token chunk;
* neighbouring runs of equal weight are merged.
"""

from __future__ import annotations

import math
import re

from ldm_cli.core.errors import UserError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)

_TOKEN = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|\\"  # a backslash before anything else (dropped)
    r"|[(\[]"
    r"|:\s*([+-]?[.\d]+)\s*\)"  # the end of "(text:weight)"
    r"|[)\]]"
    r"|[^\\()\[\]:]+"
    r"|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def is_break(run: tuple[str, float]) -> bool:
    return run[0] == BREAK[0] and run[1] == BREAK[1]


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``[(text, weight), ...]``; an empty prompt gives ``[("", 1.0)]``.

    >>> parse_attention("a (b:1.5) c")
    [('a ', 1.0), ('b', 1.5), (' c', 1.0)]
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    # A1111 closes what is left open in opening order, which fixes the float rounding
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)
    if not runs:
        return [("", 1.0)]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(run_text, weight) for run_text, weight in merged]


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"emphasis weight {text!r} in the prompt is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"emphasis weight {text!r} in the prompt is not a finite number")
    return value
