"""`--prompts-file FILE`: one prompt per line, or per-line options in A1111's style.

    # comment lines and blank lines are skipped
    a photo of a cat
    --prompt "a dog" --negative_prompt "blurry" --steps 20 --seed 5 --sampler_name "Euler a"

Option lines are split with shlex and read like A1111's "Prompts from file or textbox" script:
the words after --prompt / --negative_prompt up to the next --option make up the prompt.
Overrides come back under our option names: negative_prompt, seed, steps, cfg, guidance
(FLUX dev's; also read as Forge's distilled_cfg_scale), sampler, scheduler (ours, or "auto"
for A1111's Automatic), width, height, batch_size, num_images (= batch_size * n_iter). A run
uses one model: --model / --sd_model lines are refused.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import scheduler_id, split_sampler_name


@dataclass(frozen=True)
class PromptJob:
    """One prompt from the file and the options its line sets (our option names)."""

    prompt: str
    overrides: dict[str, object] = field(default_factory=dict)
    line: int = 0  # 1-based line in the file, for messages


def _whole_number(minimum: int | None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"{value} is below {minimum}")
        return value

    return convert


def _finite_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _text(text: str) -> str:
    return text


# option as written in the file (A1111's names, dashes read as underscores) -> (key, converter);
# sampler_name and scheduler are kept as text here and resolved once the whole line is read
_OPTIONS: dict[str, tuple[str, Callable[[str], object]]] = {
    "seed": ("seed", _whole_number(-1)),
    "steps": ("steps", _whole_number(1)),
    "cfg_scale": ("cfg", _finite_number),
    "cfg": ("cfg", _finite_number),
    # FLUX dev's distilled guidance: ours, and Forge's name for it
    "guidance": ("guidance", _finite_number),
    "distilled_cfg_scale": ("guidance", _finite_number),
    "sampler_name": ("sampler", _text),
    "sampler": ("sampler", _text),
    "scheduler": ("scheduler", _text),
    "width": ("width", _whole_number(1)),
    "height": ("height", _whole_number(1)),
    "batch_size": ("batch_size", _whole_number(1)),
    "n_iter": ("n_iter", _whole_number(1)),
    "num_images": ("num_images", _whole_number(1)),
}
_PROMPT_OPTIONS = {"prompt": "prompt", "negative_prompt": "negative_prompt"}
# A1111 options that have no counterpart here: named as unsupported rather than unknown
_UNSUPPORTED = {
    "outpath_samples",
    "outpath_grids",
    "prompt_for_display",
    "styles",
    "subseed",
    "subseed_strength",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "sampler_index",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
}


def _parse_option_line(line: str) -> dict[str, object]:
    """The options of one `--...` line; ValueError/UserError carry the problem."""
    words = shlex.split(line)
    found: dict[str, object] = {}
    position = 0
    while position < len(words):
        word = words[position]
        if not word.startswith("--"):
            raise ValueError(f"expected an option starting with '--', got {word!r}")
        name = word[2:].replace("-", "_")
        has_value = position + 1 < len(words) and not words[position + 1].startswith("--")
        if name in _PROMPT_OPTIONS:
            if not has_value:
                raise ValueError(f"option {word} needs a value")
            # as in A1111, the words up to the next option make up the prompt
            end = position + 2
            while end < len(words) and not words[end].startswith("--"):
                end += 1
            found[_PROMPT_OPTIONS[name]] = " ".join(words[position + 1 : end])
            position = end
            continue
        if name in _UNSUPPORTED:
            raise ValueError(f"option {word} is not supported")
        if name in ("model", "sd_model"):
            raise ValueError(f"{word} is not supported here: a run uses one model (--model)")
        if name not in _OPTIONS:
            raise ValueError(f"unknown option {word}")
        if not has_value:
            raise ValueError(f"option {word} needs a value")
        key, convert = _OPTIONS[name]
        try:
            found[key] = convert(words[position + 1])
        except ValueError as error:
            raise ValueError(f"bad value for {word}: {error}") from None
        position += 2
    return found


def _resolve_names(options: dict[str, object]) -> None:
    """Sampler/scheduler names (A1111 display names or ours) to ours, in place.

    A1111's "Automatic" schedule becomes our "auto": the sampler's usual schedule.
    """
    scheduler_from_sampler = None
    if "sampler" in options:
        options["sampler"], scheduler_from_sampler = split_sampler_name(str(options["sampler"]))
    scheduler = options.get("scheduler", scheduler_from_sampler)
    if scheduler is None:
        return
    scheduler = str(scheduler)
    if scheduler.strip().lower() in ("auto", "automatic"):
        options["scheduler"] = "auto"
    else:
        options["scheduler"] = scheduler_id(scheduler)


def _overrides_from(options: dict[str, object]) -> dict[str, object]:
    if options.get("seed") == -1:  # A1111's "random": the run's seed (random if not given)
        del options["seed"]
    batch_size = options.pop("batch_size", None)
    batches = options.pop("n_iter", None)
    if batch_size is not None:
        options["batch_size"] = batch_size
    if "num_images" not in options and (batch_size is not None or batches is not None):
        options["num_images"] = int(batch_size or 1) * int(batches or 1)
    return options


def parse_prompts(
    text: str, source: str | os.PathLike[str], default_prompt: str | None = None
) -> list[PromptJob]:
    """Prompt jobs from the file's text; `default_prompt` serves option lines without --prompt."""
    source = os.fspath(source)
    jobs = []
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            jobs.append(PromptJob(prompt=line, line=number))
            continue
        try:
            options = _parse_option_line(line)
            _resolve_names(options)
        except (ValueError, UserError) as error:
            problem = str(error)
            if problem.startswith(("No closing quotation", "No escaped character")):
                problem = f"unterminated quote ({problem[0].lower()}{problem[1:]})"
            raise UserError(f"{source}:{number}: {problem}") from None
        prompt = options.pop("prompt", default_prompt)
        if prompt is None:
            raise UserError(
                f"{source}:{number}: no --prompt on this line and no prompt on the command line"
            )
        jobs.append(PromptJob(prompt=str(prompt), overrides=_overrides_from(options), line=number))
    if not jobs:
        raise UserError(f"prompts file {source} has no prompts")
    return jobs


def decode_prompts(data: bytes, source: str | os.PathLike[str]) -> str:
    """The file's bytes as text: UTF-8 with or without a BOM."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        byte = error.object[error.start]
        raise UserError(
            f"{os.fspath(source)}:{line}: not valid UTF-8 (byte 0x{byte:02x})"
        ) from None


def read_prompts_file(
    path: str | os.PathLike[str], default_prompt: str | None = None
) -> list[PromptJob]:
    """The prompt jobs of a `--prompts-file`."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"cannot read prompts file {os.fspath(path)}: {reason}") from None
    return parse_prompts(decode_prompts(data, path), path, default_prompt)
