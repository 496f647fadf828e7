"""Overlapping tiles over an image and feathered blending of per-tile results.

Tiles are laid out in input pixels and their results may be `scale` times larger (the x4
upscaler). Along each axis the tiles have one size and are spread evenly from edge to edge,
overlapping by at least `overlap`. Each result is weighted by a ramp that rises from its
interior edges (edges that lie inside the image) over `overlap * scale` output pixels, and the
weighted sum is divided by the summed weights, so a point covered by one tile gets that tile's
value exactly and seams fade across the overlaps. A single tile reproduces the untiled result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm_cli.core.errors import UserError


@dataclass(frozen=True)
class Tile:
    left: int
    top: int
    width: int
    height: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), as PIL's crop takes it."""
        return self.left, self.top, self.left + self.width, self.top + self.height


def check_tiling(tile_size: int, overlap: int, multiple: int) -> None:
    if tile_size == 0:
        return
    if tile_size < multiple or tile_size % multiple:
        raise UserError(f"--tile-size must be 0 (no tiling) or a multiple of {multiple}")
    if not 0 <= overlap < tile_size / 2:
        raise UserError(
            f"--tile-overlap must be at least 0 and less than half the tile size ({tile_size})"
        )


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), overlapping >= `overlap`."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_grid(width: int, height: int, tile_size: int, overlap: int) -> list[Tile]:
    """Row-major tiles over a width x height image; tile_size 0 means one tile."""
    if tile_size == 0:
        return [Tile(0, 0, width, height)]
    tile_w, tile_h = min(tile_size, width), min(tile_size, height)
    return [
        Tile(left, top, tile_w, tile_h)
        for top in tile_starts(height, tile_h, overlap)
        for left in tile_starts(width, tile_w, overlap)
    ]


def _ramp(length: int, start: int, end: int, total: int, ramp: int) -> torch.Tensor:
    """1-D weights of a tile spanning [start, end) of `total`: rising over `ramp` samples
    from each edge that is not an image edge."""
    w = torch.ones(length)
    if ramp == 0:
        return w
    rise = (torch.arange(length, dtype=torch.float32) + 0.5) / ramp
    if start > 0:
        w = torch.minimum(w, rise)
    if end < total:
        w = torch.minimum(w, rise.flip(0))
    return w


class Blender:
    """Accumulates tile results [C, h * scale, w * scale] into one image of the full size."""

    def __init__(self, channels: int, width: int, height: int, scale: int, overlap: int):
        self.scale = scale
        self.width, self.height = width, height
        self.ramp = overlap * scale
        self.total = torch.zeros(channels, height * scale, width * scale)
        self.weight = torch.zeros(1, height * scale, width * scale)

    def add(self, tile: Tile, result: torch.Tensor) -> None:
        s = self.scale
        left, top, right, bottom = (v * s for v in tile.box)
        if tuple(result.shape[-2:]) != (bottom - top, right - left):
            raise ValueError(f"tile result of shape {tuple(result.shape)} does not fit {tile}")
        wx = _ramp(right - left, left, right, self.width * s, self.ramp)
        wy = _ramp(bottom - top, top, bottom, self.height * s, self.ramp)
        w = wy[:, None] * wx[None, :]
        self.total[:, top:bottom, left:right] += result.float().cpu() * w
        self.weight[:, top:bottom, left:right] += w

    def result(self) -> torch.Tensor:
        """The blended image; computed in place, so call it once."""
        if not (self.weight > 0).all():
            raise ValueError("the tiles do not cover the whole image")
        return self.total.div_(self.weight)
