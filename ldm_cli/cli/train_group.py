"""`ldm train`: a group of training commands (`model`, `lora`, `ti`, `controlnet`,
`upscaler`) that still takes the old form `ldm train DATA_DIR -o RUN_DIR` as
`ldm train model ...`, with a one-line notice."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

HELP_OPTIONS = ("--help", "-h")


class TrainGroup(TyperGroup):
    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in HELP_OPTIONS:
            print("note: `ldm train DATA_DIR` is now `ldm train model DATA_DIR`", file=sys.stderr)
            args = ["model", *args]
        return super().parse_args(ctx, args)


train_app = typer.Typer(
    cls=TrainGroup,
    no_args_is_help=True,
    help="Train models: `ldm train model` (a latent diffusion model from captioned images), "
    "`ldm train lora` and `ldm train ti` (a LoRA or a textual-inversion embedding that teaches "
    "a model a new concept), `ldm train lcm` (an LCM-LoRA: the model in 4 steps), "
    "`ldm train controlnet` and `ldm train upscaler`.",
)
