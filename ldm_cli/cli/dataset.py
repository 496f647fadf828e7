"""`ldm dataset ...`: procedural training sets."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ldm_cli.core.errors import UserError

dataset_app = typer.Typer(
    help="Make procedural captioned image sets for `ldm train`.", no_args_is_help=True
)


@dataset_app.command("shapes")
def shapes(
    out: Path = typer.Argument(..., help="Output folder (PNG + .txt caption per image)."),
    num: int = typer.Option(10000, "--num", help="Number of images."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scene stream."),
    layout: str = typer.Option(
        "grid",
        "--layout",
        help="grid: each object in its caption's cell (what the embedded model learned); free: "
        "moved off it, resized and turned (the embedded ControlNet's data: only a control map "
        "can tell where).",
    ),
) -> None:
    """Coloured shapes on plain backgrounds, captioned by the grammar in docs/shapes-grammar.md.

    Some colour-shape pairs are held out of the set to measure compositional generalisation.
    """
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise UserError(f"--seed must be between 0 and 2**32-1, got {seed}")
    if layout not in ("grid", "free"):
        raise UserError(f"--layout must be grid or free, got {layout!r}")
    if not 16 <= size <= 1024:
        raise UserError(f"--size must be between 16 and 1024, got {size}")
    from ldm_cli.cli.batch_resume import check_output_dir

    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; choose a new folder")
    from rich.progress import Progress

    from ldm_cli.data.shapes_writer import write_shapes_dataset

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("images", total=num)
        write_shapes_dataset(
            out,
            num,
            size=size,
            seed=seed,
            progress=lambda done, _: bar.update(task, completed=done),
            layout=layout,
        )
    print(f"wrote {num} images to {out}")


@dataset_app.command("concept")
def concept(
    out: Path = typer.Argument(..., help="Output folder (PNG + .txt caption per image)."),
    word: str = typer.Option(
        "zorp", "--word", help="The new word that names the shape in the captions."
    ),
    count: int = typer.Option(16, "--count", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scene stream."),
) -> None:
    """A shape the embedded model has never seen, for `ldm train lora` and `ldm train ti`: a
    cross (plus sign), one per 64x64 image in varied colours, places, sizes and backgrounds,
    captioned in the shapes grammar with WORD for its name ("a large red zorp in the top
    left, on a blue background"). `ldm eval --concept WORD` measures what was learned.
    """
    from ldm_cli.data.concept import check_word

    try:
        check_word(word)
    except ValueError as e:
        raise UserError(str(e)) from None
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise UserError(f"--seed must be between 0 and 2**32-1, got {seed}")
    from ldm_cli.cli.batch_resume import check_output_dir

    check_output_dir(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; choose a new folder")
    from ldm_cli.data.concept import write_concept_dataset

    write_concept_dataset(out, word=word, count=count, seed=seed)
    print(f"wrote {count} images of a {word} (a cross) to {out}")
