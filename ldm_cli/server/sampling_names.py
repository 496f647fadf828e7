"""A1111's sampler, schedule type and eta fields as ldm's, through the label tables of the
PNG parameters text (ldm_cli.core.pngmeta), so that the API and --from-png agree."""

from __future__ import annotations

from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import (
    SAMPLER_LABELS,
    SCHEDULER_LABELS,
    scheduler_id,
    split_sampler_name,
)
from ldm_cli.pipeline.request import ETA_SAMPLERS

# the eta a sampler uses when none is given (ldm_cli.pipeline.request: None means "theirs")
_DEFAULT_ETA = {"tcd": 0.3}


def sampler_and_scheduler(sampler_name: str | None, scheduler: str | None) -> tuple[str, str]:
    """ldm's (sampler, scheduler) for A1111's `sampler_name` (or `sampler_index`) and
    `scheduler`; a schedule named in the sampler ("DPM++ 2M Karras", pre-1.9) wins, as in
    A1111, and "Automatic" is the schedule A1111 picks for that sampler."""
    try:
        sampler, named = split_sampler_name(sampler_name or "Euler")
    except UserError as error:
        raise UserError(f"sampler_name: {error}") from None
    if named is not None and named != "automatic":
        return sampler, named
    try:
        return sampler, scheduler_id(scheduler or "automatic", sampler)
    except UserError as error:
        raise UserError(f"scheduler: {error}") from None


def sampler_eta(sampler: str, eta: float | None) -> float | None:
    """The request's eta for ldm: only for the samplers that take one (A1111 ignores it for
    the others), and None where it is the sampler's default (so the parameters text is the
    CLI's without --eta)."""
    if eta is None or sampler not in ETA_SAMPLERS:
        return None
    return None if eta == _DEFAULT_ETA.get(sampler, 1.0) else float(eta)


def sampler_items() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem for each of ldm's samplers."""
    return [
        {"name": label, "aliases": [name], "options": {}} for name, label in SAMPLER_LABELS.items()
    ]


def scheduler_items() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem, "automatic" first as in A1111."""
    entries = [("automatic", "Automatic"), *SCHEDULER_LABELS.items()]
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": None,
         "need_inner_model": None}
        for name, label in entries
    ]  # fmt: skip
