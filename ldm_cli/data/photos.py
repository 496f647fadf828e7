"""The real photographs that exist offline: scikit-image's samples, split once into those the
super-resolution network learns from and those it is measured on (never trained on)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Never seen in training: the photos the issue and the README use as examples, and one
# greyscale photograph. Everything else scikit-image ships without a download trains.
HELDOUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


TRAIN_PHOTOS = (
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
    "coins",
    "moon",
    "page",
    "text",
    "microaneurysms",
)


def photo(name: str) -> np.ndarray:
    """A scikit-image sample as uint8 RGB [H, W, 3] (greys repeated, alpha composited on
    white)."""
    from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float64) / 255
        image = (image[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def heldout_pair(name: str, scale: int) -> tuple[Image.Image, Image.Image]:
    """(original cropped to a multiple of the scale, its bicubic 1/scale copy)."""
    image = Image.fromarray(photo(name))
    w, h = image.width // scale * scale, image.height // scale * scale
    original = image.crop((0, 0, w, h))
    return original, original.resize((w // scale, h // scale), Image.Resampling.BICUBIC)
