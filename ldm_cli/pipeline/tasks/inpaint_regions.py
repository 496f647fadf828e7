"""Rectangles for "inpaint at full resolution" and canvas growth for outpainting.

Boxes are (left, top, right, bottom) in pixels, right and bottom exclusive, as PIL's crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import ImageInput, load_image
from ldm_cli.core.limits import MAX_SIDE

Box = tuple[int, int, int, int]


def mask_box(alpha: np.ndarray) -> Box:
    """The smallest box holding every pixel with alpha > 0."""
    rows = np.flatnonzero(alpha.max(axis=1) > 0)
    cols = np.flatnonzero(alpha.max(axis=0) > 0)
    if rows.size == 0:
        raise UserError("the mask is empty (no white pixels): there is nothing to inpaint")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _grow(low: int, high: int, length: int, limit: int) -> tuple[int, int]:
    """[low, high) grown to `length` (at most `limit`) around its centre, shifted to fit."""
    length = min(max(length, high - low), limit)
    low -= (length - (high - low)) // 2
    low = min(max(low, 0), limit - length)
    return low, low + length


def crop_box(alpha: np.ndarray, padding: int, work_width: int, work_height: int) -> Box:
    """Box around the mask, padded by `padding` px, then widened or heightened to the working
    size's aspect ratio (as far as the image allows), like A1111's "only masked" mode."""
    if padding < 0:
        raise UserError(f"inpaint full-res padding must be at least 0, got {padding}")
    height, width = alpha.shape
    left, top, right, bottom = mask_box(alpha)
    left, top = max(left - padding, 0), max(top - padding, 0)
    right, bottom = min(right + padding, width), min(bottom + padding, height)
    box_w, box_h = right - left, bottom - top
    aspect = work_width / work_height
    if box_w / box_h < aspect:
        left, right = _grow(left, right, round(box_h * aspect), width)
    else:
        top, bottom = _grow(top, bottom, round(box_w / aspect), height)
    return left, top, right, bottom


def extend_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[Image.Image, Image.Image]:
    """The image with new borders filled by repeating its edge pixels, and the mask of the
    new area (white)."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if value < 0:
            raise UserError(f"--{name} must be at least 0, got {value}")
    if not any(sides.values()):
        raise UserError("give at least one of --left, --right, --top, --bottom to outpaint")
    width, height = image.width + left + right, image.height + top + bottom
    if max(width, height) > MAX_SIDE:
        raise UserError(
            f"the outpainted canvas would be {width}x{height}; at most {MAX_SIDE} pixels a side"
        )
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


def outpaint_inputs(
    image: ImageInput, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image, dict[str, str]]:
    """The grown canvas, its mask, and the infotext key describing the growth."""
    canvas, mask = extend_canvas(load_image(image), left, right, top, bottom)
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    described = " ".join(f"{k} {v}" for k, v in sides.items() if v)
    return canvas, mask, {"Outpaint": described}
