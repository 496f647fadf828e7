"""Image to image: encode with the VAE, noise to the strength's sigma, denoise the rest.

Randomness follows diffusers' StableDiffusionImg2ImgPipeline with one CPU generator per image
(seed + k): the image latents are a *sample* of the VAE posterior drawn from that generator
(diffusers' `retrieve_latents(..., sample_mode="sample")`), then the start noise, then whatever
a stochastic sampler draws. With an inpainting (9-channel) checkpoint, the U-Net also gets an
all-white mask and the latents of an all-gray image, as A1111 does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import (
    ImageInput,
    fit_to_multiple,
    load_image,
    size_notice,
    to_pixels,
)
from ldm_cli.core.pngmeta import format_number
from ldm_cli.pipeline.base import Pipeline, Progress
from ldm_cli.pipeline.image_start import ImageStart, first_step
from ldm_cli.pipeline.latents import (
    Prepare,
    blank_inpaint_start,
    encode_latents,
    start_noise,
)
from ldm_cli.pipeline.request import Request, random_seed, seeded_batches

Notice = Callable[[str], None]
Pair = tuple[Request, Image.Image]


def base_request(
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int | None = None,  # None: the model's own (Pipeline.with_defaults)
    cfg: float | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    scheduler: str = "auto",
    deep_cache: int = 0,
    token_merging: float = 0.0,
    control=None,
    control_mode: str = "balanced",
    guidance: float | None = None,
) -> Request:
    """A request whose size the image decides later; `control`: ControlNets (ldm_cli.Control,
    one or several) and `control_mode` how they weigh against the prompt."""
    from ldm_cli.control.units import control_specs

    seed = random_seed() if seed is None else seed
    return Request(
        prompt, negative_prompt, steps, cfg, seed, sampler, scheduler, 0, 0,
        deep_cache=deep_cache, token_merging=token_merging,
        control=control_specs(control), control_mode=control_mode, guidance=guidance,
    )  # fmt: skip


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be between 0 and 1, got {strength}")


def render_img2img(
    pipe: Pipeline,
    requests: list[Request],
    images: list[Image.Image],
    strength: float,
    progress: Progress | None = None,
    last: bool = False,
) -> Iterator[Pair]:
    """One batch: requests[i] starts from images[i] (RGB, the requests' size), through the
    pipeline's one render path. `last`: as in `Pipeline.render`."""
    check_strength(strength)
    return pipe.render(requests, progress, last, image_start(images, strength))


def image_start(images: list[Image.Image], strength: float) -> Prepare:
    """img2img's start: the images' posterior samples (drawn first), noised to the strength's
    step, then the start noise; a 9-channel model also gets an all-white mask."""

    def prepare(pipe, head: Request, gens: list[torch.Generator]):
        skip = first_step(head.steps, strength, pipe.is_flow)
        latents = None
        if skip > 0:
            same = all(image is images[0] for image in images)
            latents = encode_latents(pipe, to_pixels(images[:1] if same else images), gens)
        noise = start_noise(pipe, head, gens)
        concat = blank_inpaint_start(pipe, head, gens).concat if pipe.is_inpainting else None
        return noise, ImageStart(latents, skip, concat)

    return prepare


def iter_img2img(
    pipe: Pipeline,
    image: ImageInput,
    base: Request,
    *,
    strength: float = 0.75,
    num_images: int = 1,
    batch_size: int = 1,
    progress: Progress | None = None,
    notice: Notice | None = None,
    release: bool = False,
) -> Iterator[Pair]:
    """Images k = 0..num_images-1 (seed + k), each carrying its A1111 parameters text.
    `release`: a one-shot run; the last batch gives the text encoder's and U-Net's memory back
    (`Pipeline.release`), so the pipeline cannot render again."""
    check_strength(strength)
    fitted = fit_to_multiple(load_image(image), pipe.size_multiple)
    message = size_notice(*fitted.size, pipe.size_multiple)
    if message and notice:
        notice(message)
    width, height = fitted.image.size
    base = pipe.with_defaults(replace(base, width=width, height=height))
    pipe.validate(base)
    extra = {"Denoising strength": format_number(strength)}
    batches = seeded_batches(base, num_images, batch_size)
    for i, batch in enumerate(batches):
        images = [fitted.image] * len(batch)
        last = release and i == len(batches) - 1
        for req, result in render_img2img(pipe, batch, images, strength, progress, last):
            result = fitted.restore(result)
            shown = replace(req, width=result.width, height=result.height)  # not the padded size
            result.info["parameters"] = pipe.parameters_text(shown, extra)
            yield req, result


def img2img(
    pipe: Pipeline,
    image: ImageInput,
    prompt: str,
    negative_prompt: str = "",
    *,
    strength: float = 0.75,
    num_images: int = 1,
    batch_size: int = 1,
    progress: Progress | None = None,
    **settings,
) -> list[Image.Image]:
    """Redraw `image` (a path or PIL image) towards `prompt`.

    strength 0 returns the VAE round trip, 1 ignores the image (plain generation). `settings`
    are `steps`, `cfg`, `seed`, `sampler`, `scheduler`, `deep_cache` and `token_merging` as in
    `Pipeline.generate`.
    """
    base = base_request(prompt, negative_prompt, **settings)
    pairs = iter_img2img(
        pipe,
        image,
        base,
        strength=strength,
        num_images=num_images,
        batch_size=batch_size,
        progress=progress,
    )
    return [result for _, result in pairs]
