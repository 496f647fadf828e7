"""Render docs/images/embedded-grid.png: what the embedded model draws for a few prompts
(seeds 1..N, its defaults), each 64 x 64 image shown 3x (nearest neighbour: its own pixels)
with its prompt beneath. Run: .venv/bin/python scripts/readme_grid.py"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import ldm_cli

PROMPTS = [
    "a large red circle in the center, on a blue background",
    "a small yellow star in the top left, on a black background",
    "a large white triangle at the top, on a green background",
    "a large purple square on the right, on a yellow background",
    "a small orange circle on the left and a large blue star on the right, on a white background",
    "a large green triangle in the bottom left and a small red square in the top right, "
    "on a black background",
    "a large black star in the center, on an orange background",
    "a small blue square at the bottom, on a red background",
]
SCALE, COLUMNS, CAPTION_LINES, WRAP = 3, 4, 5, 26
OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "embedded-grid.png"


def main() -> None:
    pipe = ldm_cli.load(device="cpu")
    font = ImageFont.load_default(size=13)
    cell = 64 * SCALE
    caption_h = CAPTION_LINES * 16 + 8
    rows = -(-len(PROMPTS) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (cell + 8) + 8, rows * (cell + caption_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, prompt in enumerate(PROMPTS):
        (image,) = pipe.generate(prompt, seed=i + 1)
        x = 8 + (i % COLUMNS) * (cell + 8)
        y = 8 + (i // COLUMNS) * (cell + caption_h + 8)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(textwrap.wrap(prompt, WRAP)[:CAPTION_LINES]):
            draw.text((x, y + cell + 4 + 16 * k), line, fill="black", font=font)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(OUT, optimize=True)
    print(OUT)


if __name__ == "__main__":
    main()
