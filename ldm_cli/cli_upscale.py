"""`ldm upscale IMAGE [PROMPT]`: a thin layer over ldm_cli.upscale; torch is imported late."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from .cli_generate import SAMPLER_HELP, SEED, check_options, save_all
from .cli_image import DEVICE, DTYPE, NEGATIVE, NUM_IMAGES, OUT, SCHEDULER
from .cli_vae import VAE_TILING, check_vae_tiling
from .errors import UserError
from .limits import MAX_SIDE
from .model_hash import hash_in_background

# The same numbers as ldm_cli.upscale (which imports torch); tests/test_cli_upscale.py checks.
MAX_NOISE_LEVEL = 350
DEFAULT_NOISE_LEVEL = 20
DEFAULT_TILE_SIZE = 128
DEFAULT_SAMPLER = "ddim"


def upscale(
    image: Path = typer.Argument(..., help="Low-resolution input image (any size and mode)."),
    prompt: str = typer.Argument("", help="What the image shows (optional)."),
    noise_level: int = typer.Option(
        DEFAULT_NOISE_LEVEL,
        "--noise-level",
        help=f"0..{MAX_NOISE_LEVEL}: noise added to the input first; more lets the model "
        "invent more detail and stray further from the input.",
    ),
    negative_prompt: str = NEGATIVE,
    steps: int = typer.Option(30, "--steps", "-s", help="Sampling steps."),
    cfg: float | None = typer.Option(
        None,
        "--cfg",
        help="Classifier-free guidance scale; 1 skips the unconditional pass (default: the "
        "checkpoint's own, 7.5 unless its metadata names another; the embedded upscaler's is 1).",
    ),
    seed: int | None = SEED,
    sampler: str = typer.Option(
        DEFAULT_SAMPLER,
        "--sampler",
        help="One of: " + "; ".join(f"{k}: {v}" for k, v in SAMPLER_HELP.items()),
    ),
    scheduler: str = SCHEDULER,
    num_images: int = NUM_IMAGES,
    tile_size: int = typer.Option(
        DEFAULT_TILE_SIZE,
        "--tile-size",
        help="Upscale inputs larger than this many pixels in overlapping tiles, so memory "
        "depends on the tile size only (0: the whole image at once).",
    ),
    tile_overlap: int | None = typer.Option(
        None,
        "--tile-overlap",
        help="Input pixels shared by neighbouring tiles, blended with feathered weights "
        "(default: an eighth of the tile size).",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="An x4 upscaler checkpoint (.safetensors); default: the embedded upscaler.",
    ),
    out: Path = OUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    vae_tiling: str = VAE_TILING,
) -> None:
    """Upscale an image 4x with an x4 upscaler and write PNGs with their parameters embedded."""
    check_options(sampler, scheduler, steps, 1, num_images, device, dtype, seed)
    check_vae_tiling(vae_tiling)
    if not 0 <= noise_level <= MAX_NOISE_LEVEL:
        raise UserError(f"--noise-level must be between 0 and {MAX_NOISE_LEVEL}, got {noise_level}")
    if not 0 <= tile_size <= MAX_SIDE or not 0 <= (tile_overlap or 0) <= MAX_SIDE:
        raise UserError(f"--tile-size and --tile-overlap must be between 0 and {MAX_SIDE}")
    from .embedded import default_upscaler_path
    from .image_inputs import load_image

    path = model or default_upscaler_path()
    _require_upscaler(path)
    hash_in_background(path)  # while torch imports (ldm_cli.model_hash)
    picture = load_image(image)

    from .pipeline import load
    from .upscale import UpscaleOptions, iter_upscale, upscale_request

    pipe = load(path, device=device, dtype=dtype, vae_tiling=vae_tiling)  # --tile-size 0, big tiles
    base = upscale_request(pipe, prompt, negative_prompt, steps, cfg, seed, sampler, scheduler)
    options = UpscaleOptions(noise_level, tile_size, tile_overlap)
    # Without a prompt the file is named after the input: NNNNN-SEED-<image>-x4.png
    name = prompt if prompt.strip() else f"{image.stem} x4"

    def results(on_step):
        pairs = iter_upscale(
            pipe,
            picture,
            base,
            options,
            num_images=num_images,
            progress=on_step,
            notice=_notice,
        )
        for req, result in pairs:
            yield replace(req, prompt=name), result

    save_all(results, num_images, out)


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def _require_upscaler(path: Path) -> None:
    """Refuse another kind of checkpoint from its header, before any weights are read."""
    from .checkpoint_file import read_header
    from .detect import detect_config, is_upscaler_unet

    cfg = detect_config(read_header(path))
    if not is_upscaler_unet(cfg.unet):
        raise UserError(f"{Path(path).name} is not an x4 upscaler checkpoint (it is {cfg.family})")
