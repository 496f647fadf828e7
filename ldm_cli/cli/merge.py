"""`ldm merge A B -o OUT`: AUTOMATIC1111's checkpoint merger (weighted sum, add difference,
per-block weights), tensor by tensor (ldm_cli.checkpoint_tools.merge). torch is imported inside
the command only."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from ldm_cli.cli.convert import check_dtype, check_input, check_new_output
from ldm_cli.core.errors import UserError

ALPHA_HELP = "The share of B (weighted sum) or of B - C (add difference); 0 gives A."
BLOCK_HELP = (
    "Per-block alphas for the U-Net, supermerger style: comma-separated, IN00..IN11, M00, "
    "OUT00..OUT11 (25 values for SD 1.x/2.x; 19 for SDXL: IN00..IN08, M00, OUT00..OUT08). "
    "--alpha stays that of every other tensor (text encoder, VAE, time embedding, U-Net out)."
)


def merge(
    a: Path = typer.Argument(..., metavar="A", help="The first checkpoint (its layout is kept)."),
    b: Path = typer.Argument(..., metavar="B", help="The second checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="The new .safetensors file."),
    alpha: float = typer.Option(0.5, "--alpha", help=ALPHA_HELP),
    add_difference: Path | None = typer.Option(
        None, "--add-difference", metavar="C", help="Add difference: A + (B - C) * alpha."
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        metavar="fp32|fp16|bf16",
        help="fp32, fp16 or bf16 for the floating-point tensors (default: A's).",
    ),
    block_weights: str | None = typer.Option(
        None, "--block-weights", metavar="W,W,...", help=BLOCK_HELP
    ),
) -> None:
    """Merge two checkpoints as A1111's checkpoint merger does.

    Weighted sum: A * (1 - alpha) + B * alpha. With --add-difference C: A + (B - C) * alpha.
    Computed in fp32 per tensor and stored in A's dtype (or --dtype). Tensors A holds and B (or C)
    lacks are kept as A's; those only B or C hold are left out (as in A1111). A and B must be the
    same model family and size: otherwise a one-line error names the first tensor that differs.
    One tensor of each file is in memory at a time and OUT is written as it goes, so two SDXL files
    merge in a few GB. Inputs: .safetensors (streamed), pickles (read weights-only, see `ldm
    convert`) or diffusers folders. OUT must not exist; the recipe (files and their hashes, mode,
    alpha, block weights) is recorded in its metadata under ldm_merge."""
    check_dtype(dtype)
    if not math.isfinite(alpha):
        raise UserError(f"--alpha must be a finite number, got {alpha}")
    weights = parse_block_weights(block_weights) if block_weights is not None else None
    for path, what in ((a, "A"), (b, "B"), (add_difference, "C")):
        if path is not None:
            check_input(path, what)
    check_new_output(out)
    if Path(out).suffix.lower() != ".safetensors":
        raise UserError(f"-o {out}: merge writes a .safetensors file; end the name with it")
    from ldm_cli.checkpoint_tools.merge import MergeJob, run_merge

    job = MergeJob(a, b, out, alpha, add_difference, dtype, weights)
    print(run_merge(job))


def parse_block_weights(text: str) -> tuple[float, ...]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--block-weights: {part.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"--block-weights: {part.strip()!r} is not a finite number")
        values.append(value)
    return tuple(values)
