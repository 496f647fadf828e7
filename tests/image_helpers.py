"""Real photos (scikit-image's sample images) and tiny inpainting configs for image-mode tests."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image
from skimage import data

from ldm_cli.core.config import TINY_SD1

TINY_INPAINT = replace(TINY_SD1, family="sd1-inpaint", unet=replace(TINY_SD1.unet, in_channels=9))
PHOTOS = ("astronaut", "coffee", "chelsea")


def photo(name: str = "astronaut", width: int = 64, height: int | None = None) -> Image.Image:
    """A scikit-image sample photo as RGB, resized (Lanczos) to width x height."""
    pixels = getattr(data, name)()
    image = Image.fromarray(pixels).convert("RGB")
    return image.resize((width, height or width), Image.Resampling.LANCZOS)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black mask with a white (repaint) rectangle (left, top, right, bottom)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)
