"""The `--vae-tiling` option of `generate`, `img2img`, `inpaint`, `outpaint` and `upscale`.

torch is not imported here; the modes are those of ldm_cli.pipeline.vae_codec (tests check
they match).
"""

from __future__ import annotations

import typer

from ldm_cli.core.errors import UserError

VAE_TILING_MODES = ("auto", "on", "off")

VAE_TILING = typer.Option(
    "auto",
    "--vae-tiling",
    help="Decode (and encode) images with the VAE in overlapping tiles of 64x64 latent cells "
    "(512 px for SD), blended across 16 cells, so memory depends on the tile size, not the "
    "image's: an untiled SD decode needs about 1 GB per 512x512 px (some 15 GB at "
    "2048x2048), a tiled one about 1 GB at any size. auto: only images of more than 1024x1024 "
    "pixels, where the untiled decode passes 4 GB (no model's native size is tiled); on: "
    "every image larger than one tile; off: never. Tiled images differ slightly from untiled "
    "ones (the VAE's normalisation and attention see one tile) and their PNGs record "
    "'VAE tiling: on' (or auto). With --from-png, auto does what the image's parameters say.",
)


def check_vae_tiling(mode: str) -> None:
    if mode not in VAE_TILING_MODES:
        raise UserError(f"unknown --vae-tiling {mode!r}; use auto, on or off")
