"""Environment variables that pick one of a few settings (LDM_WINOGRAD, LDM_LINEAR)."""

from __future__ import annotations

import os

from ldm_cli.core.errors import UserError


def env_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """$name, lower-cased, or None when unset or empty; a UserError naming the choices when it
    is set to anything else."""
    chosen = os.environ.get(name, "").strip().lower()
    if not chosen:
        return None
    if chosen not in choices:
        raise UserError(f"{name}={chosen!r}: use one of {', '.join(choices)}")
    return chosen
