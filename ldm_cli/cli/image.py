"""`ldm img2img`, `ldm inpaint` and `ldm outpaint`: thin layers over
ldm_cli.pipeline.tasks.img2img and .inpaint.

The option objects are shared by the three commands; torch is imported inside commands only.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from ldm_cli.cli.control import (
    CONTROL,
    CONTROL_END,
    CONTROL_IMAGE,
    CONTROL_MODE,
    CONTROL_START,
    CONTROL_WEIGHT,
    PREPROCESS,
    check_control_files,
    control_options,
)
from ldm_cli.cli.generate import (
    DTYPE_HELP,
    SAMPLER_HELP,
    SCHEDULER_HELP,
    SEED,
    check_options,
    save_all,
)
from ldm_cli.cli.model_parts import (
    CLIP_G_FILE,
    CLIP_L_FILE,
    GUIDANCE,
    T5_FILE,
    VAE_FILE,
    part_files,
)
from ldm_cli.cli.networks import EMBEDDINGS, LORA, LORA_DIR, configure
from ldm_cli.cli.performance import (
    COMPILE,
    CUDA_GRAPHS,
    DEEP_CACHE,
    LOW_MEMORY,
    OFFLOAD,
    PREVIEW,
    PREVIEW_EVERY,
    TOKEN_MERGING,
    Performance,
)
from ldm_cli.cli.vae import VAE_TILING
from ldm_cli.core.limits import MAX_SIDE, check_side

IMAGE = typer.Argument(..., help="Input image (any size; PNG, JPEG, WebP, ...; any mode).")
PROMPT = typer.Argument(..., help="The prompt.")
NEGATIVE = typer.Option("", "--negative-prompt", "-n", help="What to steer away from.")
STEPS = typer.Option(
    None,
    "--steps",
    "-s",
    help="Schedule length; int(steps * strength) of them are run (default: 30; a flow model's "
    "own count).",
)
CFG = typer.Option(
    None,
    "--cfg",
    help="Classifier-free guidance scale (default: the checkpoint's own, else 7.5); 1 skips "
    "the unconditional pass.",
)
SAMPLER = typer.Option(
    None,
    "--sampler",
    help="Default: euler_a (flow models: euler). One of: "
    + "; ".join(f"{k}: {v}" for k, v in SAMPLER_HELP.items()),
)
SCHEDULER = typer.Option("auto", "--scheduler", help="Sigma spacing: " + SCHEDULER_HELP)
BATCH_SIZE = typer.Option(1, "--batch-size", "-b", help="Images rendered together in one batch.")
NUM_IMAGES = typer.Option(1, "--num-images", "-N", help="Images to make (seeds seed..seed+N-1).")
MODEL = typer.Option(
    None, "--model", "-m", help="Checkpoint (.safetensors); default: the embedded model."
)
OUT = typer.Option(Path("outputs"), "--out", "-o", help="Output folder (created if missing).")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
DTYPE = typer.Option("auto", "--dtype", help=DTYPE_HELP)
INPAINT_STRENGTH = typer.Option(
    1.0,
    "--strength",
    help="Denoising strength in the masked area: 1 paints it anew from noise, lower values "
    "start from the image there.",
)
MASK_BLUR = typer.Option(
    4,
    "--mask-blur",
    help="Gaussian blur of the mask in pixels; the result is blended into the original "
    "through the blurred mask.",
)


def _notice(message: str) -> None:
    print(message, file=sys.stderr)


def _base(
    prompt, negative_prompt, steps, cfg, seed, sampler, scheduler, performance, controls, guidance
):
    from ldm_cli.pipeline.tasks.img2img import base_request

    return base_request(
        prompt,
        negative_prompt,
        steps=steps,
        cfg=cfg,
        seed=seed,
        sampler=sampler,
        scheduler=scheduler,
        guidance=guidance,
        **performance.speedups(),
        **controls,
    )


def img2img(
    image: Path = IMAGE,
    prompt: str = PROMPT,
    strength: float = typer.Option(
        0.75,
        "--strength",
        help="Denoising strength: 0 returns the image through the VAE, 1 ignores it.",
    ),
    negative_prompt: str = NEGATIVE,
    steps: int | None = STEPS,
    cfg: float | None = CFG,
    seed: int | None = SEED,
    sampler: str | None = SAMPLER,
    scheduler: str = SCHEDULER,
    batch_size: int = BATCH_SIZE,
    num_images: int = NUM_IMAGES,
    model: Path | None = MODEL,
    out: Path = OUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: list[str] = LORA,
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
    use_compile: bool = COMPILE,
    cuda_graphs: bool = CUDA_GRAPHS,
    offload: str = OFFLOAD,
    low_memory: bool | None = LOW_MEMORY,
    preview: Path | None = PREVIEW,
    preview_every: int = PREVIEW_EVERY,
    vae_tiling: str = VAE_TILING,
    deep_cache: int = DEEP_CACHE,
    token_merging: float = TOKEN_MERGING,
    control: list[Path] = CONTROL,
    control_image: list[Path] = CONTROL_IMAGE,
    preprocess: list[str] = PREPROCESS,
    control_weight: list[float] = CONTROL_WEIGHT,
    control_start: list[float] = CONTROL_START,
    control_end: list[float] = CONTROL_END,
    control_mode: str = CONTROL_MODE,
    guidance: float | None = GUIDANCE,
    vae: Path | None = VAE_FILE,
    clip_l: Path | None = CLIP_L_FILE,
    clip_g: Path | None = CLIP_G_FILE,
    t5: Path | None = T5_FILE,
) -> None:
    """Redraw an image towards a prompt and write PNGs with their parameters embedded."""
    check_options(sampler, scheduler, steps, batch_size, num_images, device, dtype, seed)
    performance = Performance.checked(
        model, compile=use_compile, offload=offload, preview=preview, preview_every=preview_every,
        vae_tiling=vae_tiling, deep_cache=deep_cache, token_merging=token_merging,
        low_memory=low_memory, cuda_graphs=cuda_graphs,
        parts=part_files(vae, clip_l, clip_g, t5),
    )  # fmt: skip
    controls = control_options(
        control, control_image, preprocess, control_weight, control_start, control_end,
        control_mode,
    )  # fmt: skip
    _check_image_options(strength)
    from ldm_cli.core.image_inputs import load_image

    picture = load_image(image)

    from ldm_cli.pipeline.tasks.img2img import iter_img2img

    pipe = performance.load(model, device, dtype)
    configure(pipe, lora, lora_dir, embeddings)  # LoRA and textual inversion
    base = _base(
        prompt,
        negative_prompt,
        steps,
        cfg,
        seed,
        sampler,
        scheduler,
        performance,
        controls,
        guidance,
    )
    check_control_files(pipe, replace(base, width=picture.width, height=picture.height))

    def results(on_step):
        return iter_img2img(
            pipe,
            picture,
            base,
            strength=strength,
            num_images=num_images,
            batch_size=batch_size,
            progress=on_step,
            notice=_notice,
            release=True,  # nothing renders after this command's last batch
        )

    save_all(results, num_images, out)


def inpaint(
    image: Path = IMAGE,
    mask: Path = typer.Argument(
        ..., help="Mask of the same size as the image: white = repaint, black = keep."
    ),
    prompt: str = PROMPT,
    strength: float = INPAINT_STRENGTH,
    mask_blur: int = MASK_BLUR,
    full_res: bool = typer.Option(
        False,
        "--inpaint-full-res",
        help="Work on a box around the mask scaled to the working size (--width x --height), "
        "then scale it back and paste it (A1111's 'only masked').",
    ),
    full_res_padding: int = typer.Option(
        32, "--inpaint-full-res-padding", help="Pixels added around the mask's box."
    ),
    width: int | None = typer.Option(
        None, "--width", "-W", help="Working width of --inpaint-full-res (default: native)."
    ),
    height: int | None = typer.Option(
        None, "--height", "-H", help="Working height of --inpaint-full-res (default: native)."
    ),
    negative_prompt: str = NEGATIVE,
    steps: int | None = STEPS,
    cfg: float | None = CFG,
    seed: int | None = SEED,
    sampler: str | None = SAMPLER,
    scheduler: str = SCHEDULER,
    batch_size: int = BATCH_SIZE,
    num_images: int = NUM_IMAGES,
    model: Path | None = MODEL,
    out: Path = OUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: list[str] = LORA,
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
    use_compile: bool = COMPILE,
    cuda_graphs: bool = CUDA_GRAPHS,
    offload: str = OFFLOAD,
    low_memory: bool | None = LOW_MEMORY,
    preview: Path | None = PREVIEW,
    preview_every: int = PREVIEW_EVERY,
    vae_tiling: str = VAE_TILING,
    deep_cache: int = DEEP_CACHE,
    token_merging: float = TOKEN_MERGING,
    control: list[Path] = CONTROL,
    control_image: list[Path] = CONTROL_IMAGE,
    preprocess: list[str] = PREPROCESS,
    control_weight: list[float] = CONTROL_WEIGHT,
    control_start: list[float] = CONTROL_START,
    control_end: list[float] = CONTROL_END,
    control_mode: str = CONTROL_MODE,
    guidance: float | None = GUIDANCE,
    vae: Path | None = VAE_FILE,
    clip_l: Path | None = CLIP_L_FILE,
    clip_g: Path | None = CLIP_G_FILE,
    t5: Path | None = T5_FILE,
) -> None:
    """Repaint the white part of a mask; pixels the blurred mask leaves out stay exactly."""
    check_options(sampler, scheduler, steps, batch_size, num_images, device, dtype, seed)
    performance = Performance.checked(
        model, compile=use_compile, offload=offload, preview=preview, preview_every=preview_every,
        vae_tiling=vae_tiling, deep_cache=deep_cache, token_merging=token_merging,
        low_memory=low_memory, cuda_graphs=cuda_graphs,
        parts=part_files(vae, clip_l, clip_g, t5),
    )  # fmt: skip
    controls = control_options(
        control, control_image, preprocess, control_weight, control_start, control_end,
        control_mode,
    )  # fmt: skip
    _check_image_options(strength, mask_blur, full_res_padding)
    check_side(width, "--width")
    check_side(height, "--height")
    from ldm_cli.core.errors import UserError

    if (width is not None or height is not None) and not full_res:
        raise UserError("--width/--height set the working size of --inpaint-full-res only")
    if full_res and controls:
        raise UserError("--control does not work with --inpaint-full-res yet; leave one out")
    import numpy as np

    from ldm_cli.core.image_inputs import load_image, load_mask
    from ldm_cli.pipeline.tasks.inpaint_regions import mask_box

    picture = load_image(image)
    stencil = load_mask(mask, picture)
    mask_box(np.asarray(stencil))  # an empty mask is refused before the model loads

    from ldm_cli.pipeline.tasks.inpaint import InpaintOptions

    options = InpaintOptions(strength, mask_blur, full_res, full_res_padding, width, height)
    base = _base(
        prompt,
        negative_prompt,
        steps,
        cfg,
        seed,
        sampler,
        scheduler,
        performance,
        controls,
        guidance,
    )
    _inpaint_and_save(
        picture, stencil, base, options, num_images, batch_size, model, device, dtype, out,
        networks=(lora, lora_dir, embeddings), performance=performance,
    )  # fmt: skip


def outpaint(
    image: Path = IMAGE,
    prompt: str = PROMPT,
    left: int = typer.Option(0, "--left", help="Pixels to add on the left."),
    right: int = typer.Option(0, "--right", help="Pixels to add on the right."),
    top: int = typer.Option(0, "--top", help="Pixels to add at the top."),
    bottom: int = typer.Option(0, "--bottom", help="Pixels to add at the bottom."),
    strength: float = INPAINT_STRENGTH,
    mask_blur: int = MASK_BLUR,
    negative_prompt: str = NEGATIVE,
    steps: int | None = STEPS,
    cfg: float | None = CFG,
    seed: int | None = SEED,
    sampler: str | None = SAMPLER,
    scheduler: str = SCHEDULER,
    batch_size: int = BATCH_SIZE,
    num_images: int = NUM_IMAGES,
    model: Path | None = MODEL,
    out: Path = OUT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: list[str] = LORA,
    lora_dir: Path = LORA_DIR,
    embeddings: Path | None = EMBEDDINGS,
    use_compile: bool = COMPILE,
    cuda_graphs: bool = CUDA_GRAPHS,
    offload: str = OFFLOAD,
    low_memory: bool | None = LOW_MEMORY,
    preview: Path | None = PREVIEW,
    preview_every: int = PREVIEW_EVERY,
    vae_tiling: str = VAE_TILING,
    deep_cache: int = DEEP_CACHE,
    token_merging: float = TOKEN_MERGING,
    control: list[Path] = CONTROL,
    control_image: list[Path] = CONTROL_IMAGE,
    preprocess: list[str] = PREPROCESS,
    control_weight: list[float] = CONTROL_WEIGHT,
    control_start: list[float] = CONTROL_START,
    control_end: list[float] = CONTROL_END,
    control_mode: str = CONTROL_MODE,
    guidance: float | None = GUIDANCE,
    vae: Path | None = VAE_FILE,
    clip_l: Path | None = CLIP_L_FILE,
    clip_g: Path | None = CLIP_G_FILE,
    t5: Path | None = T5_FILE,
) -> None:
    """Grow the canvas (new borders start as repeated edge pixels) and paint the new area."""
    check_options(sampler, scheduler, steps, batch_size, num_images, device, dtype, seed)
    performance = Performance.checked(
        model, compile=use_compile, offload=offload, preview=preview, preview_every=preview_every,
        vae_tiling=vae_tiling, deep_cache=deep_cache, token_merging=token_merging,
        low_memory=low_memory, cuda_graphs=cuda_graphs,
        parts=part_files(vae, clip_l, clip_g, t5),
    )  # fmt: skip
    controls = control_options(
        control, control_image, preprocess, control_weight, control_start, control_end,
        control_mode,
    )  # fmt: skip
    _check_image_options(strength, mask_blur)
    from ldm_cli.pipeline.tasks.inpaint_regions import outpaint_inputs

    canvas, stencil, extra = outpaint_inputs(image, left, right, top, bottom)

    from ldm_cli.pipeline.tasks.inpaint import InpaintOptions

    options = InpaintOptions(strength, mask_blur)
    base = _base(
        prompt,
        negative_prompt,
        steps,
        cfg,
        seed,
        sampler,
        scheduler,
        performance,
        controls,
        guidance,
    )
    _inpaint_and_save(
        canvas, stencil, base, options, num_images, batch_size, model, device, dtype, out, extra,
        networks=(lora, lora_dir, embeddings), performance=performance,
    )  # fmt: skip


def _inpaint_and_save(
    picture, stencil, base, options, num_images, batch_size, model, device, dtype, out, extra=None,
    networks=None, performance=None,
) -> None:  # fmt: skip
    from ldm_cli.pipeline.tasks.inpaint import iter_inpaint

    pipe = (performance or Performance()).load(model, device, dtype)
    if networks is not None:
        configure(pipe, *networks)  # LoRA and textual inversion
    check_control_files(pipe, replace(base, width=picture.width, height=picture.height))

    def results(on_step):
        return iter_inpaint(
            pipe,
            picture,
            stencil,
            base,
            options,
            num_images=num_images,
            batch_size=batch_size,
            progress=on_step,
            notice=_notice,
            extra=extra,
            release=True,  # nothing renders after this command's last batch
        )

    save_all(results, num_images, out)


MAX_MASK_BLUR = 256  # pixels; A1111 offers up to 64


def _check_image_options(strength: float, mask_blur: int = 0, padding: int = 0) -> None:
    """Option checks that run before torch is imported, so bad input fails fast."""
    from ldm_cli.core.errors import UserError

    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1, got {strength}")
    if not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise UserError(f"--mask-blur must be between 0 and {MAX_MASK_BLUR}, got {mask_blur}")
    if not 0 <= padding <= MAX_SIDE:
        raise UserError(
            f"--inpaint-full-res-padding must be between 0 and {MAX_SIDE}, got {padding}"
        )
