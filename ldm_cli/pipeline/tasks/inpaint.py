"""Inpainting and outpainting (white in the mask = repaint).

- 9-channel inpainting checkpoints get cat([noisy latents, mask, masked-image latents]) at
  every U-Net call, in the order of the original and diffusers, with the mask binarised at 0.5
  and the masked image `image * (mask < 0.5)`.
- Ordinary 4-channel checkpoints inpaint by latent blending at every denoiser call, ComfyUI's
  way (`image_start.keep_outside_mask`). A latent cell is repainted when any of its pixels is.
- The mask is blurred by `mask_blur` pixels (Gaussian), binarised for the model, and the result
  is pasted back with the blurred mask as alpha: `original * (1 - m) + generated * m`, so
  every pixel where the blurred mask is 0 equals the input exactly.
- `full_res` ("only masked" in A1111): a box around the mask, padded by `full_res_padding` px
  and widened to the working size's aspect ratio, is cut out, scaled to the working size,
  inpainted, scaled back (Lanczos) and pasted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ldm_cli.core.image_inputs import (
    ImageInput,
    blur_mask,
    composite,
    load_image,
    load_mask,
    pad_to,
    padded_size,
    size_notice,
    to_pixels,
)
from ldm_cli.core.pngmeta import format_number
from ldm_cli.pipeline.base import Pipeline, Progress
from ldm_cli.pipeline.image_start import ImageStart, first_step
from ldm_cli.pipeline.latents import Prepare, encode_latents, inpaint_concat, start_noise
from ldm_cli.pipeline.request import Request, seeded_batches
from ldm_cli.pipeline.tasks.img2img import Notice, Pair, base_request, check_strength
from ldm_cli.pipeline.tasks.inpaint_regions import Box, crop_box, mask_box, outpaint_inputs


@dataclass(frozen=True)
class InpaintOptions:
    strength: float = 1.0
    mask_blur: int = 4
    full_res: bool = False
    full_res_padding: int = 32
    # working size of full_res (default: the model's native size)
    width: int | None = None
    height: int | None = None

    def parameters(self) -> dict[str, str]:
        """The A1111 infotext keys of these options."""
        extra = {
            "Denoising strength": format_number(self.strength),
            "Mask blur": str(self.mask_blur),
        }
        if self.full_res:
            extra["Inpaint area"] = "Only masked"
            extra["Masked area padding"] = str(self.full_res_padding)
        return extra


@dataclass(frozen=True)
class InpaintPlan:
    """What the model works on, and how its output goes back into the original."""

    original: Image.Image
    alpha: np.ndarray  # blurred mask at the original size, in [0, 1]
    box: Box | None  # the full-res region; None when the whole image is worked on
    work_image: Image.Image
    work_mask: np.ndarray  # blurred mask at the working size

    def finish(self, generated: Image.Image) -> Image.Image:
        if self.box is None:
            full = generated.crop((0, 0, *self.original.size))
        else:
            left, top, right, bottom = self.box
            scaled = generated.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
            full = self.original.copy()
            full.paste(scaled, (left, top))
        return composite(self.original, full, self.alpha)


def plan_inpaint(
    image: Image.Image, mask: Image.Image, multiple: int, options: InpaintOptions
) -> InpaintPlan:
    alpha = blur_mask(mask, options.mask_blur)
    if not options.full_res:
        mask_box(alpha)  # refuses an empty mask
        width, height = padded_size(*image.size, multiple)
        work_mask = np.pad(alpha, ((0, height - image.height), (0, width - image.width)))
        return InpaintPlan(image, alpha, None, pad_to(image, width, height), work_mask)
    width, height = options.width, options.height
    box = crop_box(alpha, options.full_res_padding, width, height)
    work_image = image.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    cropped = Image.fromarray(np.ascontiguousarray(alpha[box[1] : box[3], box[0] : box[2]]))
    work_mask = np.asarray(cropped.resize((width, height), Image.Resampling.BILINEAR))
    return InpaintPlan(image, alpha, box, work_image, work_mask)


def render_inpaint(
    pipe: Pipeline,
    requests: list[Request],
    image: Image.Image,
    mask: np.ndarray,
    strength: float,
    progress: Progress | None = None,
    last: bool = False,
) -> Iterator[Pair]:
    """One batch over `image` (RGB, the requests' size); `mask` >= 0.5 is repainted, through
    the pipeline's one render path. `last`: as in `Pipeline.render`."""
    check_strength(strength)
    return pipe.render(requests, progress, last, masked_start(image, mask, strength))


def masked_start(image: Image.Image, mask: np.ndarray, strength: float) -> Prepare:
    """Inpainting's start: the image's posterior samples, then the start noise; a 9-channel
    model gets the mask and the masked image's latents, any other keeps the unmasked latents
    at every step (a mask at latent resolution, any pixel of a cell to repaint)."""

    def prepare(pipe, head: Request, gens: list[torch.Generator]):
        skip = first_step(head.steps, strength, pipe.is_flow)
        pixels = to_pixels([image])
        binary = torch.from_numpy(np.ascontiguousarray(mask >= 0.5)).float()[None, None]
        latents = None
        if skip > 0 or not pipe.is_inpainting:
            latents = encode_latents(pipe, pixels, gens)
        noise = start_noise(pipe, head, gens)
        if pipe.is_inpainting:
            concat = inpaint_concat(pipe, pixels, binary, gens)
            return noise, ImageStart(latents, skip, concat=concat)
        repaint = torch.nn.functional.max_pool2d(binary, pipe.latent_factor)
        return noise, ImageStart(latents, skip, keep=(1 - repaint).to(pipe.device))

    return prepare


def iter_inpaint(
    pipe: Pipeline,
    image: ImageInput,
    mask: ImageInput,
    base: Request,
    options: InpaintOptions,
    *,
    num_images: int = 1,
    batch_size: int = 1,
    progress: Progress | None = None,
    notice: Notice | None = None,
    extra: dict[str, str] | None = None,
    release: bool = False,
) -> Iterator[Pair]:
    """Images k = 0..num_images-1 (seed + k), each carrying its A1111 parameters text.
    `release`: as in `iter_img2img`."""
    check_strength(options.strength)
    base = pipe.with_defaults(base)
    image = load_image(image)
    mask = load_mask(mask, image)
    if options.full_res:
        size = pipe.config.default_size
        width = size if options.width is None else options.width
        options = replace(
            options, width=width, height=size if options.height is None else options.height
        )
        pipe.validate(replace(base, width=options.width, height=options.height))
    elif notice and (message := size_notice(*image.size, pipe.size_multiple)):
        notice(message)
    plan = plan_inpaint(image, mask, pipe.size_multiple, options)
    base = replace(base, width=plan.work_image.width, height=plan.work_image.height)
    pipe.validate(base)
    parameters = {**options.parameters(), **(extra or {})}
    batches = seeded_batches(base, num_images, batch_size)
    for i, batch in enumerate(batches):
        last = release and i == len(batches) - 1
        for req, generated in render_inpaint(
            pipe, batch, plan.work_image, plan.work_mask, options.strength, progress, last
        ):
            result = plan.finish(generated)
            # the image's size (not the padded one); "only masked" names its working size as A1111
            shown = (
                req if options.full_res else replace(req, width=result.width, height=result.height)
            )
            result.info["parameters"] = pipe.parameters_text(shown, parameters)
            yield req, result


def inpaint(
    pipe: Pipeline,
    image: ImageInput,
    mask: ImageInput,
    prompt: str,
    negative_prompt: str = "",
    *,
    strength: float = 1.0,
    mask_blur: int = 4,
    full_res: bool = False,
    full_res_padding: int = 32,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    batch_size: int = 1,
    progress: Progress | None = None,
    **settings,
) -> list[Image.Image]:
    """Repaint the white part of `mask` in `image` (paths or PIL images) towards `prompt`.

    `width`/`height` are the working size of `full_res` (default: the model's native size).
    `settings` are `steps`, `cfg`, `seed`, `sampler` and `scheduler` as in `Pipeline.generate`.
    """
    options = InpaintOptions(strength, mask_blur, full_res, full_res_padding, width, height)
    base = base_request(prompt, negative_prompt, **settings)
    pairs = iter_inpaint(
        pipe,
        image,
        mask,
        base,
        options,
        num_images=num_images,
        batch_size=batch_size,
        progress=progress,
    )
    return [result for _, result in pairs]


def outpaint(
    pipe: Pipeline,
    image: ImageInput,
    prompt: str,
    negative_prompt: str = "",
    *,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    strength: float = 1.0,
    mask_blur: int = 4,
    num_images: int = 1,
    batch_size: int = 1,
    progress: Progress | None = None,
    **settings,
) -> list[Image.Image]:
    """Grow the canvas by the given pixels on each side and paint the new area."""
    canvas, mask, extra = outpaint_inputs(image, left, right, top, bottom)
    base = base_request(prompt, negative_prompt, **settings)
    pairs = iter_inpaint(
        pipe,
        canvas,
        mask,
        base,
        InpaintOptions(strength, mask_blur),
        num_images=num_images,
        batch_size=batch_size,
        progress=progress,
        extra=extra,
    )
    return [result for _, result in pairs]
