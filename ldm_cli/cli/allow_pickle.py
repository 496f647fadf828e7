"""`--allow-pickle`, added to every command that opens a model file.

`with_allow_pickle(command)` returns the command with one more option; typer reads it from the
returned function's signature, so each command's own code stays as it was.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable

import typer

ALLOW_PICKLE_HELP = (
    "Also open pickled .ckpt/.pt checkpoints: only their tensors are read "
    "(torch.load weights_only), no code in the file is run. Without it they are refused."
)


def with_allow_pickle(command: Callable) -> Callable:
    """`command` with an `--allow-pickle` flag that allows pickled checkpoints while it runs."""
    hints = typing.get_type_hints(command)
    signature = inspect.signature(command)
    parameters = [
        p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
    ]
    parameters.append(
        inspect.Parameter(
            "allow_pickle",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
            annotation=bool,
        )
    )

    @functools.wraps(command)
    def run(*args, allow_pickle: bool = False, **kwargs):
        from ldm_cli.checkpoints.pickled import allow_pickle as allowing

        with allowing(allow_pickle):
            return command(*args, **kwargs)

    run.__signature__ = signature.replace(parameters=parameters, return_annotation=None)
    run.__annotations__ = {**hints, "allow_pickle": bool}
    return run
