"""The training loop every stage shares: accelerate setup, AdamW with warmup and cosine decay,
EMA, resumable state, progress display and the jsonl log (:mod:`ldm_cli.training.run_log`)
and periodic sample hooks.

Randomness is drawn from generators seeded by (seed, stage, step) rather than from global RNG
state, so a run resumed from a saved step replays exactly what an uninterrupted run would do.
The saved state carries the settings the stage was started with (``run_settings``): `--resume`
with other ones is refused. Ctrl-C saves the state at the last completed step before ending.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_cli.core.errors import UserError
from ldm_cli.core.interrupts import Interrupted, interrupt_after
from ldm_cli.training.run_log import LOG_FILE, ProgressDisplay, TrainLog, logged_losses, trim_log
from ldm_cli.training.run_settings import SETTINGS_FILE, check_resumed, run_record, write_record
from ldm_cli.training.settings import LoopOptions, StageSettings

STATE_DIR = "state"
FINAL_LR_FRACTION = 0.1
EMA_WARMUP_OFFSET = 10


@dataclass
class StageResult:
    model: nn.Module  # the trained module, unwrapped from accelerate/DDP
    ema: nn.Module | None
    # mean loss of each logged interval (as train_log.jsonl has it), of the whole stage: a
    # resumed run's are those logged before the state it resumed, then its own
    losses: list[float]
    step: int  # steps done in total (resumed steps included)
    finished: bool  # step == settings.steps

    def final_loss(self, digits: int = 5) -> float | None:
        """The mean of the last tenth of the logged losses, rounded; None if none were logged."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return round(sum(tail) / len(tail), digits) if tail else None


class StepRandom:
    """The random draws of one step; the same for a given (seed, stage, step) in every run.

    ``shared`` is identical on every process (it picks the global batch); ``local`` differs per
    process (noise, dropout).
    """

    def __init__(self, seed: int, stage: str, step: int, rank: int, world: int):
        self.seed = seed
        self.stage_key = zlib.crc32(stage.encode())
        self.step = step
        self.rank = rank
        self.world = world
        base = (seed * 1_000_003 + self.stage_key) * 1_000_033 + step
        self.local = torch.Generator().manual_seed((base * 1_009 + rank) % 2**63)

    def batch_indices(self, count: int, batch_size: int) -> torch.Tensor:
        """This process's part of the step's global batch, walking seeded epoch permutations."""
        total = batch_size * self.world
        positions = torch.arange(self.step * total, (self.step + 1) * total)
        epochs = positions // count
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            indices[mask] = self._permutation(count, epoch)[positions[mask] % count]
        return indices[self.rank :: self.world]

    def _permutation(self, count: int, epoch: int) -> torch.Tensor:
        seed = ((self.seed * 1_000_003 + self.stage_key) * 7_919 + epoch) % 2**63
        return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


class EMA:
    """An exponential moving average of a module's parameters, kept as a second module.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so short runs are not dominated by
    the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (EMA_WARMUP_OFFSET + self.updates))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class StepCounter:
    """The stage's step, saved with accelerate's state as a custom checkpoint object, with the
    loss summed over the steps since the last log line (the processes' mean), so that a resumed
    run logs the same intervals as an uninterrupted one."""

    def __init__(self, stage: str):
        self.stage = stage
        self.step = 0
        self.interval_loss = 0.0
        self.interval_steps = 0

    def state_dict(self) -> dict:
        return {
            "stage": self.stage,
            "step": self.step,
            "interval_loss": self.interval_loss,
            "interval_steps": self.interval_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["stage"] != self.stage:
            raise UserError(f"saved state is of stage {state['stage']!r}, not {self.stage!r}")
        self.step = int(state["step"])
        self.interval_loss = float(state.get("interval_loss", 0.0))
        self.interval_steps = int(state.get("interval_steps", 0))


def learning_rate(settings: StageSettings, step: int) -> float:
    """Linear warmup, then cosine decay to FINAL_LR_FRACTION of the peak at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    progress = min(1.0, (step - settings.warmup) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def make_accelerator(options: LoopOptions):
    from accelerate import Accelerator

    from ldm_cli.runtime.distributed import cpu_processes

    try:  # cpu: several processes on a machine without a GPU train with gloo
        accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=cpu_processes())
    except ValueError as e:
        raise UserError(f"--mixed-precision {options.mixed_precision}: {e}") from e
    if accelerator.device.type == "cpu":
        use_cpu_threads(options.threads, accelerator.num_processes)
    return accelerator


def use_cpu_threads(threads: int | None, processes: int) -> None:
    """Each process's share of the cores (or of `threads`). Set it before any computation
    whose numbers the run depends on: a CPU kernel's sums depend on its thread count."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = threads or (available or os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // processes))


def is_main_process() -> bool:
    from ldm_cli.runtime.distributed import partial_state

    return partial_state().is_main_process


def wait_for_everyone() -> None:
    from ldm_cli.runtime.distributed import partial_state

    partial_state().wait_for_everyone()


def note(options: LoopOptions, message: str) -> None:
    """A one-line status message on stderr (main process, unless quiet)."""
    if not options.quiet and is_main_process():
        print(message, file=sys.stderr, flush=True)


def stage_dir(options: LoopOptions, stage: str) -> Path:
    return options.run_dir / stage


LossFn = Callable[[nn.Module, StepRandom], torch.Tensor]
SampleFn = Callable[[nn.Module, int], None]


def train_stage(
    stage: str,
    model: nn.Module,
    loss_fn: LossFn,
    settings: StageSettings,
    options: LoopOptions,
    ema_decay: float | None = None,
    sample_fn: SampleFn | None = None,
    fingerprint: dict | None = None,
) -> StageResult:
    """Train ``model`` for ``settings.steps`` steps of ``loss_fn`` (or up to ``stop_after``).

    ``sample_fn(module, step)`` runs on the main process every ``sample_every`` steps and at the
    end; it gets the EMA module when there is one.

    ``fingerprint``: JSON-serialisable settings that define the run besides ``settings`` and the
    seed (data folder and image count, image size, base checkpoint, ...; see
    `ldm_cli.training.run_settings`). It is saved with the state, and `--resume` with a
    different one (or different ``settings``, seed or number of processes) is a UserError
    naming each changed setting, raised before any step runs.

    Ctrl-C (KeyboardInterrupt, single process) saves the state at the last completed step and
    raises `Interrupted` with a one-line message; `--resume` continues exactly from there.
    """
    accelerator = make_accelerator(options)
    record = run_record(settings, options.seed, accelerator.num_processes, fingerprint)
    optimizer = adamw(model, settings)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(prepared)
    counter = StepCounter(stage)
    accelerator.register_for_checkpointing(counter)
    ema = EMA(unwrapped, ema_decay) if ema_decay is not None else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    state = stage_dir(options, stage) / STATE_DIR
    saved = restore_state(accelerator, state, stage, options, counter, record)

    stop = settings.steps if options.stop_after is None else min(options.stop_after, settings.steps)
    log = TrainLog(options, stage, accelerator.is_main_process)
    losses: list[float] = []
    start = counter.step
    # the interval's summed loss and steps (restored: those of the steps before the state)
    running = torch.full((), counter.interval_loss, device=accelerator.device)
    interval_steps = counter.interval_steps

    def save() -> None:
        counter.interval_loss = accelerator.reduce(running, "mean").item()
        counter.interval_steps = interval_steps
        save_state(accelerator, state, record)

    prepared.train()
    try:
        with ProgressDisplay(stage, settings.steps, start, options.quiet, accelerator) as progress:
            interval_start, timed_steps = time.perf_counter(), 0
            for step in range(start, stop):
                lr = learning_rate(settings, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                draws = StepRandom(
                    options.seed, stage, step, accelerator.process_index, accelerator.num_processes
                )
                loss = loss_fn(prepared, draws)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                if settings.grad_clip is not None:
                    accelerator.clip_grad_norm_(prepared.parameters(), settings.grad_clip)
                with interrupt_after():  # Ctrl-C: the step is taken whole, or not at all
                    optimizer.step()
                    if ema is not None:
                        ema.update(unwrapped)
                    counter.step = step + 1
                    running += loss.detach()
                    interval_steps += 1
                timed_steps += 1
                progress.advance()

                done = counter.step
                if done % options.log_every == 0 or done == stop:
                    # the only host sync of the loop
                    mean = accelerator.reduce(running, "mean").item() / interval_steps
                    rate = timed_steps / max(1e-9, time.perf_counter() - interval_start)
                    with interrupt_after():  # logged and cleared together
                        losses.append(round(mean, 6))  # as the log has it
                        log.write(done, mean, lr, rate)
                        running.zero_()
                        interval_steps = 0
                    progress.show(mean, rate)
                    interval_start, timed_steps = time.perf_counter(), 0
                if done != stop and options.save_every and done % options.save_every == 0:
                    save()
                if sample_fn is not None and options.samples and accelerator.is_main_process:
                    periodic = options.sample_every and done % options.sample_every == 0
                    if periodic or done == settings.steps:
                        sample_fn(ema.module if ema is not None else unwrapped, done)
                        prepared.train()
    except KeyboardInterrupt:
        if accelerator.num_processes > 1:
            raise  # the processes may be at different steps: no common state to save
        try:
            with interrupt_after():  # a second Ctrl-C waits for the state to be written
                if counter.step > start or saved is None:
                    save()
        except KeyboardInterrupt:
            pass
        raise Interrupted(
            f"{stage}: interrupted at step {counter.step} of {settings.steps}; "
            "state saved: --resume continues"
        ) from None
    if counter.step > start or saved is None:
        save()
    accelerator.wait_for_everyone()
    done, ema_module = counter.step, ema.module if ema is not None else None
    losses = logged_losses(options.run_dir / LOG_FILE, stage, start) + losses
    return StageResult(unwrapped, ema_module, losses, done, finished=done >= settings.steps)


def adamw(model: nn.Module, settings: StageSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases and norms)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )


def restore_state(
    accelerator, state: Path, stage: str, options: LoopOptions, counter, record: dict
) -> Path | None:
    """Load an unfinished stage's saved state (only with --resume, and only with the settings
    ``record`` it was saved with); the log keeps only the lines up to it (none when starting
    afresh). Returns the state folder found, or None."""
    saved = existing_state(state)
    if saved is not None and not options.resume:
        raise UserError(
            f"{saved} holds an unfinished {stage} stage; pass --resume to continue it, "
            "or delete it (or use a new --out) to start over"
        )
    if saved is not None:
        check_resumed(saved, stage, record)
        if saved != state:  # a save cut short between its two renames: finish it
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                os.replace(saved, state)
            accelerator.wait_for_everyone()
            saved = state
        accelerator.load_state(str(saved))
    if accelerator.is_main_process:
        trim_log(options.run_dir / LOG_FILE, stage, counter.step)
    return saved


def existing_state(state: Path) -> Path | None:
    """The saved state folder, or the complete temporary copy left by a save cut short (its
    settings file is written last)."""
    if state.is_dir():
        return state
    pending = state.with_name(state.name + ".tmp")
    if pending.is_dir() and (pending / SETTINGS_FILE).is_file():
        return pending
    return None


def save_state(accelerator, state: Path, record: dict) -> None:
    """accelerate's save_state and the run's settings (``record``) into a temporary folder,
    then swapped in, so a crash mid-save never leaves a torn state."""
    pending = state.with_name(state.name + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and (pending / SETTINGS_FILE).exists():
        (pending / SETTINGS_FILE).unlink()  # left by a save cut short: not complete again yet
    accelerator.save_state(str(pending))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_record(pending, record)
        if state.exists():
            shutil.rmtree(state)
        os.replace(pending, state)
    accelerator.wait_for_everyone()
