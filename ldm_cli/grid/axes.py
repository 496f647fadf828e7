"""The options an X/Y/Z axis can vary, and `NAME=VALUES` read into an `Axis`.

Each axis sets one `ldm generate` option (its parameter name in ldm_cli.cli.generate) in every
cell of its row, column or grid. Names are the option's (`steps`, `cfg`, `hires-strength`, any
case, `-` or `_`) or A1111's axis labels (`CFG Scale`, `Prompt S/R`, `Denoising`, ...).
`prompt` is A1111's "Prompt S/R": the first value is searched in the prompt (and negative
prompt) and each value replaces it in turn, so the first cell keeps the prompt as it is.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import check_seed, check_side, check_steps, random_seed
from ldm_cli.core.pngmeta import SAMPLER_LABELS, format_number, sampler_id, scheduler_id
from ldm_cli.grid.values import parse_values, split_values

PROMPT = "prompt"  # the option of the Prompt S/R axis
AXIS_FLAGS = ("--x", "--y", "--z")


@dataclass(frozen=True)
class AxisKind:
    """An option an axis can vary: its generate parameter, value type, label and checks."""

    option: str
    kind: type
    label: str
    convert: Callable | None = None
    aliases: tuple[str, ...] = ()


def _whole_at_least(low: int, name: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
        return value

    return check


def _steps(name: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        check_steps(value, name)
        return value

    return check


def _side(name: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        check_side(value, name)
        return value

    return check


def _seed(value: int) -> int:
    if value == -1:  # A1111: a random seed, drawn once for the whole grid
        return random_seed()
    check_seed(value, name="seed")
    return value


def _schedule(value: str) -> str:
    key = value.strip().lower()
    if key in ("auto", "automatic"):
        return "auto"
    return scheduler_id(key)


def _fraction(name: str, low: float = 0.0, high: float = 1.0) -> Callable[[float], float]:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise UserError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
        return value

    return check


def _positive(name: str) -> Callable[[float], float]:
    def check(value: float) -> float:
        if value <= 0:
            raise UserError(f"{name} must be above 0, got {value:g}")
        return value

    return check


AXES: tuple[AxisKind, ...] = (
    AxisKind(PROMPT, str, "Prompt S/R", aliases=("prompt s/r", "prompt_sr", "sr")),
    AxisKind("seed", int, "Seed", _seed),
    AxisKind("steps", int, "Steps", _steps("steps")),
    AxisKind("cfg", float, "CFG scale", _positive("cfg"), ("cfg scale", "cfg_scale")),
    AxisKind("sampler", str, "Sampler", sampler_id, ("sampler_name",)),
    AxisKind("scheduler", str, "Schedule type", _schedule, ("schedule type", "schedule")),
    AxisKind("width", int, "Width", _side("width")),
    AxisKind("height", int, "Height", _side("height")),
    AxisKind("negative_prompt", str, "Negative prompt", aliases=("negative",)),
    AxisKind("eta", float, "Eta", _fraction("eta")),
    AxisKind("rescale_cfg", float, "CFG rescale", _fraction("rescale_cfg")),
    AxisKind("guidance", float, "Guidance", _positive("guidance"), ("distilled cfg",)),
    AxisKind("clip_skip", int, "Clip skip", _whole_at_least(1, "clip_skip")),
    AxisKind("hires_scale", float, "Hires upscale", None, ("hires upscale", "hr_scale")),
    AxisKind("hires_strength", float, "Denoising", None, ("denoising", "denoising_strength")),
    AxisKind("hires_steps", int, "Hires steps", _steps("hires_steps"), ("hr_steps",)),
    AxisKind("hires_upscaler", str, "Hires upscaler", None, ("hr_upscaler",)),
    AxisKind("deep_cache", int, "Deep cache", _whole_at_least(0, "deep_cache")),
    AxisKind("token_merging", float, "Token merging ratio", None, ("token merging ratio", "tome")),
    AxisKind("refiner_switch", float, "Refiner switch at", None, ("refiner switch at",)),
)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("-", "_").split())


_BY_NAME: dict[str, AxisKind] = {}
for _axis in AXES:
    for _name in (_axis.option, _axis.label, *_axis.aliases):
        _BY_NAME[_key(_name)] = _axis
        _BY_NAME[_key(_name).replace(" ", "_")] = _axis


def axis_kind(name: str) -> AxisKind:
    """The axis an option name or A1111 label stands for (a UserError naming them if none)."""
    found = _BY_NAME.get(_key(name))
    if found is None:
        names = ", ".join(a.option.replace("_", "-") for a in AXES)
        raise UserError(f"unknown axis {name!r}; axes: {names}")
    return found


@dataclass(frozen=True)
class Axis:
    """One axis: the option it sets and its values in order, with their labels."""

    kind: AxisKind
    values: tuple
    spec: str  # `NAME=VALUES` with every value spelled out (random seeds as drawn)
    drew_seeds: bool = False  # a -1 seed was drawn: `spec`, not the command, rebuilds it

    @property
    def option(self) -> str:
        return self.kind.option

    def label(self, index: int) -> str:
        value = self.values[index]
        if self.option in (PROMPT, "sampler"):  # A1111 shows these bare
            return SAMPLER_LABELS.get(value, value) if self.option == "sampler" else value
        shown = format_number(value) if isinstance(value, float) else str(value)
        return f"{self.kind.label}: {shown}"


def _spelled(values) -> str:
    """Values as one CSV line that `split_values` reads back."""
    out = io.StringIO()
    shown = [format_number(v) if isinstance(v, float) else str(v) for v in values]
    csv.writer(out, lineterminator="").writerow(shown)
    return out.getvalue()


def parse_axis(spec: str, flag: str = "--x") -> Axis:
    """`NAME=VALUES` as an Axis; a one-line UserError naming `flag` when it is not one."""
    name, equals, text = spec.partition("=")
    if not equals or not name.strip():
        raise UserError(f"{flag} {spec!r}: write NAME=VALUES, e.g. {flag} steps=10,20,30")
    try:
        kind = axis_kind(name)
        if kind.option == PROMPT:
            values = split_values(text)
            if not values or values[0] == "":
                raise UserError("Prompt S/R needs the text to search for as its first value")
        else:
            raw = parse_values(text, kind.kind)
            values = [kind.convert(v) for v in raw] if kind.convert is not None else raw
    except UserError as error:
        raise UserError(f"{flag} {spec!r}: {error}") from None
    drew = kind.option == "seed" and -1 in raw
    return Axis(kind, tuple(values), f"{kind.option}={_spelled(values)}", drew)


def check_axes(axes: list[Axis | None]) -> None:
    """Two axes over one option would leave one of them without effect."""
    seen: dict[str, str] = {}
    for axis, flag in zip(axes, AXIS_FLAGS, strict=True):
        if axis is None:
            continue
        if axis.option in seen:
            raise UserError(
                f"{seen[axis.option]} and {flag} both vary {axis.option.replace('_', '-')}; "
                "give each option one axis"
            )
        seen[axis.option] = flag
