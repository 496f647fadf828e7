"""Does an image look like the embedded models' domain: scenes of flat shapes in the eight
colours of `ldm_cli.data.shapes`? The embedded x4 diffusion upscaler redraws such scenes; on
anything else (a photo) it invents, so `ldm upscale --diffusion` says so before it runs.

Measured on bicubic low-res copies: 90-99% of a scene's pixels lie within `PALETTE_DISTANCE`
of a palette colour (the rest are anti-aliased edges), 0-40% of a photo's (0.94 for the
mostly black Hubble deep field, the one photo that passes).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import COLOURS

PALETTE_DISTANCE = 40.0  # RGB, in 8-bit levels
MIN_FRACTION = 0.85


def palette_fraction(image: Image.Image) -> float:
    """The fraction of pixels within PALETTE_DISTANCE of a palette colour."""
    if image.width * image.height > 256 * 256:
        image = image.resize((256, round(256 * image.height / image.width) or 1))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 1, 3)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)[None]
    nearest = np.sqrt(((pixels - palette) ** 2).sum(-1)).min(axis=1)
    return float((nearest < PALETTE_DISTANCE).mean())


def domain_notice(image: Image.Image) -> str | None:
    """One line for an input outside the embedded diffusion upscaler's domain, else None."""
    fraction = palette_fraction(image)
    if fraction >= MIN_FRACTION:
        return None
    return (
        f"note: this image does not look like the shapes scenes the embedded x4 diffusion "
        f"upscaler knows ({fraction:.0%} of its pixels are in their palette); it will redraw "
        "rather than upscale it: leave out --diffusion for the faithful default upscaler"
    )
