"""One queued or running API job: its work, its future, where it is (for /progress) and the
flag that stops it at the next sampling step."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_cli.server.translate import Work


class JobStopped(Exception):
    """Raised from the pipeline's step callback: /interrupt, or the client went away."""


@dataclass(eq=False)  # a job is itself: found in the queue by identity
class Job:
    work: Work
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    batch: int = 0  # batches finished
    step: int = 0
    steps: int = 0
    model_path: Path | None = None  # the checkpoint it asks for; None: the server's current
    latest: Any = None  # the x0 estimate of the last step (a tensor), for previews
    pipe: Any = None  # the pipeline it runs on, while it runs

    def on_step(self, step: int, total: int) -> None:
        """The pipeline's Progress callback: records the step; stops the run when asked."""
        self.step, self.steps = step, total
        if self.stop.is_set():
            raise JobStopped

    def on_preview(self, pipe, step: int, total: int, x0) -> None:
        """`pipe.preview` while the job runs: keeps the step's x0 for /progress to draw."""
        self.latest = x0.detach().clone()  # on its device: no wait for the GPU each step

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] over the job's batches (a hires pass restarts the steps)."""
        per_batch = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.batch + per_batch) / max(1, self.work.batches))
