"""Images in and out of the API: base64 (with or without a `data:image/...;base64,` prefix)
to a PIL image within the pixel limits, and PNGs with their `parameters` chunk back to base64,
written by the same `write_png` as the CLI's files."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageOps

from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import MAX_SIDE
from ldm_cli.core.pngmeta import write_png

# the most pixels an input image may hold; MAX_SIDE x MAX_SIDE would be 1 GiB of RGBA
MAX_INPUT_PIXELS = 64 * 1024 * 1024


def decode_image(data: str, field: str) -> Image.Image:
    """The image a base64 field holds, loaded; a one-line UserError naming `field` when it is
    not an image or is larger than the limits (checked from the header, before decoding)."""
    if not isinstance(data, str) or not data.strip():
        raise UserError(f"{field}: expected a base64-encoded image")
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise UserError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_INPUT_PIXELS:
            raise UserError(
                f"{field}: the image is {width}x{height}; at most {MAX_SIDE} pixels a side and "
                f"{MAX_INPUT_PIXELS} pixels in all"
            )
        image.load()
        image = ImageOps.exif_transpose(image)  # as the CLI opens files
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{field}: not a readable image ({error})") from None
    return image


def encode_png(image: Image.Image) -> str:
    """Base64 of the PNG the CLI would write: the pixels and the `parameters` text."""
    buffer = io.BytesIO()
    write_png(image, buffer, image.info.get("parameters", ""))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_plain_png(image: Image.Image) -> str:
    """Base64 of a PNG without metadata (progress previews)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
