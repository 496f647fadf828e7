"""Control images from ordinary ones, with no model weights: what `--preprocess` and
`ldm preprocess` offer. Maps that need a network (depth, OpenPose, line art, ...) are made by
other tools and given as they are (`none`).

canny: OpenCV's Canny edge detector at thresholds 100 / 200 on the RGB image, as A1111's
ControlNet extension and diffusers' examples run it: white edges on black.
threshold: white where the grey level is above 127, black elsewhere (A1111's "threshold").
scribble: a drawing of dark strokes on light paper turned into the white-on-black strokes
scribble ControlNets read (A1111's "invert", then thresholded).
invert: the colours inverted, nothing else (A1111's "invert (from white bg & black line)").
none: the image as it is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ldm_cli.core.errors import UserError

CANNY_LOW, CANNY_HIGH = 100, 200
THRESHOLD = 127
PREPROCESSORS = {
    "none": "the image is the control map already (depth, pose, edges made elsewhere)",
    "canny": "Canny edges (OpenCV, thresholds 100/200): white edges on black",
    "threshold": "white where the image is brighter than mid-grey, black elsewhere",
    "scribble": "dark strokes on light paper -> white strokes on black",
    "invert": "the image's colours inverted (black lines on white -> white on black)",
}


def check_preprocessor(name: str) -> None:
    if name not in PREPROCESSORS:
        raise UserError(f"unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")


def preprocess(image: Image.Image, name: str) -> Image.Image:
    """The RGB control map of `image` by the preprocessor `name` (a key of PREPROCESSORS)."""
    rgb = image.convert("RGB")
    if name == "none":
        return rgb
    if name == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(rgb), CANNY_LOW, CANNY_HIGH)
        return Image.fromarray(edges).convert("RGB")
    if name == "threshold":
        return _binary(rgb.convert("L"))
    if name == "scribble":
        return _binary(ImageOps.invert(rgb.convert("L")))
    if name == "invert":
        return ImageOps.invert(rgb)
    check_preprocessor(name)
    raise AssertionError(f"preprocessor {name!r} is listed but not implemented")


def _binary(grey: Image.Image) -> Image.Image:
    return grey.point(lambda v: 255 if v > THRESHOLD else 0).convert("RGB")
