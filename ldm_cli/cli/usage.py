"""Running the typer app so that usage errors are one line too.

typer prints a bad option value or an unknown option as a framed panel under the usage line;
here they become `error: <what>; see '<command> --help'` with exit code 2, like every other
user error. Help, completion and normal runs behave as before.
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.26 carries its own copy of click
    from typer._click import exceptions
except ImportError:  # pragma: no cover - older typer, on click itself
    from click import exceptions


def run_app(app: typer.Typer) -> None:
    """Run `app` on sys.argv; exits with the command's status."""
    try:
        status = app(standalone_mode=False)
    except exceptions.NoArgsIsHelpError as error:  # `ldm` or `ldm dataset` alone: the help
        error.show()
        sys.exit(error.exit_code)
    except exceptions.UsageError as error:
        sys.stderr.write(f"error: {usage_message(error)}\n")
        sys.exit(error.exit_code)
    except typer.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(1)
    except exceptions.ClickException as error:
        sys.stderr.write(f"error: {one_line(error.format_message())}\n")
        sys.exit(error.exit_code)
    if isinstance(status, int) and status:
        if status == 130:  # typer turns Ctrl-C into exit status 130
            from ldm_cli.core.interrupts import handled_message

            sys.stderr.write(f"{handled_message() or 'interrupted'}\n")
        sys.exit(status)


def usage_message(error: exceptions.UsageError) -> str:
    message = one_line(error.format_message()).rstrip(".")
    ctx = error.ctx
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        names = []
        while ctx is not None:
            names.insert(0, ctx.info_name if ctx.parent is not None else "ldm")
            ctx = ctx.parent
        message += f"; see '{' '.join(names)} {error.ctx.help_option_names[0]}'"
    return message


def one_line(text: str) -> str:
    return " ".join(text.split())
