"""Deterministic pixel analysis: does a generated image show the shapes scene its prompt asked for?

The image is classified pixel by pixel to the nearest palette colour in CIELAB. The background
is the majority colour of the border. Each asked object is looked for as a connected region of
its colour; its place is the 3x3 grid cell holding the region's centroid, its shape comes from
the radial profile of the region's soft matte (how far the edge is from the centroid, as a
function of angle): a triangle has 3 bumps, a square 4, a star 5 deep ones, a circle none.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import (
    COLOURS,
    EXTENT_JITTER,
    PLACE_CELLS,
    SHAPE_CIRCUMRADIUS,
    SIZE_EXTENT,
    STAR_INNER_RATIO,
    Scene,
    ShapeObject,
)

COLOUR_NAMES = tuple(COLOURS)
# Pixels further than this (CIELAB delta E) from every palette colour are "unknown".
UNKNOWN_DISTANCE = 50.0
ANALYSIS_MAX_SIDE = 256
BORDER_FRACTION = 0.03
# A plausible object covers between these fractions of the image.
MIN_AREA_FRACTION = 0.002
MAX_AREA_FRACTION = 0.25
# Thin regions (the blend ring between e.g. a red object and a yellow background reads as
# orange) lose most of their pixels to a one-pixel erosion; real objects keep a core.
MIN_CORE_FRACTION = 0.15
PROFILE_ANGLES = 64
PROFILE_STEP = 0.25
# Relative amplitude each harmonic of the radial profile must reach to count as corners; the
# pixel grid itself puts a 4-fold ripple on any outline, hence the higher floor for squares.
HARMONIC_FLOORS = {3: 0.03, 4: 0.035, 5: 0.015}
CORNER_SHAPES = {3: "triangle", 4: "square", 5: "star"}
# Area per squared half-extent (see data.shapes), to tell a small object from a large one
# whatever its shape; the threshold sits between the largest small and the smallest large.
_AREA_PER_EXTENT2 = {
    "circle": math.pi,
    "square": 2 * SHAPE_CIRCUMRADIUS["square"] ** 2,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * STAR_INNER_RATIO * math.sin(math.radians(36)),
}
SIZE_THRESHOLD = math.sqrt(
    SIZE_EXTENT["small"] * EXTENT_JITTER[1] * SIZE_EXTENT["large"] * EXTENT_JITTER[0]
)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = c @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )


_PALETTE_LAB = _srgb_to_lab(np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float64))


_LUT_SHIFT = 3  # the lookup table quantises each channel to 32 levels


@functools.cache
def _colour_lut() -> np.ndarray:
    levels = (np.arange(256 >> _LUT_SHIFT) << _LUT_SHIFT) + ((1 << _LUT_SHIFT) - 1) / 2
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)
    distance = np.linalg.norm(_srgb_to_lab(grid)[..., None, :] - _PALETTE_LAB, axis=-1)
    lut = distance.argmin(axis=-1).astype(np.int8)
    lut[distance.min(axis=-1) > UNKNOWN_DISTANCE] = -1
    return lut


def classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOUR_NAMES of each pixel's nearest palette colour, -1 when none is close."""
    q = np.clip(rgb, 0, 255).astype(np.uint8) >> _LUT_SHIFT
    return _colour_lut()[q[..., 0], q[..., 1], q[..., 2]].astype(np.int64)


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """float64 HxWx3 in 0..255, downsampled when larger than the analysis needs."""
    if isinstance(image, np.ndarray):
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        array = array[..., :3]
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            if array.max(initial=0.0) <= 1.0:
                array = array * 255.0
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    image = image.convert("RGB")
    if max(image.size) > ANALYSIS_MAX_SIDE:
        scale = ANALYSIS_MAX_SIDE / max(image.size)
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(new_size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float64)


def _border_mask(height: int, width: int) -> np.ndarray:
    band = max(1, round(BORDER_FRACTION * min(height, width)))
    mask = np.ones((height, width), dtype=bool)
    mask[band:-band, band:-band] = False
    return mask


def place_of(x: float, y: float) -> str:
    """Place whose 3x3 grid cell holds the point (x, y), given as fractions of width/height."""
    cell = (min(2, max(0, int(x * 3))), min(2, max(0, int(y * 3))))
    return next(place for place, c in PLACE_CELLS.items() if c == cell)


# ---------------------------------------------------------------- binary morphology


def erode(mask: np.ndarray) -> np.ndarray:
    """One-pixel erosion with the 4-neighbourhood; pixels outside the image count as set."""
    padded = np.pad(mask, 1, constant_values=True)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    for _ in range(iterations):
        padded = np.pad(mask, 1)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components: (labels, count), labels 1..count and 0 for background.

    Works on horizontal runs of set pixels, so the Python loops scale with the number of runs
    (a few per row) rather than with the number of pixels.
    """
    height, width = mask.shape
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1].tolist()
    row_first = np.searchsorted(rows, np.arange(height + 1)).tolist()
    starts_list = starts.tolist()
    parent = list(range(len(starts_list)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in range(height - 1):
        # merge-walk the runs of this row and the next, both sorted left to right
        a, a_stop = row_first[row], row_first[row + 1]
        b, b_stop = a_stop, row_first[row + 2]
        while a < a_stop and b < b_stop:
            if starts_list[a] < ends[b] and starts_list[b] < ends[a]:
                parent[root(a)] = root(b)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    labels = np.zeros((height, width), dtype=np.int32)
    ids: dict[int, int] = {}
    for i, (row, start, end) in enumerate(zip(rows.tolist(), starts_list, ends, strict=True)):
        labels[row, start:end] = ids.setdefault(root(i), len(ids) + 1)
    return labels, len(ids)


# ---------------------------------------------------------------- shape from a region


def _soft_matte(rgb, region, object_rgb, background_rgb):
    """Per-pixel coverage of the object: position of the pixel colour on the segment from the
    background colour to the object colour, limited to a two-pixel band around the region."""
    axis = object_rgb - background_rgb
    alpha = ((rgb - background_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    return np.clip(alpha, 0.0, 1.0) * dilate(region, 2)


def _bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    height, width = image.shape
    padded = np.pad(image, 1)
    xs = np.clip(xs + 1, 0, width + 0.999)
    ys = np.clip(ys + 1, 0, height + 0.999)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    x1, y1 = np.minimum(x0 + 1, width + 1), np.minimum(y0 + 1, height + 1)
    fx, fy = xs - x0, ys - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def radial_profile(matte: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Distance from (cx, cy) to the first point where the matte drops below one half, for
    PROFILE_ANGLES evenly spaced directions (pixel centres at integer coordinates)."""
    height, width = matte.shape
    angles = np.arange(PROFILE_ANGLES) * (2 * np.pi / PROFILE_ANGLES)
    steps = np.arange(0.0, math.hypot(height, width), PROFILE_STEP)
    xs = cx + np.cos(angles)[:, None] * steps
    ys = cy + np.sin(angles)[:, None] * steps
    values = _bilinear(matte, xs, ys)
    outside = values < 0.5
    outside[:, -1] = True
    first = outside.argmax(axis=1)
    before = np.maximum(first - 1, 0)
    rows = np.arange(PROFILE_ANGLES)
    v0, v1 = values[rows, before], values[rows, first]
    fraction = np.where(v0 > v1, (v0 - 0.5) / np.maximum(v0 - v1, 1e-9), 0.0)
    return (before + np.clip(fraction, 0.0, 1.0)) * PROFILE_STEP


def profile_harmonics(profile: np.ndarray) -> dict[int, float]:
    """Relative amplitudes of the 3rd, 4th and 5th harmonics of a radial profile."""
    spectrum = np.abs(np.fft.rfft(profile)) / len(profile)
    mean = max(spectrum[0], 1e-9)
    return {k: float(2 * spectrum[k] / mean) for k in (3, 4, 5)}


def classify_shape(harmonics: dict[int, float]) -> str:
    """The shape whose harmonic stands furthest above its floor; a circle if none reaches it."""
    relative = {k: harmonics[k] / floor for k, floor in HARMONIC_FLOORS.items()}
    strongest = max(relative, key=relative.get)
    return CORNER_SHAPES[strongest] if relative[strongest] >= 1.0 else "circle"


# ---------------------------------------------------------------- regions and matching


class Region:
    """A connected, plausibly sized, solid region of one palette colour."""

    def __init__(self, mask: np.ndarray, centroid: tuple[float, float]):
        self.mask = mask
        self.area = int(mask.sum())
        self.centroid = centroid  # fractions of width and height
        self.place = place_of(*centroid)


def find_regions(colour_mask: np.ndarray) -> list[Region]:
    height, width = colour_mask.shape
    labels, count = label_components(colour_mask)
    if count == 0:
        return []
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=count + 1)
    cores = np.bincount(labels[erode(colour_mask)], minlength=count + 1)
    ys, xs = np.indices(labels.shape)
    sum_x = np.bincount(flat, weights=xs.ravel() + 0.5, minlength=count + 1)
    sum_y = np.bincount(flat, weights=ys.ravel() + 0.5, minlength=count + 1)
    image_area = height * width
    regions = []
    for i in range(1, count + 1):
        plausible = MIN_AREA_FRACTION * image_area <= areas[i] <= MAX_AREA_FRACTION * image_area
        if plausible and cores[i] >= MIN_CORE_FRACTION * areas[i]:
            centroid = (sum_x[i] / areas[i] / width, sum_y[i] / areas[i] / height)
            regions.append(Region(labels == i, centroid))
    return regions


def match_regions(
    objects: tuple[ShapeObject, ...], regions: dict[str, list[Region]]
) -> list[Region | None]:
    """Give each object a region of its colour: first the largest one in its asked place, then,
    for objects still without one, the largest region left over."""
    chosen: list[Region | None] = [None] * len(objects)
    used: set[int] = set()
    for in_place_only in (True, False):
        for i, obj in enumerate(objects):
            if chosen[i] is not None:
                continue
            options = [
                r
                for r in regions.get(obj.colour, [])
                if id(r) not in used and (r.place == obj.place or not in_place_only)
            ]
            if options:
                chosen[i] = max(options, key=lambda r: r.area)
                used.add(id(chosen[i]))
    return chosen


# ---------------------------------------------------------------- public API


def region_matte(
    rgb: np.ndarray, region: Region, background_rgb: np.ndarray
) -> tuple[np.ndarray, tuple[int, int]]:
    """The region's soft matte (per-pixel coverage of the object, 0..1) in a window around it,
    and the window's (top, left) in the image."""
    rows = np.flatnonzero(region.mask.any(axis=1))
    cols = np.flatnonzero(region.mask.any(axis=0))
    pad = 4  # room for the two-pixel band of the matte
    top, left = max(rows[0] - pad, 0), max(cols[0] - pad, 0)
    window = (slice(top, rows[-1] + pad + 1), slice(left, cols[-1] + pad + 1))
    mask, pixels = region.mask[window], rgb[window]
    core = erode(mask)
    object_rgb = np.median(pixels[core if core.any() else mask], axis=0)
    return _soft_matte(pixels, mask, object_rgb, background_rgb), (int(top), int(left))


def _describe_region(rgb, region: Region, background_rgb: np.ndarray) -> dict:
    matte, _ = region_matte(rgb, region, background_rgb)
    ys, xs = np.indices(matte.shape)
    total = float(matte.sum())
    cx, cy = float((matte * xs).sum() / total), float((matte * ys).sum() / total)
    harmonics = profile_harmonics(radial_profile(matte, cx, cy))
    shape = classify_shape(harmonics)
    image_area = region.mask.size
    extent = math.sqrt(total / _AREA_PER_EXTENT2[shape] / image_area)
    return {
        "found_place": region.place,
        "found_shape": shape,
        "found_size": "small" if extent < SIZE_THRESHOLD else "large",
        "centroid": [round(float(c), 4) for c in region.centroid],
        "area_fraction": round(total / image_area, 5),
        "harmonics": {k: round(v, 4) for k, v in harmonics.items()},
    }


def background_of(rgb: np.ndarray, labels: np.ndarray) -> tuple[str | None, np.ndarray]:
    """The background: the palette colour most of the border's pixels have (None: none), and
    the median RGB of those pixels (of the whole border where none has it)."""
    border = _border_mask(*rgb.shape[:2])
    border_labels = labels[border]
    known = border_labels[border_labels >= 0]
    background_index = int(np.bincount(known).argmax()) if known.size else -1
    background = COLOUR_NAMES[background_index] if background_index >= 0 else None
    background_pixels = border & (labels == background_index)
    background_rgb = np.median(rgb[background_pixels if background_pixels.any() else border], 0)
    return background, background_rgb


def analyse(image: Image.Image | np.ndarray, scene: Scene) -> dict:
    """Judge an image against the scene its prompt described.

    Returns ``background_ok``, the detected ``background`` and, per asked object, a dict with
    ``colour_ok``, ``place_ok``, ``shape_ok`` and ``size_ok`` plus what was found.
    """
    rgb = as_rgb_array(image)
    labels = classify_pixels(rgb)
    background, background_rgb = background_of(rgb, labels)

    regions = {
        colour: find_regions(labels == COLOUR_NAMES.index(colour))
        for colour in {obj.colour for obj in scene.objects}
    }
    objects = []
    for obj, region in zip(scene.objects, match_regions(scene.objects, regions), strict=True):
        result = {"colour_ok": region is not None}
        if region is not None:
            result.update(_describe_region(rgb, region, background_rgb))
        result["place_ok"] = result.get("found_place") == obj.place
        result["shape_ok"] = result.get("found_shape") == obj.shape
        result["size_ok"] = result.get("found_size") == obj.size
        objects.append(result)
    background_ok = background == scene.background
    checks = ("colour_ok", "place_ok", "shape_ok", "size_ok")
    return {
        "background": background,
        "background_ok": background_ok,
        "objects": objects,
        "all_ok": background_ok and all(o[c] for o in objects for c in checks),
    }


def score(results: list[dict]) -> dict[str, float]:
    """Accuracies over a list of ``analyse`` results: background and scene per image, the
    others per asked object (an object that was not found counts as wrong everywhere)."""
    objects = [o for r in results for o in r["objects"]]

    def accuracy(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    scores = {
        "background": accuracy(r["background_ok"] for r in results),
        **{
            check: accuracy(o[f"{check}_ok"] for o in objects)
            for check in ("colour", "place", "shape", "size")
        },
        "scene": accuracy(r["all_ok"] for r in results),
    }
    return {**scores, "images": len(results), "objects": len(objects)}
