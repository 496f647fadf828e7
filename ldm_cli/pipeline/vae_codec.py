"""Tiled VAE decode and encode: memory bounded by the tile size, not the image's.

A latent is decoded in overlapping tiles of TILE x TILE latent cells (512 x 512 px for SD's
f=8 VAE) that share at least OVERLAP cells (128 px) with their neighbours; an image is encoded
in the matching pixel tiles. The tiles are laid out and blended by `ldm_cli.core.tiling`: each
result is weighted by ramps rising across its interior overlaps and written at once into one
preallocated sum and weight buffer, so only one tile's activations are alive at a time. An
untiled SD 1.5 decode (fp32) grows the process by 0.93 GiB at 512 x 512 px (measured), and
that grows with the pixel count: some 15 GiB at 2048 x 2048 px, where a tiled decode needs one
tile's 0.93 GiB plus 0.1 GiB of output buffers (`python -m ldm_cli.bench.vae_2048`).

The decoder's GroupNorms and mid-block attention are global: in a tile they see that tile
only, so a tiled result differs slightly from the untiled one (with trained weights, mostly
slight shifts of colour and contrast from tile to tile, faded across the overlaps). A single
tile covering the whole input gives exactly the untiled result, so images no larger than one
tile are never changed by tiling.

Modes (`--vae-tiling`, `Pipeline.vae_tiling`): "auto" tiles images of more than
AUTO_MAX_PIXELS (1024 x 1024) pixels, "on" tiles every image larger than one tile, "off" none.
The native sizes of all supported models (512, 768, SDXL's 1024) are so untiled under "auto".
PNGs record "VAE tiling: on" (or "auto": the mode, so that --from-png tiles the same decodes)
when an image went through more than one tile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ldm_cli.core.errors import UserError
from ldm_cli.core.tiling import Blender, Tile, tile_grid
from ldm_cli.models.vae import AutoencoderKL, DiagonalGaussian
from ldm_cli.pipeline.parts import PipelineParts
from ldm_cli.pipeline.request import Request

MODES = ("auto", "on", "off")
# Untiled, an SD 1.5 decode of 1024 x 1024 px already takes about 3.7 GiB (fp32; 4 x the 512 px
# measurement) and larger images take proportionally more, so "auto" tiles above this.
AUTO_MAX_PIXELS = 1024 * 1024
TILE = 64  # latent cells per tile side: 512 px for an f=8 VAE
OVERLAP = 16  # latent cells shared by neighbouring tiles: 128 px, the blending ramp
PARAMETER = "VAE tiling"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown VAE tiling {mode!r}; use auto, on or off")


def wants_tiling(mode: str, width: int, height: int) -> bool:
    """Whether a decode or encode of a width x height px image goes through tiles."""
    check_mode(mode)
    return mode == "on" or (mode == "auto" and width * height > AUTO_MAX_PIXELS)


def is_tiled(mode: str, width: int, height: int, factor: int, tile: int = TILE) -> bool:
    """Whether such an image is split into more than one tile (and so differs from untiled)."""
    return wants_tiling(mode, width, height) and max(width // factor, height // factor) > tile


def tiling_parameters(
    pipe: PipelineParts, req: Request, second_pass: tuple[int, int] | None = None
) -> dict[str, str]:
    """{"VAE tiling": mode} when an image of `req` (or of its hires pass, decoded at
    `second_pass`) was tiled."""
    if pipe.is_upscaler:  # tasks.upscale decodes per upscaling tile and records it itself
        return {}
    sizes = [(req.width, req.height)] + ([second_pass] if second_pass else [])
    return tiling_note(pipe, sizes)


def tiling_note(pipe: PipelineParts, sizes: Iterable[tuple[int, int]]) -> dict[str, str]:
    """{"VAE tiling": mode} when an image of any of these pixel sizes is split into tiles.

    The mode ("on" or "auto") is what --from-png needs to tile the same decodes again: a
    hires run's first pass may be tiled under "on" but not under "auto".
    """
    mode = pipe.vae_tiling
    f = pipe.latent_factor
    return {PARAMETER: mode} if any(is_tiled(mode, w, h, f) for w, h in sizes) else {}


def _crop(t: torch.Tensor, tile: Tile) -> torch.Tensor:
    left, top, right, bottom = tile.box
    return t[..., top:bottom, left:right]


@torch.inference_mode()
def decode_tiled(
    vae: AutoencoderKL, z: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP
) -> torch.Tensor:
    """`vae.decode(z)` for unscaled latents [B, C, h, w], tile by tile.

    Returns [B, out_ch, h * f, w * f] in float32 on the CPU (where the result is assembled).
    """
    b, _, h, w = z.shape
    f = vae.cfg.downscale
    # the batch is folded into the channels, so one Blender serves every image
    blender = Blender(b * vae.cfg.out_ch, w, h, f, overlap)
    for t in tile_grid(w, h, tile, overlap):
        blender.add(t, vae.decode(_crop(z, t)).flatten(0, 1))
    return blender.result().unflatten(0, (b, -1))


@torch.inference_mode()
def encode_tiled(
    vae: AutoencoderKL, x: torch.Tensor, tile: int = TILE, overlap: int = OVERLAP
) -> DiagonalGaussian:
    """`vae.encode(x)` for images [B, 3, H, W], by overlapping pixel tiles.

    Tiles are laid out in latent cells (H // f x W // f, the encoder's output size) and cut
    from the image at f times those coordinates; the tiles on the right and bottom edges also
    take the last H % f (W % f) pixels, as the whole-image encoder does. The posterior's
    moments (mean and log-variance) are blended, in the encoder's dtype and device.
    """
    b, _, height, width = x.shape
    f = vae.cfg.downscale
    h, w = height // f, width // f
    tiles = tile_grid(w, h, tile, overlap)
    if len(tiles) == 1:
        return vae.encode(x)
    channels = 2 * vae.cfg.embed_dim
    blender = Blender(b * channels, w, h, 1, overlap)
    dtype = device = None
    for t in tiles:
        left, top, right, bottom = (v * f for v in t.box)
        right = width if right == w * f else right
        bottom = height if bottom == h * f else bottom
        part = vae.quant_conv(vae.encoder(x[..., top:bottom, left:right]))
        dtype, device = part.dtype, part.device
        blender.add(t, part.flatten(0, 1))
        del part  # before the next tile's activations are allocated
    moments = blender.result().unflatten(0, (b, -1))
    return DiagonalGaussian(moments.to(device=device, dtype=dtype))


def tiled_decoder(
    pipe: PipelineParts, latents: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The decode function for `latents` under the pipeline's mode; None: `vae.decode`."""
    _, _, h, w = latents.shape
    f = pipe.latent_factor
    if not is_tiled(pipe.vae_tiling, w * f, h * f, f):
        return None
    return lambda z: decode_tiled(pipe.vae, z)


def decode_latents(pipe: PipelineParts, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> float32 images in about [-1, 1], checked to be finite
    (`numerics.decode_finite`), through tiles when the pipeline's mode asks for them."""
    from ldm_cli.core.numerics import decode_finite

    if pipe.tiny_vae is not None:  # TAESD takes the sampler's latents as they are
        return decode_finite(pipe.tiny_vae, latents, 1.0, pipe.dtype)
    decode = tiled_decoder(pipe, latents)
    vae = pipe.config.vae
    return decode_finite(
        pipe.vae,
        latents,
        vae.scale_factor,
        pipe.dtype,
        decode=decode,
        shift_factor=vae.shift_factor,
    )


def encode_pixels(pipe: PipelineParts, pixels: torch.Tensor) -> DiagonalGaussian:
    """The VAE posterior of images [B, 3, H, W] in [-1, 1] (already in the VAE's device and
    dtype), through tiles when the pipeline's mode asks for them."""
    _, _, height, width = pixels.shape
    if is_tiled(pipe.vae_tiling, width, height, pipe.latent_factor):
        return encode_tiled(pipe.vae, pixels)
    return pipe.vae.encode(pixels)
