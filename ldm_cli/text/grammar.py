"""AUTOMATIC1111's prompt editing, alternation and AND composition, in plain Python.

A prompt is first split at the word ``AND`` into sub-prompts, each with an optional trailing
``:weight`` (``a cat AND a dog:0.5``); every sub-prompt steers the image on its own (see
:mod:`ldm_cli.pipeline.guidance`). Each sub-prompt is then resolved per sampling step:

* ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds
  ``to`` after ``when``; ``[from::when]`` removes ``from`` after ``when``. A ``when`` written
  with a decimal point is a fraction of the steps (``0.25``), one without is a step (``10``),
  as in A1111 since 1.6 (``old_scheduling=True``: below 1 a fraction, otherwise a step).
* ``[a|b|c]`` takes ``a``, ``b``, ``c``, ``a``, ... one per step (``[fe|]male`` alternates
  ``female`` and ``male``).

The result is A1111's ``get_learned_conditioning_prompt_schedules``: a list of
``(end_at_step, text)`` in which the text still holds its emphasis brackets, read by
:mod:`ldm_cli.text.emphasis`. A1111 parses with an Earley parser over a small grammar in
which brackets that do not form editing, alternation or emphasis are literal text at the top
level; this is a recursive-descent parser for the same language and the same choices. A prompt
that does not parse (a ``|`` outside ``[...]``, a trailing backslash) is used verbatim at every
step, as A1111 does.

Where A1111's grammar is ambiguous (a group directly followed by two or more stray brackets or
colons, as in ``[a:2]]]``) its Earley parser's choice comes down to tie-breaking, and it
sometimes reads the group as literal text; here such a group always counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ldm_cli.core.errors import UserError
from ldm_cli.text.emphasis import parse_attention

_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*", re.S)
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
_WHEN_AND_CLOSE = re.compile(rf"\s*({_NUMBER})\s*\]")
_PLAIN = re.compile(r"[^\\\[\]():|]+")
_TOP_LEVEL_LITERALS = "[]():"
# deeper nesting is taken as unparseable (verbatim prompt) instead of exhausting the stack
MAX_DEPTH = 100


@dataclass
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    when_text: str


@dataclass
class _Alternate:
    options: list[list]


Node = str | _Edit | _Alternate


@dataclass(frozen=True)
class SubPrompt:
    """One AND sub-prompt: its weight and, per schedule entry, the steps up to which it
    applies and its (text, emphasis weight) runs."""

    text: str
    weight: float
    schedule: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]


class _NoParse(Exception):
    pass


class _TooDeep(_NoParse):
    """Raised through every level: the whole prompt is then used verbatim."""


def parse_prompt(prompt: str, steps: int, *, old_scheduling: bool = False) -> list[SubPrompt]:
    """The whole grammar: AND sub-prompts, each scheduled over `steps` and parsed for emphasis.

    >>> parse_prompt("a [cat:dog:0.5] (photo:1.2)", 4)[0].schedule
    ((2, (('a cat ', 1.0), ('photo', 1.2))), (4, (('a dog ', 1.0), ('photo', 1.2))))
    """
    return [
        SubPrompt(
            text,
            weight,
            tuple(
                (end, tuple(parse_attention(resolved)))
                for end, resolved in prompt_schedule(text, steps, old_scheduling=old_scheduling)
            ),
        )
        for text, weight in split_and(prompt)
    ]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts at each word ``AND``, with their ``:weight`` (1 when absent).

    Like A1111 this also applies to a prompt without ``AND``: ``a cat:1.5`` is ``a cat``
    weighted 1.5, and trailing whitespace is dropped (it never changes the tokens).
    """
    parts = []
    for sub in _AND.split(prompt):
        text, weight = _TRAILING_WEIGHT.fullmatch(sub).groups()
        value = 1.0 if weight is None else float(weight)
        if value != value or value in (float("inf"), float("-inf")):
            raise UserError(f"the AND weight {weight!r} in the prompt is not a finite number")
        parts.append((text, value))
    return parts


def prompt_schedule(
    prompt: str, steps: int, *, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]``: `text` applies to the steps up to `end_at_step`.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    try:
        nodes = _Parser(prompt).top_level()
    except _NoParse:
        return [(steps, prompt)]
    whens: dict[int, int] = {}
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            when = _step_of(node.when_text, steps, old_scheduling)
            whens[id(node)] = when
            if when >= 1:
                ends.add(when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(nodes, end, whens)) for end in sorted(ends)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The schedule's text at sampler step `step` (0-based), looked up as A1111 does: the
    first entry whose end is at or after the step (so step `end` still uses that entry)."""
    return schedule[entry_index(tuple(end for end, _ in schedule), step)][1]


def entry_index(ends: tuple[int, ...], step: int) -> int:
    for index, end in enumerate(ends):
        if step <= end:
            return index
    return 0  # past the last entry A1111 falls back to the first


def _step_of(when_text: str, steps: int, old_scheduling: bool) -> int:
    value = float(when_text)
    if old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in when_text:
        value *= steps
    if value >= steps:
        return steps
    # below 1 (or -inf) every step is after `when`: A1111's int() of it is <= 0 and unused
    return int(value) if value >= 1 else 0


def _walk(nodes: list):
    for node in nodes:
        yield node
        if isinstance(node, _Edit):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int, whens: dict[int, int]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            chosen = node.before if step <= whens[id(node)] else node.after
            out.append(_render(chosen or [], step, whens))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(out)


class _Parser:
    """Top level: text, literal ``[ ] ( ) :``, and bracket groups that parse; inside a group
    every bracket must form emphasis ``(x)``, ``(x:y)``, ``[x]``, editing or alternation."""

    def __init__(self, text: str):
        self.text = text
        self.groups: dict[int, tuple[list, int] | None] = {}  # start -> (nodes, end) or None

    def top_level(self) -> list:
        text, nodes, pos = self.text, [], 0
        while pos < len(text):
            char = text[pos]
            if char in "[(":
                group = self._group_or_none(pos, 0)
                if group is not None:
                    nodes += group[0]
                    pos = group[1]
                    continue
            if char in _TOP_LEVEL_LITERALS:
                nodes.append(char)
                pos += 1
            else:
                pos = self._plain(nodes, pos)
        return nodes

    def _plain(self, nodes: list, pos: int) -> int:
        """Text up to the next special character; raises at ``|`` and a dangling backslash."""
        text = self.text
        start = pos
        while pos < len(text):
            match = _PLAIN.match(text, pos)
            if match:
                pos = match.end()
            elif text[pos] == "\\":
                if pos + 1 >= len(text) or text[pos + 1] == "\n":
                    raise _NoParse
                pos += 2
            else:
                break
        if pos == start:  # only "|" is left over: it belongs to no group here
            raise _NoParse
        nodes.append(text[start:pos])
        return pos

    def _prompt(self, pos: int, depth: int) -> tuple[list, int]:
        """A group's content up to (not including) its next ``] ) : |``."""
        text, nodes = self.text, []
        while pos < len(text) and text[pos] not in "]):|":
            if text[pos] in "[(":
                group = self._group_or_none(pos, depth + 1)
                if group is None:
                    raise _NoParse
                nodes += group[0]
                pos = group[1]
            else:
                pos = self._plain(nodes, pos)
        return nodes, pos

    def _group_or_none(self, pos: int, depth: int) -> tuple[list, int] | None:
        if pos not in self.groups:
            try:
                self.groups[pos] = self._group(pos, depth)
            except _TooDeep:
                raise
            except _NoParse:
                self.groups[pos] = None
        return self.groups[pos]

    def _group(self, pos: int, depth: int) -> tuple[list, int]:
        if depth > MAX_DEPTH:
            raise _TooDeep
        text = self.text
        first, end = self._prompt(pos + 1, depth)
        close = text[end] if end < len(text) else ""
        if text[pos] == "(":
            if close == ")":
                return ["(", *first, ")"], end + 1
            if close == ":":
                second, end = self._prompt(end + 1, depth)
                if end < len(text) and text[end] == ")":
                    return ["(", *first, ":", *second, ")"], end + 1
            raise _NoParse
        if close == "]":
            return ["[", *first, "]"], end + 1
        if close == "|":
            options = [first]
            while end < len(text) and text[end] == "|":
                option, end = self._prompt(end + 1, depth)
                options.append(option)
            if end < len(text) and text[end] == "]":
                return [_Alternate(options)], end + 1
            raise _NoParse
        if close == ":":
            when = _WHEN_AND_CLOSE.match(text, end + 1)
            if when:
                return [_Edit(None, first, when.group(1))], when.end()
            second, end = self._prompt(end + 1, depth)
            when = _WHEN_AND_CLOSE.match(text, end + 1) if text[end : end + 1] == ":" else None
            if when:
                return [_Edit(first, second, when.group(1))], when.end()
        raise _NoParse
