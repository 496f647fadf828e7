"""An A1111 txt2img or img2img request as the work a device worker does: the same calls
`ldm generate` and `ldm img2img` / `ldm inpaint` make (Pipeline.request and seeded batches,
iter_img2img, iter_inpaint), so the same settings give the same pixels.

Everything that needs no model is checked here, in the request's thread, so a bad field is a
400 before the job waits in the queue; what needs the model (sizes, LoRA files) is checked by
the pipeline when the job runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageOps

from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import as_mask, as_rgb
from ldm_cli.core.limits import check_count, check_seed, check_side, check_steps, random_seed
from ldm_cli.networks.tags import parse_tags
from ldm_cli.server.controlnet_args import control_units
from ldm_cli.server.images import decode_image
from ldm_cli.server.sampling_names import sampler_and_scheduler, sampler_eta
from ldm_cli.server.schemas import Img2ImgRequest, Processing, Txt2ImgRequest

# what the pipeline's render yields: (request, image with its "parameters" text)
Run = Callable[..., Iterator[tuple]]
MAX_MASK_BLUR = 256  # pixels, as `ldm inpaint --mask-blur`
HIRES_UPSCALERS = {"lanczos": "Lanczos", "ldm-sr": "ldm-sr"}


@dataclass
class Work:
    """What a worker runs: `run(pipe, on_step)` yields (request, image) pairs; `model` is the
    checkpoint it wants (None: the server's current one)."""

    kind: str
    run: Run
    images: int
    batches: int
    model: str | None = None


def _common(body: Processing) -> dict:
    """The fields both tasks share, as ldm's request options; checked."""
    check_count(body.batch_size, "batch_size")
    check_count(body.n_iter, "n_iter")
    count = body.batch_size * body.n_iter
    check_count(count, "batch_size * n_iter")
    seed = random_seed() if body.seed == -1 else body.seed
    check_seed(seed, count, name="seed")
    check_steps(body.steps, "steps")
    check_side(body.width, "width")
    check_side(body.height, "height")
    for name in ("prompt", "negative_prompt"):
        for tag in parse_tags(getattr(body, name))[1]:
            if any(part in tag.name for part in ("/", "\\", "..")) or Path(tag.name).is_absolute():
                raise UserError(f"{name}: <lora:{tag.name}> must name a file in the LoRA folder")
    sampler, scheduler = sampler_and_scheduler(
        body.sampler_name or body.sampler_index, body.scheduler
    )
    return {
        "steps": body.steps, "cfg": body.cfg_scale, "seed": seed, "sampler": sampler,
        "scheduler": scheduler, "eta": sampler_eta(sampler, body.eta),
    }  # fmt: skip


def _guidance(pipe, body: Processing) -> float | None:
    """Forge's `distilled_cfg_scale` where the model takes one (FLUX dev); Forge's clients send
    it for every model."""
    return body.distilled_cfg_scale if getattr(pipe, "takes_guidance", False) else None


def _model_override(body: Processing) -> str | None:
    settings = body.override_settings or {}
    name = settings.get("sd_model_checkpoint")
    if name is not None and not isinstance(name, str):
        raise UserError("override_settings.sd_model_checkpoint must be text")
    return name or None


def txt2img_work(body: Txt2ImgRequest, control_dir: Path | None) -> Work:
    """`ldm generate PROMPT -N batch_size*n_iter -b batch_size ...` as work."""
    options = _common(body)
    control, mode = control_units(body.alwayson_scripts, control_dir, None)
    hires = _hires(body) if body.enable_hr else None
    count = body.batch_size * body.n_iter

    def run(pipe, on_step):
        from ldm_cli.pipeline.request import seeded_batches

        req = pipe.request(
            body.prompt, body.negative_prompt, width=body.width, height=body.height,
            control=control or None, control_mode=mode, guidance=_guidance(pipe, body),
            **options,
        )  # fmt: skip
        for batch in seeded_batches(req, count, body.batch_size):
            yield from pipe.render_text_to_image(batch, on_step, hires)

    return Work("txt2img", run, count, body.n_iter, _model_override(body))


def _hires(body: Txt2ImgRequest):
    from ldm_cli.pipeline.tasks.hires import UPSCALER, HiresFix

    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        scale = max(body.hr_resize_x / body.width, body.hr_resize_y / body.height)
    upscaler = HIRES_UPSCALERS.get((body.hr_upscaler or "").lower(), UPSCALER)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    try:
        return HiresFix(scale, strength, body.hr_second_pass_steps or None, upscaler)
    except UserError as error:
        raise UserError(f"enable_hr: {error}") from None


def img2img_work(body: Img2ImgRequest, control_dir: Path | None) -> Work:
    """`ldm img2img` (or `ldm inpaint` when `mask` is given) as work."""
    options = _common(body)
    if not body.init_images:
        raise UserError("init_images: give at least one base64 image")
    strength = body.denoising_strength
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"denoising_strength must be between 0 and 1, got {strength}")
    picture = as_rgb(decode_image(body.init_images[0], "init_images[0]"))
    mask = None
    if body.mask:
        mask = decode_image(body.mask, "mask")
        if mask.size != picture.size:
            raise UserError(
                f"mask: it is {mask.width}x{mask.height} but the image is "
                f"{picture.width}x{picture.height}; they must be the same size"
            )
    full_res = mask is not None and body.inpaint_full_res
    if not full_res:  # A1111 resizes the input to the size asked for
        picture = _resized(picture, body.width, body.height, body.resize_mode)
        mask = None if mask is None else _resized(mask, body.width, body.height, body.resize_mode)
    control, mode = control_units(body.alwayson_scripts, control_dir, picture)
    count = body.batch_size * body.n_iter
    eta = options.pop("eta")
    if mask is None:
        return Work(
            "img2img", _img2img_run(body, options, control, mode, eta, picture, count),
            count, body.n_iter, _model_override(body),
        )  # fmt: skip
    mask = as_mask(mask)
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    if not 0 <= blur <= MAX_MASK_BLUR:
        raise UserError(f"mask_blur must be between 0 and {MAX_MASK_BLUR}, got {blur}")
    if not 0 <= body.inpaint_full_res_padding <= 16384:
        raise UserError("inpaint_full_res_padding must be between 0 and 16384")
    from ldm_cli.pipeline.tasks.inpaint import InpaintOptions

    inpaint = InpaintOptions(
        strength, blur, full_res, body.inpaint_full_res_padding,
        body.width if full_res else None, body.height if full_res else None,
    )  # fmt: skip

    def run(pipe, on_step):
        from ldm_cli.pipeline.tasks.inpaint import iter_inpaint

        base = _image_request(pipe, body, options, control, mode, eta)
        yield from iter_inpaint(
            pipe, picture, mask, base, inpaint, num_images=count, batch_size=body.batch_size,
            progress=on_step,
        )  # fmt: skip

    return Work("inpaint", run, count, body.n_iter, _model_override(body))


def _img2img_run(body, options, control, mode, eta, picture, count) -> Run:
    def run(pipe, on_step):
        from ldm_cli.pipeline.tasks.img2img import iter_img2img

        base = _image_request(pipe, body, options, control, mode, eta)
        yield from iter_img2img(
            pipe, picture, base, strength=body.denoising_strength, num_images=count,
            batch_size=body.batch_size, progress=on_step,
        )  # fmt: skip

    return run


def _image_request(pipe, body: Img2ImgRequest, options: dict, control, mode: str, eta):
    """The request img2img and inpainting start from, as `ldm img2img`/`ldm inpaint` build it."""
    from ldm_cli.pipeline.tasks.img2img import base_request

    base = base_request(
        body.prompt, body.negative_prompt, control=control or None, control_mode=mode, **options
    )
    return replace(base, eta=eta, guidance=_guidance(pipe, body))


def _resized(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize modes: 1 crops to the aspect ratio then resizes; the others (0 "just
    resize", 2 "resize and fill", 3 "latent upscale") resize (docs/serve.md)."""
    if image.size == (width, height):
        return image
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    return image.resize((width, height), Image.Resampling.LANCZOS)
