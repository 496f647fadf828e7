"""AUTOMATIC1111's `parameters` text ("infotext"): build it, parse it, store it in a PNG.

The text looks like::

    a photo of a cat
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512

Schedule type: we always write the label of our schedule, "Normal" included. A1111 1.9+ reads
a missing "Schedule type" as "Automatic", which for DPM++ samplers means Karras/Exponential,
so leaving it out would change the schedule there. "Normal" is A1111 1.10+'s label for the
same uniform-in-timestep spacing (1.9 does not know it and falls back to Automatic). When
reading, a missing "Schedule type" means "normal": A1111 only leaves it out when it used the
model's own uniform spacing. "Uniform" reads as "normal" too, and "Automatic" as the schedule
A1111 1.9+ picks for that sampler.

A1111 strips every prompt line and drops leading blank lines when it parses, so
GenerationParams stores prompts in that form; a prompt line starting with "Negative prompt:"
cannot be carried and is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import IO

from PIL import Image, PngImagePlugin

from ldm_cli.core.errors import UserError

# our name -> A1111 display name
SAMPLER_LABELS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "lms": "LMS",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",
}

SCHEDULER_LABELS: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "simple": "Simple",
    "sgm_uniform": "SGM Uniform",
    # diffusers' "leading" timesteps k * (1000 // steps) + 1 = A1111 1.10's "DDIM" schedule
    "leading": "DDIM",
    # not A1111 schedule types: diffusers' timestep_spacing="trailing", LCMScheduler's timesteps
    "trailing": "Trailing",
    "lcm": "LCM",
}

# A1111's old "k_..." sampler aliases, still accepted by its API and prompts-from-file
_SAMPLER_ALIASES = {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_lms": "lms",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_sde": "dpmpp_sde",
}

# what A1111 1.9+ uses when the schedule type is "Automatic"
_AUTOMATIC_SCHEDULER = {
    "dpmpp_2m": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2m_sde": "exponential",
    "lcm": "lcm",  # ours: LCMScheduler's own timesteps
    "tcd": "lcm",
}

_SAMPLER_LOOKUP = {
    **{label.lower(): name for name, label in SAMPLER_LABELS.items()},
    **{name: name for name in SAMPLER_LABELS},
    **_SAMPLER_ALIASES,
}
_SCHEDULER_LOOKUP = {
    **{label.lower(): name for name, label in SCHEDULER_LABELS.items()},
    **{name: name for name in SCHEDULER_LABELS},
    "uniform": "normal",
    "sgmuniform": "sgm_uniform",
}
# longest first, so "X SGM Uniform" is not read as "X SGM" + "Uniform"
_SCHEDULER_SUFFIXES = sorted(
    [*(label.lower() for label in SCHEDULER_LABELS.values()), "uniform", "automatic"],
    key=len,
    reverse=True,
)

# A1111's regex for one "key: value" pair of the last line
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY_RE = re.compile(r"\w[\w \-/]+")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"
_REQUIRED_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
RESERVED_KEYS = frozenset(
    {*_REQUIRED_KEYS, "Schedule type", "Model hash", "Model", "Prompt", "Negative prompt"}
)


def sampler_id(name: str) -> str:
    """Our sampler name for one of ours, an A1111 display name or a k_ alias (any case)."""
    found = _SAMPLER_LOOKUP.get(name.strip().lower())
    if found is None:
        known = ", ".join(SAMPLER_LABELS.values())
        raise UserError(f"unknown sampler {name!r} (known: {known})")
    return found


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """Sampler and schedule from pre-1.9 A1111 names such as "DPM++ 2M Karras".

    The schedule is None when the name carries none; "Automatic" comes back as "automatic".
    """
    key = name.strip().lower()
    if key in _SAMPLER_LOOKUP:
        return _SAMPLER_LOOKUP[key], None
    for suffix in _SCHEDULER_SUFFIXES:
        base = key.removesuffix(" " + suffix)
        if base != key and base in _SAMPLER_LOOKUP:
            return _SAMPLER_LOOKUP[base], _SCHEDULER_LOOKUP.get(suffix, suffix)
    return sampler_id(name), None


def scheduler_id(name: str, sampler: str | None = None) -> str:
    """Our schedule name for ours or an A1111 label; "Automatic" needs the sampler."""
    key = name.strip().lower()
    if key == "automatic":
        if sampler is None:
            raise UserError("schedule type 'Automatic' needs a sampler to pick the schedule")
        return _AUTOMATIC_SCHEDULER.get(sampler, "normal")
    found = _SCHEDULER_LOOKUP.get(key)
    if found is None:
        known = ", ".join(SCHEDULER_LABELS.values())
        raise UserError(f"unknown schedule type {name!r} (known: {known})")
    return found


def _canonical_prompt(text: str, what: str, first_line_free: bool) -> str:
    """The prompt as A1111's parser gives it back: lines stripped, no leading blank lines."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be text, not {type(text).__name__}")
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    for number, line in enumerate(lines, start=1):
        if line.startswith(_NEGATIVE_PREFIX) and not (first_line_free and number == 1):
            raise UserError(
                f"{what} line {number} starts with {_NEGATIVE_PREFIX!r}, "
                "which the parameters text cannot carry"
            )
    return "\n".join(lines)


def _checked_int(value: object, what: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{what} must be a whole number, not {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{what} must be at least {minimum}, not {value}")
    return value


def _optional_text(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UserError(f"{what} must be text, not {type(value).__name__}")
    return value


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """Everything the parameters text records about one image."""

    prompt: str
    negative_prompt: str = ""
    steps: int
    sampler: str
    scheduler: str = "normal"
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str | None = None
    model_name: str | None = None
    # other A1111 keys ("Clip skip", "Denoising strength", "Version", ...), in writing order
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("prompt", _canonical_prompt(self.prompt, "prompt", first_line_free=False))
        put(
            "negative_prompt",
            _canonical_prompt(self.negative_prompt, "negative prompt", first_line_free=True),
        )
        _checked_int(self.steps, "steps", minimum=1)
        _checked_int(self.seed, "seed")
        _checked_int(self.width, "width", minimum=1)
        _checked_int(self.height, "height", minimum=1)
        if self.sampler not in SAMPLER_LABELS:
            raise UserError(f"unknown sampler {self.sampler!r}")
        if self.scheduler not in SCHEDULER_LABELS:
            raise UserError(f"unknown scheduler {self.scheduler!r}")
        cfg = self.cfg_scale
        if isinstance(cfg, bool) or not isinstance(cfg, int | float) or not math.isfinite(cfg):
            raise UserError(f"cfg scale must be a finite number, not {cfg!r}")
        put("cfg_scale", float(cfg))
        put("model_hash", _optional_text(self.model_hash, "model hash"))
        put("model_name", _optional_text(self.model_name, "model name"))
        extra = dict(self.extra)
        for key, value in extra.items():
            if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or key in RESERVED_KEYS:
                raise UserError(f"parameters key {key!r} cannot be stored")
            if not isinstance(value, str):
                raise UserError(f"parameters value for {key!r} must be text, not {value!r}")
        put("extra", extra)


def quote(value: str) -> str:
    """A1111's quote(), also quoting what its parser would otherwise bend (quotes, edge spaces)."""
    plain = value and value == value.strip() and not any(char in value for char in ',:"\n')
    return value if plain else json.dumps(value, ensure_ascii=False)


def unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        loaded = json.loads(value)
    except ValueError:
        return value
    return loaded if isinstance(loaded, str) else value


def format_number(value: float) -> str:
    text = repr(float(value))
    return text.removesuffix(".0")


def format_parameters(params: GenerationParams) -> str:
    """The A1111 parameters text for `params`."""
    fields = {
        "Steps": str(params.steps),
        "Sampler": SAMPLER_LABELS[params.sampler],
        "Schedule type": SCHEDULER_LABELS[params.scheduler],
        "CFG scale": format_number(params.cfg_scale),
        "Seed": str(params.seed),
        "Size": f"{params.width}x{params.height}",
    }
    if params.model_hash:
        fields["Model hash"] = params.model_hash
    if params.model_name:
        fields["Model"] = params.model_name
    fields.update(params.extra)
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    negative = f"\n{_NEGATIVE_PREFIX} {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{line}".strip()


def _parse_int(values: dict[str, str], key: str) -> int:
    text = values.pop(key)
    try:
        return int(text)
    except ValueError:
        raise UserError(f"bad {key} value {text!r} in the parameters text") from None


def parse_parameters(text: str) -> GenerationParams:
    """Parse an A1111 parameters text the way A1111 does."""
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM_RE.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt, negative, in_negative = "", "", False
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    values: dict[str, str] = {}
    for key, value in _PARAM_RE.findall(last_line):
        values[key] = unquote(value)
    for key in _REQUIRED_KEYS:
        if key not in values:
            raise UserError(f"the parameters text has no {key!r} field")
    prompt = values.pop("Prompt", prompt)
    negative = values.pop("Negative prompt", negative)

    sampler, scheduler = split_sampler_name(values.pop("Sampler"))
    schedule_type = values.pop("Schedule type", None)
    if scheduler is None:  # as in A1111, a schedule in the sampler's name wins
        scheduler = "normal" if schedule_type is None else schedule_type
    scheduler = scheduler_id(scheduler, sampler)

    size = values.pop("Size")
    size_match = _SIZE_RE.match(size)
    if size_match is None:
        raise UserError(f"bad Size value {size!r} in the parameters text")
    cfg_text = values.pop("CFG scale")
    try:
        cfg_scale = float(cfg_text)
    except ValueError:
        raise UserError(f"bad CFG scale value {cfg_text!r} in the parameters text") from None

    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative,
        steps=_parse_int(values, "Steps"),
        sampler=sampler,
        scheduler=scheduler,
        cfg_scale=cfg_scale,
        seed=_parse_int(values, "Seed"),
        width=int(size_match.group(1)),
        height=int(size_match.group(2)),
        model_hash=values.pop("Model hash", None),
        model_name=values.pop("Model", None),
        extra=values,
    )


def write_png(
    image: Image.Image, target: str | os.PathLike[str] | IO[bytes], parameters: str
) -> None:
    """Save `image` as PNG with a `parameters` chunk: tEXt, or iTXt when not latin-1 (as A1111)."""
    info = PngImagePlugin.PngInfo()
    try:
        parameters.encode("latin-1")
    except UnicodeEncodeError:
        info.add_itxt("parameters", parameters)
    else:
        info.add_text("parameters", parameters)
    try:
        image.save(target, format="PNG", pnginfo=info)
    except OSError as error:
        name = getattr(target, "name", target)
        raise UserError(f"cannot write PNG {name}: {error.strerror or error}") from None


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    """The `parameters` text stored in an image, or None when it has none."""
    try:
        with Image.open(path) as image:
            image.load()  # text chunks written after the pixel data only show up after load()
            value = image.info.get("parameters")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"cannot read image {os.fspath(path)}: {reason}") from None
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def params_from_png(path: str | os.PathLike[str]) -> GenerationParams:
    """The generation parameters stored in an image written by us or by A1111."""
    text = read_parameters(path)
    if text is None:
        raise UserError(f"{os.fspath(path)} has no generation parameters")
    return parse_parameters(text)
