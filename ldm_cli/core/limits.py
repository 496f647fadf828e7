"""The ranges of the numbers a run takes (seed, steps, size, image count), checked before
anything loads so that a value no run can use is a one-line error, not an overflow deep in
torch or a machine out of memory. torch is not imported here."""

from __future__ import annotations

import secrets

from ldm_cli.core.errors import UserError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
MAX_STEPS = 10_000
MAX_SIDE = 16_384  # pixels; a 16384x16384 SD 1.5 latent is already 2048x2048
MAX_IMAGES = 100_000  # per run; every image's request is planned up front


def check_seed(seed: int, count: int = 1, name: str = "--seed") -> None:
    """Seeds seed .. seed + count - 1 must fit torch's 64-bit generator seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{name} must be a whole number, got {seed!r}")
    if seed < 0 or seed + count - 1 > MAX_SEED:
        extra = f" (with {count} images: at most {MAX_SEED - count + 1})" if count > 1 else ""
        raise UserError(f"{name} must be between 0 and 2**64-1{extra}, got {seed}")


def check_steps(steps: int, name: str = "--steps") -> None:
    _check_whole(steps, name, 1, MAX_STEPS)


def check_side(value: int | None, name: str) -> None:
    """A width or height in pixels, when given."""
    if value is not None:
        _check_whole(value, name, 1, MAX_SIDE, "pixels")


def check_count(value: int, name: str, limit: int = MAX_IMAGES) -> None:
    _check_whole(value, name, 1, limit)


def _check_whole(value: int, name: str, low: int, high: int, unit: str = "") -> None:
    """A whole number (not a bool) from `low` to `high`, else a UserError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        of_unit = f" of {unit}" if unit else ""
        raise UserError(f"{name} must be a whole number{of_unit}, got {value!r}")
    if not low <= value <= high:
        units = f" {unit}" if unit else ""
        raise UserError(f"{name} must be between {low} and {high}{units}, got {value}")


def seed_option(value: int | None) -> int | None:
    """typer callback of --seed: -1 asks for a random seed, as in AUTOMATIC1111."""
    if value == -1:
        return None
    if value is not None:
        check_seed(value)
    return value


def random_seed() -> int:
    """A seed for a run that names none (A1111 draws one the same way: below 2**32)."""
    return secrets.randbelow(2**32)
