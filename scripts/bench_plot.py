"""Draw docs/images/bench-ratios.png from the first table of each size and file dtype in
docs/benchmarks.md: ldm's time and memory as a fraction of diffusers' (below 1: ldm is
faster or smaller). Run: .venv/bin/python scripts/bench_plot.py"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("load (s)", "U-Net per step (s)", "VAE decode (s)", "end to end (s)", "peak RSS (MiB)")
COLOURS = ((52, 101, 164), (114, 159, 207), (206, 92, 0), (252, 175, 62))
WIDTH, BAR, GAP, LEFT, SCALE = 760, 11, 14, 150, 480  # SCALE: pixels for a ratio of 1


def tables(text: str) -> dict[str, dict[str, float]]:
    """The first table under each '### SIZE, DTYPE file' heading: metric -> median ratio."""
    found: dict[str, dict[str, float]] = {}
    for match in re.finditer(r"^### (\d+x\d+), (fp\d+) file\n\n((?:\|.*\n)+)", text, re.M):
        key = f"{match.group(1)} {match.group(2)} file"
        if key in found:
            continue
        rows = {}
        for line in match.group(3).splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            ratio = re.match(r"[\d.]+", cells[3])
            if cells[0] in METRICS and ratio:
                rows[cells[0]] = float(ratio.group(0))
        found[key] = rows
    return found


def main() -> None:
    runs = tables((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    names = list(runs)[:4]
    font = ImageFont.load_default(size=13)
    height = 40 + len(METRICS) * (len(names) * BAR + GAP) + 20 * len(names)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((LEFT, 8), "ldm / diffusers (lower is better; 1 = equal)", fill="black", font=font)
    y = 32
    for metric in METRICS:
        draw.text((8, y + len(names) * BAR / 2 - 7), metric, fill="black", font=font)
        for k, name in enumerate(names):
            ratio = runs[name].get(metric)
            if ratio is not None:
                draw.rectangle((LEFT, y, LEFT + ratio * SCALE, y + BAR - 2), fill=COLOURS[k])
                draw.text((LEFT + ratio * SCALE + 4, y - 2), f"{ratio:.2f}", fill="black", font=font)
            y += BAR
        y += GAP
    draw.line((LEFT + SCALE, 28, LEFT + SCALE, y), fill=(120, 120, 120), width=1)
    for k, name in enumerate(names):
        draw.rectangle((LEFT, y + 4 + 20 * k, LEFT + 14, y + 16 + 20 * k), fill=COLOURS[k])
        draw.text((LEFT + 20, y + 2 + 20 * k), name, fill="black", font=font)
    out = ROOT / "docs" / "images" / "bench-ratios.png"
    image.save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
