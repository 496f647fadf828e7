"""Input images and masks: reading, normalising any PIL mode, fitting to the model's size grid.

- Images become RGB. Transparent images (RGBA, LA, palette with transparency) are composited
  on white; 16-bit images are reduced to 8 bits; the EXIF orientation is applied.
- Masks become 8-bit grayscale, white = repaint. In a mask with transparency, transparent
  pixels count as black (keep), so a drawing on a transparent layer works as a mask.
- Sizes that are not a multiple of the model's `size_multiple` are padded on the right and
  bottom by repeating the edge pixels, and the result is cropped back, so outputs keep the
  input's size and no input pixel is resampled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ldm_cli.core.errors import UserError

if TYPE_CHECKING:
    import torch

ImageInput = str | os.PathLike[str] | Image.Image
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def open_image(source: ImageInput, what: str = "image") -> Image.Image:
    """A loaded PIL image from a path (UserError when missing or unreadable) or as given."""
    if isinstance(source, Image.Image):
        return source
    path = os.fspath(source)
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"cannot read {what} {path}: {reason}") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """32-bit integer, 16-bit and float grayscale as 8-bit "L" (16-bit ranges scaled down)."""
    values = np.asarray(image, dtype=np.float64)
    if values.max(initial=0) > 255:
        values = values / 257
    return Image.fromarray(values.clip(0, 255).round().astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _TRANSPARENT_MODES or "transparency" in image.info


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB version of an image of any mode (transparency composited on white)."""
    if image.mode in _WIDE_MODES:
        image = _eight_bit(image)
    if _has_transparency(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def as_mask(image: Image.Image) -> Image.Image:
    """8-bit grayscale mask, white = repaint (transparent pixels count as black)."""
    if image.mode in _WIDE_MODES:
        image = _eight_bit(image)
    if _has_transparency(image):
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    return image.convert("L")


def load_image(source: ImageInput) -> Image.Image:
    return as_rgb(open_image(source, "image"))


def load_mask(source: ImageInput, image: Image.Image) -> Image.Image:
    """The mask for `image`; a mask of another size is an error naming both sizes."""
    mask = as_mask(open_image(source, "mask"))
    if mask.size != image.size:
        raise UserError(
            f"the mask is {mask.width}x{mask.height} but the image is "
            f"{image.width}x{image.height}; they must be the same size"
        )
    return mask


def padded_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def pad_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` extended on the right and bottom to width x height by repeating edge pixels."""
    if image.size == (width, height):
        return image
    pixels = np.asarray(image)
    pad = ((0, height - image.height), (0, width - image.width)) + ((0, 0),) * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"))


def size_notice(width: int, height: int, multiple: int, scale: int = 1) -> str | None:
    """The one-line notice for an input size the model cannot take as it is, else None;
    `scale`: the output is that many times the input (the x4 upscaler)."""
    new = padded_size(width, height, multiple)
    if new == (width, height):
        return None
    return (
        f"note: {width}x{height} is not a multiple of {multiple}; the image is padded to "
        f"{new[0]}x{new[1]} (edges repeated) and the result cropped back to "
        f"{width * scale}x{height * scale}"
    )


@dataclass(frozen=True)
class Fitted:
    """An image padded to the model's size grid, and the size to crop results back to."""

    image: Image.Image
    size: tuple[int, int]

    def restore(self, result: Image.Image) -> Image.Image:
        return result if result.size == self.size else result.crop((0, 0, *self.size))


def fit_to_multiple(image: Image.Image, multiple: int) -> Fitted:
    return Fitted(pad_to(image, *padded_size(*image.size, multiple)), image.size)


def blur_mask(mask: Image.Image, radius: float) -> np.ndarray:
    """The mask Gaussian-blurred by `radius` pixels (PIL's GaussianBlur), as floats in [0, 1]."""
    if radius < 0:
        raise UserError(f"mask blur must be at least 0, got {radius}")
    if radius > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(mask, dtype=np.float32) / 255.0


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images as a float32 batch [B, 3, H, W] in [-1, 1] (diffusers' normalisation)."""
    import torch

    arrays = np.stack([np.asarray(image.convert("RGB")) for image in images])
    pixels = torch.from_numpy(arrays.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return 2.0 * pixels - 1.0


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """original * (1 - alpha) + generated * alpha, per pixel; exact where alpha is 0."""
    a = alpha[..., None].astype(np.float32)
    old = np.asarray(original.convert("RGB"), dtype=np.float32)
    new = np.asarray(generated.convert("RGB"), dtype=np.float32)
    mixed = (old * (1 - a) + new * a).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(mixed)
