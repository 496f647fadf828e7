"""The labelled grid image: its geometry, its label bands and its cells."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_cli.grid import draw_grid
from ldm_cli.grid.layout import BACKGROUND, PAD, font_for, wrap


def _cell(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _ink(image: Image.Image, box) -> bool:
    """Whether anything but the white background is drawn in `box`."""
    return bool((np.asarray(image.crop(box)) != BACKGROUND).any())


def test_cells_sit_in_slots_after_the_label_bands():
    cells = [[_cell(3 * r + c) for c in range(3)] for r in range(2)]
    grid, layout = draw_grid(cells, ["Steps: 1", "Steps: 2", "Steps: 3"], ["Euler", "DPM++ 2M"])
    assert grid.size == layout.size == (layout.left + 3 * 64, layout.top + 2 * 48)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            x, y = layout.cell_origin(c, r)
            assert (x, y) == (layout.left + 64 * c, layout.top + 48 * r)
            assert np.array_equal(np.asarray(grid.crop((x, y, x + 64, y + 48))), np.asarray(cell))
    font = font_for((64, 48))
    ascent, descent = font.getmetrics()
    assert layout.top == ascent + descent + 2 * PAD  # one line of X labels
    assert layout.left == max(round(font.getlength(t)) for t in ("Euler", "DPM++ 2M")) + 2 * PAD
    assert not _ink(grid, (0, 0, layout.left, layout.top))  # the corner stays empty
    for c in range(3):  # each X label over its own column
        x, _ = layout.cell_origin(c, 0)
        assert _ink(grid, (x, 0, x + 64, layout.top))
    for r in range(2):
        _, y = layout.cell_origin(0, r)
        assert _ink(grid, (0, y, layout.left, y + 48))


def test_a_title_band_goes_above_the_x_labels():
    cells = [[_cell(1), _cell(2)]]
    plain, plain_layout = draw_grid(cells, ["a", "b"], [])
    titled, layout = draw_grid(cells, ["a", "b"], [], title="CFG scale: 7")
    assert plain_layout.left == layout.left == 0
    band = layout.top - plain_layout.top
    font = font_for((64, 48))
    assert band == sum(font.getmetrics()) + 2 * PAD
    assert titled.size == (plain.width, plain.height + band)
    assert np.array_equal(np.asarray(titled)[band:], np.asarray(plain))
    assert _ink(titled, (0, 0, titled.width, band))


def test_no_labels_no_bands():
    grid, layout = draw_grid([[_cell(1)], [_cell(2)]], [], [])
    assert (layout.left, layout.top, grid.size) == (0, 0, (64, 96))


def test_long_labels_wrap_to_the_slot_and_the_band_grows():
    long = "a very long prompt replacement that cannot fit"
    _, short_layout = draw_grid([[_cell(1)]], ["x"], [])
    grid, layout = draw_grid([[_cell(1)]], [long], [])
    font = font_for((64, 48))
    lines = wrap(long, font, 64 - 2 * PAD)
    assert len(lines) > 2 and all(font.getlength(line) <= 64 - 2 * PAD for line in lines)
    assert "".join(lines).replace(" ", "") == long.replace(" ", "")
    assert layout.top - short_layout.top == (len(lines) - 1) * sum(font.getmetrics())


def test_cells_of_different_sizes_get_the_largest_slot():
    small, large = _cell(1, (32, 32)), _cell(2, (64, 96))
    grid, layout = draw_grid([[small, large]], [], [])
    assert layout.slot == (64, 96) and grid.size == (128, 96)
    assert np.array_equal(np.asarray(grid.crop((0, 0, 32, 32))), np.asarray(small))
    assert not _ink(grid, (32, 0, 64, 96)) and not _ink(grid, (0, 32, 32, 96))
