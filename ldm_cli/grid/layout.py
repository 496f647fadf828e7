"""Drawing a labelled grid: X labels in a band on top, Y labels in a band on the left, and
for a Z axis a title band above both; text drawn with Pillow's default font.

Every cell gets a slot of the largest cell's size, the image at the slot's top-left corner,
the rest white; the slots touch (no margins), so the cell at column c, row r starts at
(left + c * slot_width, top + r * slot_height).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 4  # pixels around each label's text
MIN_FONT = 10
LEFT_WRAP = 128  # Y labels wrap at this width or the cell's, the larger


@dataclass(frozen=True)
class Layout:
    """Where things are in a grid image, in pixels."""

    columns: int
    rows: int
    slot: tuple[int, int]  # width, height of every cell's slot
    left: int  # width of the Y label band
    top: int  # height of the title and X label bands together

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * self.slot[0], self.top + self.rows * self.slot[1]

    def cell_origin(self, column: int, row: int) -> tuple[int, int]:
        return self.left + column * self.slot[0], self.top + row * self.slot[1]


def font_for(slot: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A1111's size rule, (width + height) / 25, but never below MIN_FONT pixels."""
    return ImageFont.load_default(size=max(MIN_FONT, sum(slot) // 25))


def _width(font, text: str) -> int:
    return int(round(font.getlength(text)))


def wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` where it can be (at spaces, else mid-word)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width(font, candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while _width(font, line) > width and len(line) > 1:  # one word wider than the slot
                cut = len(line) - 1
                while cut > 1 and _width(font, line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def _line_height(font) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _block_height(lines: list[str], font) -> int:
    return len(lines) * _line_height(font) + 2 * PAD


def _draw_centered(draw, lines: list[str], font, box: tuple[int, int, int, int]) -> None:
    """Lines centred in `box` (left, top, right, bottom)."""
    height = len(lines) * _line_height(font)
    y = box[1] + (box[3] - box[1] - height) // 2
    for line in lines:
        x = box[0] + (box[2] - box[0] - _width(font, line)) // 2
        draw.text((x, y), line, fill=INK, font=font)
        y += _line_height(font)


def grid_layout(
    cells: list[list[Image.Image]], x_labels: list[str], y_labels: list[str], title: str | None
):
    """The Layout of `cells` (rows of images) with these labels, and the wrapped label lines
    and font it was measured with."""
    rows, columns = len(cells), len(cells[0])
    slot = (
        max(image.width for row in cells for image in row),
        max(image.height for row in cells for image in row),
    )
    font = font_for(slot)
    x_lines = [wrap(label, font, slot[0] - 2 * PAD) for label in x_labels]
    y_lines = [wrap(label, font, max(slot[0], LEFT_WRAP) - 2 * PAD) for label in y_labels]
    x_band = max((_block_height(lines, font) for lines in x_lines), default=0) if x_labels else 0
    left = (
        max(_width(font, line) for lines in y_lines for line in lines) + 2 * PAD if y_labels else 0
    )
    title_lines = wrap(title, font, left + columns * slot[0] - 2 * PAD) if title else []
    title_band = _block_height(title_lines, font) if title else 0
    layout = Layout(columns, rows, slot, left, title_band + x_band)
    return layout, font, (title_lines, title_band), x_lines, y_lines


def draw_grid(
    cells: list[list[Image.Image]],
    x_labels: list[str],
    y_labels: list[str],
    title: str | None = None,
) -> tuple[Image.Image, Layout]:
    """The grid image of `cells` (a list of rows, all rows as long) and its Layout. Label
    lists may be empty (no band drawn for that axis)."""
    layout, font, (title_lines, title_band), x_lines, y_lines = grid_layout(
        cells, x_labels, y_labels, title
    )
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title_lines:
        _draw_centered(draw, title_lines, font, (0, 0, grid.width, title_band))
    for column, lines in enumerate(x_lines):
        x0, _ = layout.cell_origin(column, 0)
        _draw_centered(draw, lines, font, (x0, title_band, x0 + layout.slot[0], layout.top))
    for row, lines in enumerate(y_lines):
        _, y0 = layout.cell_origin(0, row)
        _draw_centered(draw, lines, font, (0, y0, layout.left, y0 + layout.slot[1]))
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), layout.cell_origin(c, r))
    return grid, layout
