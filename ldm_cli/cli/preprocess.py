"""`ldm preprocess NAME IMAGE -o MAP.png`: a control map alone (ldm_cli.control.preprocessors),
to look at or to edit before `--control-image MAP.png --preprocess none`."""

from __future__ import annotations

from pathlib import Path

import typer

from ldm_cli.core.errors import UserError


def preprocess(
    name: str = typer.Argument(
        ..., help="canny, threshold, scribble or invert (`none` copies the image)."
    ),
    image: Path = typer.Argument(..., help="The image to make the map from."),
    out: Path = typer.Option(
        None, "--out", "-o", help="The map's file (default: IMAGE-NAME.png beside the image)."
    ),
) -> None:
    """Write the control map a preprocessor makes from an image, as --preprocess NAME would
    give it to a ControlNet. Maps that need a network (depth, OpenPose) come from other tools."""
    from ldm_cli.control.preprocessors import check_preprocessor
    from ldm_cli.control.preprocessors import preprocess as run

    check_preprocessor(name)
    from ldm_cli.cli.outputs import print_written, save_png_as
    from ldm_cli.core.image_inputs import load_image

    picture = load_image(image)
    target = out or image.with_name(f"{image.stem}-{name}.png")
    if target.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {target}")
    print_written(save_png_as(run(picture, name), target))
