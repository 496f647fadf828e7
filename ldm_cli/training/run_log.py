"""What a training run writes as it goes: the jsonl log (one line per log interval), the
progress display on stderr, and json files merged in place (metrics.json).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.core.run_folders import RUN_LOG

if TYPE_CHECKING:
    from ldm_cli.training.settings import LoopOptions

LOG_FILE = RUN_LOG


def trim_log(path: Path, stage: str, step: int) -> None:
    """Drop the log lines of ``stage`` past ``step`` (written after the state being resumed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("stage") != stage or record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def logged_losses(path: Path, stage: str, up_to: int) -> list[float]:
    """The losses of ``stage``'s log lines up to step ``up_to``, in the log's order."""
    if up_to <= 0 or not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = (json.loads(line) for line in lines if line.strip())
    return [
        float(r["loss"])
        for r in records
        if r.get("stage") == stage and r.get("step", 0) <= up_to and "loss" in r
    ]


class TrainLog:
    """Appends one json line per log interval to RUN_DIR/train_log.jsonl (main process)."""

    def __init__(self, options: LoopOptions, stage: str, enabled: bool):
        self.path = options.run_dir / LOG_FILE
        self.stage = stage
        self.enabled = enabled

    def write(self, step: int, loss: float, lr: float, rate: float) -> None:
        if not self.enabled:
            return
        record = {
            "stage": self.stage,
            "step": step,
            "loss": round(loss, 6),
            "lr": float(f"{lr:.4g}"),
            "it_per_s": round(rate, 3),
            "time": round(time.time(), 1),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ProgressDisplay:
    """A rich progress bar with the latest loss and it/s, on the main process only."""

    def __init__(self, stage: str, total: int, start: int, quiet: bool, accelerator):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = accelerator.is_main_process and not quiet
        self.stage = stage
        self.total = total
        self.done = start
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} it/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not self.enabled,
            transient=False,
            console=_stderr_console(),
        )
        self.task = self.progress.add_task(stage, total=total, completed=start, loss="-", rate="-")

    def __enter__(self) -> ProgressDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self) -> None:
        self.done += 1
        self.progress.advance(self.task)

    def show(self, loss: float, rate: float) -> None:
        self.progress.update(self.task, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        console = self.progress.console
        if self.enabled and not console.is_terminal:
            # no live bar when redirected to a file: one line per log interval instead
            console.print(
                f"{self.stage} {self.done}/{self.total} loss {loss:.4f} {rate:.2f} it/s",
                highlight=False,
            )


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def merge_json(path: Path, updates: dict) -> dict:
    """Update a json object file in place (created when missing); returns the merged object."""
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data
