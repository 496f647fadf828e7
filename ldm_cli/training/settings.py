"""What a training stage is told: its steps, batch and learning rate (`StageSettings`) and how
the run around it behaves (`LoopOptions`: folder, seed, resuming, logging, saving, samples)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageSettings:
    steps: int
    batch_size: int  # per process
    lr: float
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class LoopOptions:
    run_dir: Path
    seed: int = 0
    resume: bool = False
    mixed_precision: str = "no"
    log_every: int = 25
    save_every: int = 500
    sample_every: int = 0  # 0: only at the end of a stage
    samples: bool = True  # False: no samples at all
    quiet: bool = False
    # Stop after this many steps (saving the state) though the schedule runs to
    # StageSettings.steps; a later --resume run carries on from there.
    stop_after: int | None = None
    threads: int | None = None
