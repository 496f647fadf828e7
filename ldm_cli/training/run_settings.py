"""What defines a training stage's run, recorded with its saved state so that `--resume`
refuses to continue it with other settings instead of silently mixing two schedules.

`train_stage` records the stage's `StageSettings`, the seed and the number of processes (the
global batch is per-process batch x processes), plus the ``fingerprint`` its caller passes:
whatever else defines the run (the data folder and its image count, the image size, a base
checkpoint, ...). The record is written as ``settings.json`` into every saved state folder
(RUN_DIR/<stage>/state/settings.json, swapped in with the state, so the two always agree), and a
resumed run compares its own record with it before any step runs.

Stages call nothing here themselves: they pass ``fingerprint=`` to `train_stage`, built with
`data_fingerprint` and `path_key` where files are involved.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.core.errors import UserError

if TYPE_CHECKING:
    from ldm_cli.training.settings import StageSettings

SETTINGS_FILE = "settings.json"
_MISSING = object()


def path_key(path: str | os.PathLike[str] | None) -> str | None:
    """A file or folder as a fingerprint records it: absolute, so that a run resumed from
    another working directory matches."""
    return None if path is None else str(Path(path).resolve())


def data_fingerprint(data_dir: str | os.PathLike[str], images: int, **more) -> dict:
    """The usual fingerprint of a stage trained on a folder of images: the folder, how many
    images it held, and ``more`` (``size=``, ``heldout=``, ...)."""
    return {"data": path_key(data_dir), "images": images, **more}


def run_record(
    settings: StageSettings, seed: int, processes: int, fingerprint: dict | None = None
) -> dict:
    """The settings a stage's saved state is recorded with: `settings`, the seed, the number of
    processes and the caller's ``fingerprint`` (JSON-serialisable; paths become strings).
    Its keys must not be those of StageSettings or ``seed``/``processes``."""
    own = {**asdict(settings), "seed": seed, "processes": processes}
    extra = dict(fingerprint or {})
    clash = sorted(set(own) & set(extra))
    if clash:
        raise ValueError(f"fingerprint keys {clash} are recorded by train_stage itself")
    return _plain({**own, **extra})


def _plain(record: dict) -> dict:
    """The record as it reads back from JSON (tuples as lists, paths as strings)."""

    def default(value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"fingerprint value {value!r} is not JSON-serialisable")

    return json.loads(json.dumps(record, default=default))


def write_record(folder: Path, record: dict) -> None:
    """``settings.json`` in ``folder``, written whole or not at all."""
    tmp = folder / f".{SETTINGS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / SETTINGS_FILE)


def read_record(folder: Path) -> dict | None:
    """The record saved in ``folder``; None for a state saved before records were kept."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); delete the state to start over") from e
    return record if isinstance(record, dict) else None


def changed_settings(old: dict, new: dict) -> list[str]:
    """ "name OLD, not NEW" for each setting that differs (the new record's order first)."""
    keys = list(new) + [key for key in old if key not in new]
    return [
        f"{key} {_show(old.get(key, _MISSING))}, not {_show(new.get(key, _MISSING))}"
        for key in keys
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


def _show(value) -> str:
    if value is _MISSING:
        return "(not set)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return json.dumps(value)


def check_resumed(folder: Path, stage: str, record: dict) -> None:
    """Refuse to resume the state in ``folder`` with settings other than it was saved with:
    one line naming each changed setting with its old and new value."""
    saved = read_record(folder)
    if saved is None:
        return
    changes = changed_settings(saved, record)
    if changes:
        raise UserError(
            f"--resume: this run's {stage} stage was started with {'; '.join(changes)}; "
            "resume with the settings it was started with, or use a new --out to start over"
        )
