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
