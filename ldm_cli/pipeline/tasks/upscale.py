"""4x super-resolution with an SD x4 upscaler checkpoint, as StableDiffusionUpscalePipeline does.

For each image (seed s, one CPU generator seeded with s):

1. the low-resolution image in [-1, 1] is noised to `noise_level` with the noise augmentation's
   own DDPM schedule: sqrt(a) x + sqrt(1 - a) n, with n drawn first from the generator;
2. the latent start noise, of the low-resolution image's size, is drawn next (the f=4 VAE
   decodes those latents at 4x), then whatever a stochastic sampler draws;
3. every U-Net call sees cat([scaled latents, noised low-res image]) on channels and the noise
   level as its class label; CFG batches the unconditional and conditional rows;
4. the latents are decoded with the checkpoint's scale factor (0.08333 for the real model).

Inputs larger than `tile_size` are cut into overlapping tiles (`ldm_cli.core.tiling`); each tile
is sampled and decoded alone from the matching crops of the whole image's noise, and the
decoded tiles are blended with feathered weights, so memory depends on the tile size only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from PIL import Image

from ldm_cli.core.config import ScheduleConfig
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import (
    ImageInput,
    fit_to_multiple,
    load_image,
    size_notice,
    to_pixels,
)
from ldm_cli.core.tiling import Blender, Tile, check_tiling, tile_grid
from ldm_cli.pipeline.base import Pipeline, Progress
from ldm_cli.pipeline.image_start import ImageStart
from ldm_cli.pipeline.request import Request, seeded_batches
from ldm_cli.pipeline.tasks.color_fix import AUTO, COLOR_FIXES, gaussian_color_fix
from ldm_cli.pipeline.tasks.img2img import base_request
from ldm_cli.pipeline.vae_codec import tiling_note
from ldm_cli.samplers.schedules import DiscreteSchedule

# ImageConcatWithNoiseAugmentation in x4-upscaling.yaml (diffusers' low_res_scheduler).
LOW_RES_SCHEDULE = ScheduleConfig(beta_start=0.0001, beta_end=0.02)
MAX_NOISE_LEVEL = 350
DEFAULT_NOISE_LEVEL = 20
# In low-resolution pixels: 128 is the real model's training size (512 px out).
DEFAULT_TILE_SIZE = 128
OVERLAP_FRACTION = 8  # the default overlap: an eighth of the tile size
DEFAULT_SAMPLER = "ddim"  # the x4 upscaler's scheduler in diffusers

Notice = Callable[[str], None]


@dataclass(frozen=True)
class UpscaleOptions:
    noise_level: int = DEFAULT_NOISE_LEVEL
    tile_size: int = DEFAULT_TILE_SIZE  # 0: never tile
    tile_overlap: int | None = None  # None: tile_size // OVERLAP_FRACTION
    color_fix: str = "none"  # "gaussian": the low frequencies from the input (color_fix.py)

    @property
    def overlap(self) -> int:
        if self.tile_overlap is None:
            return self.tile_size // OVERLAP_FRACTION
        return self.tile_overlap

    def parameters(self, tiled: bool) -> dict[str, str]:
        extra = {"Noise level": str(self.noise_level)}
        if self.color_fix != "none":
            extra["Color fix"] = self.color_fix
        if tiled:
            extra["Tile size"] = str(self.tile_size)
            extra["Tile overlap"] = str(self.overlap)
        return extra


@dataclass(frozen=True)
class UpscaleStart(ImageStart):
    """The upscaler's extra U-Net inputs: `concat` is the noised low-res image [B, 3, h, w],
    `labels` its noise level [B] (integers), both repeated over the CFG-doubled batch."""

    labels: torch.Tensor | None = None

    def wrap_unet(self, unet_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        with_image = super().wrap_unet(unet_fn)
        labels = self.labels

        def call(z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
            y = labels.repeat(z.shape[0] // labels.shape[0])
            return with_image(z, t, y=y, **cond)

        return call


_LOW_RES_TABLE: dict[str, torch.Tensor] = {}


def low_res_alphas_cumprod() -> torch.Tensor:
    if "table" not in _LOW_RES_TABLE:
        _LOW_RES_TABLE["table"] = DiscreteSchedule(LOW_RES_SCHEDULE).alphas_cumprod
    return _LOW_RES_TABLE["table"]


def noise_augment(
    pixels: torch.Tensor, noise: torch.Tensor, level: int | torch.Tensor
) -> torch.Tensor:
    """Low-res images [B, 3, h, w] noised to `level`, one for all or one per image [B]
    (diffusers' DDPMScheduler.add_noise)."""
    a = low_res_alphas_cumprod()[level].to(pixels.device)
    if a.ndim:
        a = a.view(-1, 1, 1, 1)
    return a**0.5 * pixels + (1 - a) ** 0.5 * noise


def check_upscaler(pipe: Pipeline) -> None:
    if not pipe.is_upscaler:
        family = pipe.config.family
        raise UserError(f"{pipe.path.name} is not an x4 upscaler checkpoint (it is {family})")


def check_noise_level(level: int, num_classes: int | None = None) -> None:
    top = min(MAX_NOISE_LEVEL, (num_classes or MAX_NOISE_LEVEL + 1) - 1)
    if not 0 <= level <= top:
        raise UserError(f"noise level must be between 0 and {top}, got {level}")


def resolve_color_fix(pipe: Pipeline, color_fix: str) -> str:
    """ "auto": the Gaussian colour fix for the embedded x4 model, none for other checkpoints
    (diffusers' StableDiffusionUpscalePipeline has none)."""
    if color_fix == AUTO:
        from ldm_cli.core.embedded import is_embedded_upscaler

        return "gaussian" if is_embedded_upscaler(pipe.path) else "none"
    if color_fix not in COLOR_FIXES:
        choices = ", ".join((AUTO, *COLOR_FIXES))
        raise UserError(f"color fix must be one of {choices}, got {color_fix!r}")
    return color_fix


def unet_multiple(pipe: Pipeline) -> int:
    """Input images (and tiles) must be multiples of this: the U-Net's downsampling."""
    return 2 ** (len(pipe.config.unet.channel_mult) - 1)


@torch.inference_mode()
def decode_pixels(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """Decoded images [B, 3, H, W] in [0, 1], float32 on the CPU (`Pipeline.decode` before
    quantisation)."""
    from ldm_cli.pipeline.vae_codec import (
        decode_latents,
    )  # NaN/inf refused; a half VAE retried in fp32

    return (decode_latents(pipe, latents) / 2 + 0.5).clamp(0, 1).cpu()


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB PIL image, rounded as `Pipeline.decode` rounds."""
    array = (pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def sample_latents(
    pipe: Pipeline,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    noised: torch.Tensor,
    noise: torch.Tensor,
    level: int,
    generator: torch.Generator,
    req: Request,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Latents [1, C, h, w] for one (tile of a) noised low-res image [1, 3, h, w]."""
    labels = torch.tensor([level], dtype=torch.long, device=pipe.device)
    start = UpscaleStart(None, concat=noised.to(pipe.device), labels=labels)
    return pipe.sample(cond, uncond, noise, [generator], req, progress, start)


def upscale_pixels(
    pipe: Pipeline,
    pixels: torch.Tensor,
    req: Request,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    options: UpscaleOptions,
    progress: Progress | None = None,
) -> torch.Tensor:
    """One low-res image [1, 3, h, w] in [-1, 1] -> [3, h * f, w * f] in [0, 1]."""
    _, _, height, width = pixels.shape
    gen = torch.Generator("cpu").manual_seed(req.seed)
    image_noise = torch.randn(pixels.shape, generator=gen, dtype=torch.float32)
    latent_noise = torch.randn(
        (1, pipe.config.unet.out_channels, height, width), generator=gen, dtype=torch.float32
    )
    noised = noise_augment(pixels.float(), image_noise, options.noise_level)
    tiles = tile_grid(width, height, options.tile_size, options.overlap)
    blender = Blender(3, width, height, pipe.latent_factor, options.overlap)
    for k, tile in enumerate(tiles):
        latents = sample_latents(
            pipe,
            cond,
            uncond,
            _crop(noised, tile),
            _crop(latent_noise, tile),
            options.noise_level,
            gen,
            req,
            _tile_progress(progress, k, len(tiles)),
        )
        blender.add(tile, decode_pixels(pipe, latents)[0])
    if options.color_fix == "gaussian":
        return gaussian_color_fix(blender.result(), pixels)
    return blender.result()


def _crop(t: torch.Tensor, tile: Tile) -> torch.Tensor:
    left, top, right, bottom = tile.box
    return t[..., top:bottom, left:right]


def _tile_progress(progress: Progress | None, index: int, count: int) -> Progress | None:
    if progress is None:
        return None
    return lambda i, total: progress(index * total + i, count * total)


def iter_upscale(
    pipe: Pipeline,
    image: ImageInput,
    base: Request,
    options: UpscaleOptions = UpscaleOptions(),
    *,
    num_images: int = 1,
    progress: Progress | None = None,
    notice: Notice | None = None,
) -> Iterator[tuple[Request, Image.Image]]:
    """Images k = 0..num_images-1 (seed + k), each carrying its A1111 parameters text."""
    check_upscaler(pipe)
    check_noise_level(options.noise_level, pipe.config.unet.num_classes)
    options = replace(options, color_fix=resolve_color_fix(pipe, options.color_fix))
    multiple = unet_multiple(pipe)
    check_tiling(options.tile_size, options.overlap, multiple)
    if next(pipe.vae.parameters()).dtype == torch.float16:
        # x4-upscaling.yaml: "the decoder seems to break in half precision"; diffusers, too,
        # decodes in float32
        pipe.vae.float()
    picture = load_image(image)
    fitted = fit_to_multiple(picture, multiple)
    message = size_notice(*picture.size, multiple, scale=pipe.latent_factor)
    if message and notice:
        notice(message)
    f = pipe.latent_factor
    width, height = fitted.image.size
    base = replace(base, width=width * f, height=height * f)
    cond, uncond = pipe.conditioning([base])
    pixels = to_pixels([fitted.image])
    tiles = tile_grid(width, height, options.tile_size, options.overlap)
    extra = options.parameters(len(tiles) > 1)
    extra.update(tiling_note(pipe, [(tiles[0].width * f, tiles[0].height * f)]))  # each decode
    out_w, out_h = picture.width * f, picture.height * f
    for (req,) in seeded_batches(base, num_images, 1):  # one image (all its tiles) at a time
        result = upscale_pixels(pipe, pixels, req, cond, uncond, options, progress)
        result_image = to_image(result).crop((0, 0, out_w, out_h))
        shown = replace(req, width=out_w, height=out_h)
        result_image.info["parameters"] = pipe.parameters_text(shown, extra)
        yield shown, result_image


def upscale_request(
    pipe: Pipeline,
    prompt: str,
    negative_prompt: str,
    steps: int,
    cfg: float | None,
    seed: int | None,
    sampler: str,
    scheduler: str,
) -> Request:
    """The request every upscale starts from; `cfg` None is the checkpoint's own scale."""
    return base_request(
        prompt,
        negative_prompt,
        steps=steps,
        cfg=pipe.guidance_scale(cfg),
        seed=seed,
        sampler=sampler,
        scheduler=scheduler,
    )


def upscale(
    pipe: Pipeline,
    image: ImageInput,
    prompt: str = "",
    negative_prompt: str = "",
    *,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: int | None = None,
    num_images: int = 1,
    steps: int = 30,
    cfg: float | None = None,
    seed: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    scheduler: str = "auto",
    color_fix: str = AUTO,
    progress: Progress | None = None,
) -> list[Image.Image]:
    """`image` (a path or PIL image) at 4x its size, guided by `prompt`.

    `noise_level` (0..350) is how much noise the low-res image gets before the model sees it:
    more lets the model invent more detail and stray further from the input. Inputs wider or
    taller than `tile_size` pixels (0: never) are upscaled in tiles overlapping by
    `tile_overlap` pixels (default: an eighth of the tile size). `cfg` None is the
    checkpoint's own scale (`pipe.config.default_cfg`). `color_fix` "gaussian" takes the
    low frequencies from the input (`color_fix.py`); "auto" does so for the embedded x4 model
    only, "none" never.
    """
    base = upscale_request(pipe, prompt, negative_prompt, steps, cfg, seed, sampler, scheduler)
    options = UpscaleOptions(noise_level, tile_size, tile_overlap, color_fix)
    pairs = iter_upscale(pipe, image, base, options, num_images=num_images, progress=progress)
    return [result for _, result in pairs]
