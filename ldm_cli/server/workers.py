"""A pool of device workers: one thread and one loaded model per device (several CPU workers
share the CPU), taking jobs from one FIFO queue, so one job runs at a time on each model and
the others wait their turn in order.

A job names the checkpoint it wants; a worker holding another one loads it first (the
previous model is dropped), so `sd_model_checkpoint` switches models between jobs.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ldm_cli.core.errors import UserError
from ldm_cli.server.jobs import Job, JobStopped
from ldm_cli.server.translate import Work

Loader = Callable[[Path, str], object]  # (checkpoint, device) -> pipeline


class Worker:
    def __init__(self, device: str):
        self.device = device
        self.path: Path | None = None
        self.pipe = None
        self.job: Job | None = None


class WorkerPool:
    """`submit` queues work and returns its Job, whose future gets the list of (request,
    image) pairs (the images rendered before a stop, when stopped), or the exception."""

    def __init__(self, loader: Loader, devices: list[str], model: Path):
        self.loader = loader
        self.model = Path(model)
        self.workers = [Worker(d) for d in devices]
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.resolve: Callable[[str], Path] = lambda name: Path(name)

    def start(self) -> None:
        """Load the model on every device (a bad file fails here, before serving), then start
        the worker threads."""
        for worker in self.workers:
            self._load(worker, self.model)
        for k, worker in enumerate(self.workers):
            thread = threading.Thread(
                target=self._loop, args=(worker,), name=f"ldm-worker-{k}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for job in self.waiting:
                job.future.cancel()
            self.waiting.clear()
            for worker in self.workers:
                if worker.job is not None:
                    worker.job.stop.set()
            self.lock.notify_all()
        for thread in self.threads:
            thread.join(timeout=30)

    def submit(self, work: Work, job_id: str | None = None) -> Job:
        job = Job(work) if job_id is None else Job(work, id=job_id)
        job.model_path = self.resolve(work.model) if work.model else None
        with self.lock:
            if self.closed:
                raise UserError("the server is shutting down")
            self.waiting.append(job)
            self.lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Forget a waiting job, or stop a running one at its next step."""
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)
                job.future.cancel()
                return
        job.stop.set()

    def interrupt(self) -> int:
        """Stop every running job at its next step; the number stopped."""
        with self.lock:
            running = [w.job for w in self.workers if w.job is not None]
        for job in running:
            job.stop.set()
        return len(running)

    def running(self) -> list[Job]:
        with self.lock:
            jobs = [w.job for w in self.workers if w.job is not None]
        return sorted(jobs, key=lambda j: j.started or 0.0)

    def queued(self) -> list[Job]:
        with self.lock:
            return list(self.waiting)

    def position(self, job_id: str) -> int | None:
        """0 for a running job, k for the k-th waiting one, None for one not here."""
        with self.lock:
            if any(w.job is not None and w.job.id == job_id for w in self.workers):
                return 0
            for k, job in enumerate(self.waiting, start=1):
                if job.id == job_id:
                    return k
        return None

    # -- worker threads ----------------------------------------------------------------

    def _loop(self, worker: Worker) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                job = self.waiting.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                worker.job = job
                job.started = time.time()
            try:
                job.future.set_result(self._run(worker, job))
            except BaseException as error:  # handed to the request's thread, never lost
                if not isinstance(error, (UserError, MemoryError)):
                    traceback.print_exc(file=sys.stderr)
                job.future.set_exception(error)
            finally:
                job.latest = job.pipe = None
                with self.lock:
                    worker.job = None

    def _run(self, worker: Worker, job: Job) -> list:
        self._load(worker, getattr(job, "model_path", None) or self.model)
        pipe = worker.pipe
        job.pipe = pipe
        pipe.preview = job.on_preview
        pairs = []
        try:
            for pair in job.work.run(pipe, job.on_step):
                pairs.append(pair)
                job.batch = len(pairs) * job.work.batches // max(1, job.work.images)
        except JobStopped:
            pass  # A1111 answers an interrupted job with what it has
        finally:
            pipe.preview = None
        return pairs

    def _load(self, worker: Worker, path: Path) -> None:
        if worker.pipe is not None and worker.path == path:
            return
        worker.pipe = worker.path = None
        gc.collect()  # the previous model's memory, before the next one is read
        worker.pipe = self.loader(path, worker.device)
        worker.path = path
