"""`ldm upscale IMAGE [PROMPT]`: a thin layer over ldm_cli.pipeline.tasks.image_upscaler (by
default) and ldm_cli.pipeline.tasks.upscale (diffusion x4 upscalers); torch is imported late."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import typer

from ldm_cli.checkpoints.hash import hash_in_background
from ldm_cli.cli.generate import (
    SAMPLER_HELP,
    SEED,
    _given,
    check_device_options,
    check_options,
    save_all,
)
from ldm_cli.cli.image import DEVICE, DTYPE, NEGATIVE, NUM_IMAGES, OUT, SCHEDULER
from ldm_cli.cli.vae import VAE_TILING, check_vae_tiling
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import MAX_SIDE

# The same numbers as ldm_cli.pipeline.tasks.upscale and .image_upscaler (which import torch);
# tests/cli/test_cli_upscale.py checks.
MAX_NOISE_LEVEL = 350
DEFAULT_NOISE_LEVEL = 20
DEFAULT_TILE_SIZE = 128  # diffusion: low-res pixels
DEFAULT_SAMPLER = "ddim"
NETWORK_TILE_SIZE = 256
NETWORK_OVERLAP = 32
DIFFUSION_SCALE = 4
MAX_SCALE = 16
# Options that only a diffusion upscaler reads: parameter name -> how the user wrote it.
DIFFUSION_ONLY = {
    "prompt": "PROMPT",
    "noise_level": "--noise-level",
    "color_fix": "--color-fix",
    "negative_prompt": "--negative-prompt",
    "steps": "--steps",
    "cfg": "--cfg",
    "seed": "--seed",
    "sampler": "--sampler",
    "scheduler": "--scheduler",
    "num_images": "--num-images",
    "vae_tiling": "--vae-tiling",
}


def upscale(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="Low-resolution input image (any size and mode)."),
    prompt: str = typer.Argument(
        "", help="What the image shows (diffusion upscalers only; optional)."
    ),
    scale: float | None = typer.Option(
        None,
        "--scale",
        help=f"How many times larger, up to {MAX_SCALE} (default: 4, or the --upscaler file's "
        "own). The embedded network is x2 up to 2 and x4 above; other scales are reached by "
        "passes of the network and one Lanczos resize, as A1111 does. Diffusion: 4 only.",
    ),
    upscaler: Path | None = typer.Option(
        None,
        "--upscaler",
        help="An upscaler model file: ESRGAN, RealESRGAN (x4plus, compact), 4x-UltraSharp, "
        "SwinIR, DAT, HAT, ... (.safetensors, or .pth with --allow-pickle), read by spandrel. "
        "Default: the embedded ldm-sr network, made by `ldm train upscaler`.",
    ),
    diffusion: bool = typer.Option(
        False,
        "--diffusion",
        help="Use the embedded x4 diffusion upscaler, trained on the shapes scenes of the "
        "embedded model: it redraws such scenes (best with the caption as PROMPT), not photos.",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        help="A diffusion x4 upscaler checkpoint (x4-upscaler-ema.safetensors): PROMPT, "
        "--noise-level, --steps, --cfg, --sampler and --seed apply to it.",
    ),
    noise_level: int = typer.Option(
        DEFAULT_NOISE_LEVEL,
        "--noise-level",
        help=f"Diffusion: 0..{MAX_NOISE_LEVEL}, noise added to the input first; more lets the "
        "model invent more detail and stray further from the input.",
    ),
    color_fix: str = typer.Option(
        "auto",
        "--color-fix",
        help="Diffusion: gaussian takes colours and large forms (the frequencies below half an "
        "input pixel) from the input and only the finer detail from the model; none keeps the "
        "model's output as it is (as diffusers). auto: gaussian for the embedded x4 model, "
        "none for checkpoints.",
    ),
    negative_prompt: str = NEGATIVE,
    steps: int = typer.Option(30, "--steps", "-s", help="Diffusion: sampling steps."),
    cfg: float | None = typer.Option(
        None,
        "--cfg",
        help="Diffusion: classifier-free guidance scale; 1 skips the unconditional pass "
        "(default: the checkpoint's own, 7.5 unless its metadata names another; the embedded "
        "diffusion upscaler's is 1).",
    ),
    seed: int | None = SEED,
    sampler: str = typer.Option(
        DEFAULT_SAMPLER,
        "--sampler",
        help="Diffusion: one of: " + "; ".join(f"{k}: {v}" for k, v in SAMPLER_HELP.items()),
    ),
    scheduler: str = SCHEDULER,
    num_images: int = NUM_IMAGES,
    tile_size: int | None = typer.Option(
        None,
        "--tile-size",
        help=f"Upscale inputs larger than this many pixels in overlapping tiles, so memory "
        f"depends on the tile size only (0: the whole image at once; default {NETWORK_TILE_SIZE}"
        f", diffusion {DEFAULT_TILE_SIZE}).",
    ),
    tile_overlap: int | None = typer.Option(
        None,
        "--tile-overlap",
        help=f"Input pixels shared by neighbouring tiles, blended with feathered weights "
        f"(default {NETWORK_OVERLAP}; diffusion: an eighth of the tile size).",
    ),
    out: Path = OUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    vae_tiling: str = VAE_TILING,
) -> None:
    """Upscale an image (4x by default) and write a PNG with its parameters embedded.

    By default the embedded super-resolution network (ldm-sr) does it: faithful on any
    image, tiled, a second or so for 256 -> 1024 px on a CPU. --upscaler FILE runs an
    ESRGAN-family file instead; --model CKPT or --diffusion a diffusion x4 upscaler, guided by
    PROMPT.
    """
    check_vae_tiling(vae_tiling)
    if not 0 <= (tile_size or 0) <= MAX_SIDE or not 0 <= (tile_overlap or 0) <= MAX_SIDE:
        raise UserError(f"--tile-size and --tile-overlap must be between 0 and {MAX_SIDE}")
    if scale is not None and not 1 <= scale <= MAX_SCALE:
        raise UserError(f"--scale must be from 1 to {MAX_SCALE}, got {scale}")
    if diffusion or model is not None:
        if upscaler is not None:
            raise UserError(
                "--upscaler is a feed-forward upscaler and --model/--diffusion a diffusion "
                "one: give one of them"
            )
        if scale is not None and scale != DIFFUSION_SCALE:
            raise UserError(
                f"diffusion x4 upscalers upscale 4x only; --scale {scale} needs "
                "the default upscaler or --upscaler FILE"
            )
        return _diffusion(
            image, prompt, model, noise_level, color_fix, negative_prompt, steps, cfg, seed,
            sampler, scheduler, num_images, tile_size, tile_overlap, out, device, dtype,
            vae_tiling,
        )  # fmt: skip
    given = [DIFFUSION_ONLY[name] for name in DIFFUSION_ONLY if name in _given(ctx, DIFFUSION_ONLY)]
    if given:
        raise UserError(
            f"{', '.join(given)} only apply to diffusion upscalers; add --diffusion (the "
            "embedded shapes x4 model) or --model X4_CHECKPOINT, or leave them out"
        )
    check_device_options(device, dtype)
    _network(image, scale, upscaler, tile_size, tile_overlap, out, device, dtype)


def _network(
    image: Path,
    scale: float | None,
    upscaler: Path | None,
    tile_size: int | None,
    tile_overlap: int | None,
    out: Path,
    device: str,
    dtype: str,
) -> None:
    from ldm_cli.core.image_inputs import load_image

    picture = load_image(image)  # a missing or broken image fails before torch loads
    tile_size = NETWORK_TILE_SIZE if tile_size is None else tile_size
    tile_overlap = NETWORK_OVERLAP if tile_overlap is None else tile_overlap
    from ldm_cli.pipeline.tasks.image_upscaler import check_tile_options

    check_tile_options(tile_size, tile_overlap)

    import torch

    from ldm_cli.core.devices import resolve_device, resolve_dtype
    from ldm_cli.pipeline.tasks.image_upscaler import (
        load_embedded_upscaler,
        load_upscaler,
        parameters_text,
        upscale_image,
    )

    torch_device = resolve_device(device)
    half = resolve_dtype(dtype, torch_device) == torch.float16
    if upscaler is None:
        network = load_embedded_upscaler(scale or DIFFUSION_SCALE, torch_device)
    else:
        network = load_upscaler(upscaler, torch_device)
    network.to(torch_device, half=half)
    factor = scale or network.scale
    name = f"{image.stem} x{factor:g}"

    def results(on_step):
        result = upscale_image(network, picture, factor, tile_size, tile_overlap, on_step)
        result.info["parameters"] = parameters_text(
            network, factor, picture.size, tile_size, tile_overlap
        )
        yield SimpleNamespace(seed=None, prompt=name), result

    save_all(results, 1, out, step_label="tiles")


def _diffusion(
    image, prompt, model, noise_level, color_fix, negative_prompt, steps, cfg, seed, sampler,
    scheduler, num_images, tile_size, tile_overlap, out, device, dtype, vae_tiling,
) -> None:  # fmt: skip
    tile_size = DEFAULT_TILE_SIZE if tile_size is None else tile_size
    check_options(sampler, scheduler, steps, 1, num_images, device, dtype, seed)
    if not 0 <= noise_level <= MAX_NOISE_LEVEL:
        raise UserError(f"--noise-level must be between 0 and {MAX_NOISE_LEVEL}, got {noise_level}")
    if color_fix not in ("auto", "gaussian", "none"):
        raise UserError(f"--color-fix must be auto, gaussian or none, got {color_fix!r}")
    from ldm_cli.core.embedded import default_upscaler_path
    from ldm_cli.core.image_inputs import load_image

    path = model or default_upscaler_path()
    _require_upscaler(path)
    hash_in_background(path)  # while torch imports (ldm_cli.checkpoints.hash)
    picture = load_image(image)
    if model is None:
        from ldm_cli.data.shapes_domain import domain_notice

        message = domain_notice(picture)
        if message:
            print(message, file=sys.stderr)

    from ldm_cli.pipeline.load import load
    from ldm_cli.pipeline.tasks.upscale import UpscaleOptions, iter_upscale, upscale_request

    pipe = load(path, device=device, dtype=dtype, vae_tiling=vae_tiling)  # --tile-size 0, big tiles
    base = upscale_request(pipe, prompt, negative_prompt, steps, cfg, seed, sampler, scheduler)
    options = UpscaleOptions(noise_level, tile_size, tile_overlap, color_fix)
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
    from ldm_cli.checkpoints.detect import detect_config, is_upscaler_unet
    from ldm_cli.checkpoints.file import read_header

    cfg = detect_config(read_header(path))
    if not is_upscaler_unet(cfg.unet):
        raise UserError(f"{Path(path).name} is not an x4 upscaler checkpoint (it is {cfg.family})")
