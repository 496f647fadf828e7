"""The high-resolution images the super-resolution network learns from, all made offline.

Four kinds, each a list of uint8 RGB arrays:
- photos: scikit-image's sample photographs, minus the held-out ones (`HELDOUT_PHOTOS`), each
  also at 0.7x and 0.5x (Lanczos), since a shrunk photo is a sharper photo;
- shapes: scenes of the embedded model's domain (`ldm_cli.data.shapes`) at sides 64 to 384;
- textures: sinusoid gratings, smooth noise, cells, stripes and strokes in random colours;
- text: lines of random words in PIL's bundled font at many sizes and colours.
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_cli.data.photos import TRAIN_PHOTOS, photo

PHOTO_SCALES = (1.0, 0.7, 0.5)
SOURCE_SIDE = 256  # procedural images
SHAPES_SIDES = (64, 96, 128, 192, 256, 384)


def photo_sources(names=TRAIN_PHOTOS, scales=PHOTO_SCALES) -> list[np.ndarray]:
    out = []
    for name in names:
        image = Image.fromarray(photo(name))
        for scale in scales:
            size = (round(image.width * scale), round(image.height * scale))
            out.append(np.asarray(image.resize(size, Image.Resampling.LANCZOS)))
    return out


def shapes_sources(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    from ldm_cli.data.shapes import random_scene, render

    sides = [SHAPES_SIDES[i % len(SHAPES_SIDES)] for i in range(count)]
    return [np.asarray(render(random_scene(rng, True), side, rng)) for side in sides]


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _two_colour_map(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """values in [0, 1] [H, W] -> RGB between two random colours."""
    a, b = _colour(rng), _colour(rng)
    return values[..., None] * a + (1 - values[..., None]) * b


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))


def gratings(rng: np.random.Generator, side: int) -> np.ndarray:
    x, y = _grid(side)
    total = np.zeros((side, side))
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(2.5, 40)
        phase = rng.uniform(0, 2 * np.pi)
        total += np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    total = (total - total.min()) / max(1e-9, np.ptp(total))
    return _two_colour_map(total, rng)


def smooth_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    out = np.zeros((side, side, 3))
    weight = 1.0
    for cells in (4, 8, 16, 32, 64):
        small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        big = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        out += weight * np.asarray(big, dtype=np.float64)
        weight *= rng.uniform(0.3, 0.7)
    out -= out.min()
    return out * (255 / max(1e-9, out.max()))


def cells(rng: np.random.Generator, side: int) -> np.ndarray:
    """Voronoi cells of flat random colours, anti-aliased by drawing at 2x."""
    big = side * 2
    points = rng.uniform(0, big, (int(rng.integers(8, 60)), 2))
    colours = rng.uniform(0, 255, (len(points), 3))
    x, y = _grid(big)
    distance = (x[..., None] - points[:, 0]) ** 2 + (y[..., None] - points[:, 1]) ** 2
    image = colours[distance.argmin(axis=2)].astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX))


def strokes(rng: np.random.Generator, side: int) -> np.ndarray:
    """Lines, ellipses and polygons of random widths and colours, drawn at 4x and
    box-downsampled."""
    big = side * 4
    image = Image.new("RGB", (big, big), tuple(int(v) for v in _colour(rng)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        fill = tuple(int(v) for v in _colour(rng))
        points = [tuple(p) for p in rng.uniform(-0.1 * big, 1.1 * big, (2, 2)).tolist()]
        kind = int(rng.integers(3))
        if kind == 0:
            draw.line(points, fill=fill, width=int(rng.integers(1, 24)))
        elif kind == 1:
            (x0, y0), (x1, y1) = points
            box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            draw.ellipse(box, fill=fill)
        else:
            corners = rng.uniform(0, big, (int(rng.integers(3, 7)), 2))
            draw.polygon([tuple(p) for p in corners.tolist()], fill=fill)
    return np.asarray(image.resize((side, side), Image.Resampling.BOX))


def stripes(rng: np.random.Generator, side: int) -> np.ndarray:
    """Hard-edged stripes or a checkerboard at a random angle, anti-aliased at 4x."""
    big = side * 4
    x, y = _grid(big)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(3, 48) * 4
    u = x * np.cos(angle) + y * np.sin(angle)
    pattern = np.floor(u / period) % 2
    if rng.random() < 0.5:
        v = -x * np.sin(angle) + y * np.cos(angle)
        pattern = (pattern + np.floor(v / period)) % 2
    image = _two_colour_map(pattern, rng).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BOX))


def text_page(rng: np.random.Generator, side: int) -> np.ndarray:
    background = tuple(int(v) for v in _colour(rng))
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)
    y = float(rng.uniform(-8, 8))
    while y < side:
        size = int(rng.integers(7, 42))
        font = ImageFont.load_default(size=size)
        words = [
            "".join(rng.choice(list(string.ascii_letters + string.digits), rng.integers(1, 9)))
            for _ in range(int(rng.integers(2, 10)))
        ]
        ink = tuple(int(v) for v in _colour(rng))
        draw.text((float(rng.uniform(-20, 20)), y), " ".join(words), fill=ink, font=font)
        y += size * float(rng.uniform(1.0, 1.6))
    return np.asarray(image)


PROCEDURAL = (gratings, smooth_noise, cells, strokes, stripes)


def texture_sources(rng: np.random.Generator, count: int, side: int = SOURCE_SIDE):
    return [PROCEDURAL[i % len(PROCEDURAL)](rng, side).astype(np.uint8) for i in range(count)]


def text_sources(rng: np.random.Generator, count: int, side: int = SOURCE_SIDE):
    return [text_page(rng, side) for _ in range(count)]
