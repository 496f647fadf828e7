"""`ldm` command line. Heavy modules (torch) are imported inside commands only,
so `ldm --help` stays fast."""

from __future__ import annotations

import os
import sys

import typer

from ldm_cli.core.errors import UserError

app = typer.Typer(
    name="ldm",
    help="Text-to-image latent diffusion from the terminal: Stable Diffusion 1.x, 2.x, XL and "
    "x4-upscaler checkpoints, and an embedded default model that needs no download.",
    no_args_is_help=True,
    # Plain click help: typer's rich help imports rich.markdown and markdown_it, which took
    # `ldm --help` from 0.25 s to 0.45 s on a 2-core EPYC.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG = {"on": False}


def _print_version(value: bool) -> None:
    if value:
        from ldm_cli import __version__

        print(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False,
        "--version",
        help="Print the version and exit.",
        callback=_print_version,
        is_eager=True,
    ),
) -> None:
    _DEBUG["on"] = debug or bool(os.environ.get("LDM_DEBUG"))
    from ldm_cli.ops.allocator import keep_freed_memory

    keep_freed_memory()  # before torch allocates anything: see allocator.py


def _register() -> None:
    from ldm_cli.cli.allow_pickle import with_allow_pickle
    from ldm_cli.cli.convert import convert
    from ldm_cli.cli.dataset import dataset_app
    from ldm_cli.cli.eval import eval_command
    from ldm_cli.cli.generate import generate
    from ldm_cli.cli.grid import grid
    from ldm_cli.cli.image import img2img, inpaint, outpaint
    from ldm_cli.cli.info import info
    from ldm_cli.cli.merge import merge
    from ldm_cli.cli.preprocess import preprocess
    from ldm_cli.cli.serve import serve
    from ldm_cli.cli.train import train
    from ldm_cli.cli.train_adapters import train_lora, train_ti
    from ldm_cli.cli.train_controlnet import train_controlnet
    from ldm_cli.cli.train_group import train_app
    from ldm_cli.cli.train_lcm import train_lcm
    from ldm_cli.cli.train_upscaler import train_upscaler
    from ldm_cli.cli.upscale import upscale

    app.command(no_args_is_help=False)(with_allow_pickle(generate))
    app.command()(with_allow_pickle(img2img))
    app.command()(with_allow_pickle(inpaint))
    app.command()(with_allow_pickle(outpaint))
    app.command()(with_allow_pickle(upscale))
    app.command()(with_allow_pickle(info))
    app.command()(with_allow_pickle(grid))
    app.command()(preprocess)
    app.command()(serve)
    app.command()(convert)
    app.command()(merge)
    train_app.command("model")(with_allow_pickle(train))
    train_app.command("upscaler")(train_upscaler)
    train_app.command("controlnet")(train_controlnet)
    train_app.command("lora")(with_allow_pickle(train_lora))
    train_app.command("ti")(with_allow_pickle(train_ti))
    train_app.command("lcm")(with_allow_pickle(train_lcm))
    app.add_typer(train_app, name="train")
    app.command("eval")(with_allow_pickle(eval_command))
    app.add_typer(dataset_app, name="dataset")


_register()


def main() -> None:
    from ldm_cli.cli.usage import run_app

    try:
        try:
            run_app(app)
        finally:
            sys.stdout.flush()  # a full disk or closed pipe on stdout shows here, not at exit
    except BrokenPipeError:  # `ldm info X | head`: the reader is gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except UserError as e:
        if _DEBUG["on"]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        if _DEBUG["on"]:
            raise
        print("error: out of memory; try a smaller size or --batch-size 1", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the system refused: a full disk, a vanished folder, permissions
        if _DEBUG["on"]:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:  # torch.OutOfMemoryError and the CPU allocator's failures
        from ldm_cli.core.errors import out_of_memory_message

        message = out_of_memory_message(e)
        if message is None or _DEBUG["on"]:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
