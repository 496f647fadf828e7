"""Sharing one batch among the processes of `accelerate launch` (one machine or many).

`accelerate launch --num_processes N ldm generate ...` starts N copies of the command. Each
builds the same plan (the same jobs, seeds and output numbers), then process i renders jobs
i, i+N, i+2N, ...: every image is rendered exactly once, by one process, with the numbers,
seeds and pixels a single process would give it. accelerate (and through it torch.distributed)
is imported only when the environment says the command was launched with more than one
process, so a plain `ldm` run pays nothing for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


def launched() -> bool:
    """True under `accelerate launch`/torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass(frozen=True)
class Shard:
    """This process's place among the launched ones (index 0 of 1 for a plain run)."""

    index: int = 0
    count: int = 1
    state: Any = None  # accelerate.PartialState when launched

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, items: list) -> list:
        """Items i, i+N, i+2N, ... of `items` for process i of N."""
        return items[self.index :: self.count]

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value):
        """The main process's `value`, on every process (a picklable object)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]


@lru_cache(maxsize=1)
def current() -> Shard:
    """The shard of this process; starts accelerate's process group when launched."""
    if not launched():
        return Shard()
    state = partial_state()
    return Shard(state.process_index, state.num_processes, state)


def cpu_processes() -> bool:
    """Several launched processes and no CUDA GPU: accelerate must be told to use the CPU
    (gloo), or each process sees a world of one and they all act as the main process."""
    if not launched():
        return False
    import torch

    return not torch.cuda.is_available()


def partial_state():
    """accelerate's PartialState (shared by all its users in the process), set up with
    `cpu_processes()`; pass the same to `Accelerator(cpu=...)`."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_processes())


def shared_random_seed() -> int:
    """A random seed that every launched process agrees on (the main process draws it)."""
    from ldm_cli.core.limits import random_seed

    shard = current()
    return shard.share(random_seed() if shard.is_main else None)
