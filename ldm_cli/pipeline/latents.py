"""What a render starts from besides noise: one CPU generator per image (seed + k), the start
noise, the VAE posterior samples of an input image, and the 9-channel inpainting model's extra
input (the mask and the masked image's latents, as diffusers builds it).

The order of the draws from each generator is part of the result: img2img and inpainting draw
the image's posterior sample first, then the start noise (diffusers' order); text-to-image
draws the noise first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm_cli.pipeline.image_start import ImageStart
from ldm_cli.pipeline.parts import PipelineParts
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.vae_codec import encode_pixels  # tiled when large


def generators(requests: list[Request]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(r.seed) for r in requests]


@torch.inference_mode()
def encode_latents(
    pipe: PipelineParts, pixels: torch.Tensor, gens: list[torch.Generator]
) -> torch.Tensor:
    """Scaled posterior samples [B, C, h, w] of `pixels` [1 or B, 3, H, W]; row i from gens[i].

    One encoder pass serves every generator; each sample's noise is drawn in float32
    on the CPU, so a seed gives the same latents on every device.
    """

    vae_dtype = next(pipe.vae.parameters()).dtype
    posterior = encode_pixels(pipe, pixels.to(pipe.device, vae_dtype))
    mean, std = posterior.mean.float(), posterior.std.float()
    rows = []
    for i, gen in enumerate(gens):
        row = min(i, mean.shape[0] - 1)
        noise = torch.randn(mean.shape[1:], generator=gen, dtype=torch.float32)
        rows.append(mean[row] + std[row] * noise.to(mean.device))
    vae = pipe.config.vae
    return (torch.stack(rows) - vae.shift_factor) * vae.scale_factor


def start_noise(pipe: PipelineParts, req: Request, gens: list[torch.Generator]) -> torch.Tensor:
    shape = pipe.latent_shape(req.width, req.height)
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])


@torch.inference_mode()
def inpaint_concat(
    pipe: PipelineParts, pixels: torch.Tensor, mask: torch.Tensor, gens: list[torch.Generator]
) -> torch.Tensor:
    """The 9-channel U-Net's extra input: cat([mask, masked-image latents]) as diffusers builds it.

    `mask` [1, 1, H, W] is binary (1 = repaint); the masked image is `pixels * (mask < 0.5)`
    and the mask reaches latent size by nearest-neighbour interpolation.
    """
    masked = pixels * (mask < 0.5)
    latents = encode_latents(pipe, masked, gens)
    small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])
    return torch.cat([small.to(latents.device).expand(len(gens), -1, -1, -1), latents], dim=1)


def blank_inpaint_start(
    pipe: PipelineParts, req: Request, gens: list[torch.Generator]
) -> ImageStart:
    """Plain generation with an inpainting checkpoint: the whole (gray) image is repainted."""
    pixels = torch.zeros(1, 3, req.height, req.width)
    mask = torch.ones(1, 1, req.height, req.width)
    return ImageStart(None, concat=inpaint_concat(pipe, pixels, mask, gens))


# What a batch starts from: (pipe, the batch's first request, a generator per image) ->
# (the start noise [B, C, h, w], the image start or None for plain text to image)
Prepare = Callable[
    [PipelineParts, Request, list[torch.Generator]], tuple[torch.Tensor, "ImageStart | None"]
]


def text_to_image_start(
    pipe: PipelineParts, head: Request, gens: list[torch.Generator]
) -> tuple[torch.Tensor, ImageStart | None]:
    """The noise first; an inpainting (9-channel) model repaints an all-white mask."""
    noise = start_noise(pipe, head, gens)
    return noise, blank_inpaint_start(pipe, head, gens) if pipe.is_inpainting else None
