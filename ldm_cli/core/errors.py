"""The exception for bad input; the CLI prints `error: <message>` and exits with its code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, an option, a value), described in one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


_OOM_MARKS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def out_of_memory_message(error: BaseException) -> str | None:
    """The one-line message for an allocation failure (torch.OutOfMemoryError on a GPU, the
    CPU allocator's RuntimeError), or None for any other error."""
    text = str(error).lower()
    if type(error).__name__ != "OutOfMemoryError" and not any(m in text for m in _OOM_MARKS):
        return None
    return "out of memory; try a smaller size or --batch-size 1"
