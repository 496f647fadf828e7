"""LoRA tags of a prompt (``<lora:NAME:WEIGHT>``, AUTOMATIC1111's syntax) and ``--lora``
options: which LoRAs a prompt asks for, with which multipliers (see
:mod:`ldm_cli.networks.lora`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ldm_cli.core.errors import UserError

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
# AUTOMATIC1111's extra-network tag: <type:arg:arg...>
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:te:unet>`` of a prompt (or one ``--lora``): name and multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    path: Path | None = None  # given by --lora; tags are looked up in the LoRA folder


def parse_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<...>`` tags, and its LoRA tags in order.

    >>> parse_tags("a cat <lora:ink:0.8>, sketch")
    ('a cat , sketch', [LoraTag(name='ink', te=0.8, unet=0.8, path=None)])
    """
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in _LORA_TYPES:
            raise UserError(
                f"unsupported extra network <{kind}:...> in the prompt; only <lora:NAME:WEIGHT> "
                "is supported"
            )
        tags.append(_tag(args, match.group(0)))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), tags


def strip_tags(prompt: str) -> str:
    return parse_tags(prompt)[0]


def _tag(args: str, text: str) -> LoraTag:
    positional, named = [], {}
    for arg in args.split(":"):
        key, sep, value = arg.partition("=")
        if sep and key.strip() in ("te", "unet", "dyn"):
            named[key.strip()] = value
        else:
            positional.append(arg)
    name = positional[0].strip() if positional else ""
    if not name:
        raise UserError(f"{text} in the prompt names no LoRA")
    te = _number(positional[1], text) if len(positional) > 1 else 1.0
    te = _number(named["te"], text) if "te" in named else te
    unet = _number(positional[2], text) if len(positional) > 2 else te
    unet = _number(named["unet"], text) if "unet" in named else unet
    return LoraTag(name, te, unet)


def finite_weight(value, where: str) -> float:
    """A LoRA multiplier given as a number (the Python API): a finite float or a UserError."""
    if isinstance(value, (str, bool)):
        return _number(str(value), where)
    try:
        return _number(str(float(value)), where)
    except (TypeError, ValueError):
        raise UserError(f"LoRA weight {value!r} in {where} is not a number") from None


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"LoRA weight {text.strip()!r} in {where} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"LoRA weight {text.strip()!r} in {where} is not a finite number")
    return value


def parse_lora_option(text: str) -> LoraTag:
    """``--lora PATH[:WEIGHT]``: a file (or a name in the LoRA folder) and its weight."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not is_file_like(weight):  # PATH:WEIGHT (a weight that is no number:
        value = _number(weight, f"--lora {text}")  # an error, not a file name with a colon)
    else:
        path, value = text, 1.0
    return LoraTag(Path(path).stem if is_file_like(path) else path, value, value, Path(path))


def is_file_like(text: str) -> bool:
    return os.sep in text or "/" in text or text.lower().endswith(LORA_EXTENSIONS)
