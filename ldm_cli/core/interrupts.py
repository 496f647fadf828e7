"""Ctrl-C that waits for a short step to finish, so what a user sees matches what is on disk."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold SIGINT while the block runs, then raise KeyboardInterrupt if one arrived.

    Used around "publish the PNG, print its path": an interrupt between the two would leave a
    finished image on disk that the output never named. Outside the main thread (where no
    handler can be set) the block runs unprotected, and where SIGINT is ignored (a process
    started in the background) it stays ignored."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        yield
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if arrived:
        raise KeyboardInterrupt


_handled: list[str] = []


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that was handled on the way out: its message says what was kept, e.g. a
    training state to resume from. The CLI prints it instead of a bare "interrupted" (typer
    turns every KeyboardInterrupt into exit status 130, so the message is kept here for it)."""

    def __init__(self, message: str):
        super().__init__(message)
        _handled[:] = [message]


def handled_message() -> str | None:
    """The message of the last `Interrupted` raised in this process, taken (None if none)."""
    return _handled.pop() if _handled else None
