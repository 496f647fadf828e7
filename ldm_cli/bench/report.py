"""The bench's report: per-repeat ratios reduced to medians and ranges, and the markdown
tables of docs/benchmarks.md."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from PIL import Image

METRICS = [
    ("load_s", "load (s)"),
    ("encode_s", "text encoding (s)"),
    ("unet_step_s", "U-Net per step (s)"),
    ("decode_s", "VAE decode (s)"),
    ("end_to_end_s", "end to end (s)"),
    ("peak_rss_mb", "peak RSS (MiB)"),
    ("peak_gpu_mb", "peak GPU memory (MiB)"),  # CUDA only: torch's allocator, both tools
]


def max_pixel_diff(a: Path, b: Path) -> int:
    x = np.asarray(Image.open(a).convert("RGB"), dtype=int)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=int)
    return int(np.abs(x - y).max())


def compare(a: list[dict], b: list[dict], key: str) -> dict:
    """Medians of a metric over the repeats, and the median and range of the per-repeat ratios
    a/b: runs of the same repeat are minutes apart, so their ratio cancels slow drift."""
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True)]
    return {
        "a": statistics.median(x[key] for x in a),
        "b": statistics.median(y[key] for y in b),
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
    }


def ratio_cell(c: dict) -> str:
    spread = f" ({c['low']:.2f}-{c['high']:.2f})" if c["low"] != c["high"] else ""
    return f"{c['ratio']:.2f}{spread}"


def winograd_lines(wino: list[dict], plain: list[dict], diff: int) -> list[str]:
    """ldm with and without its Winograd convolutions, from fresh processes."""
    rows = [
        "ldm with Winograd F(2x2, 3x3) convolutions against ldm with F.conv2d everywhere:",
        "",
        "| metric | Winograd | F.conv2d | ratio |",
        "|---|---|---|---|",
    ]
    for key, label in METRICS[2:5]:
        c = compare(wino, plain, key)
        rows.append(f"| {label} | {c['a']:.2f} | {c['b']:.2f} | {ratio_cell(c)} |")
    return [*rows, "", f"Max pixel difference between the two: {diff}/255.", ""]


def compiled_lines(variants: dict[str, list[dict]], eager: list[dict], diffs: dict) -> list[str]:
    """ldm compiled (--compile, --cuda-graphs) against ldm eager, from fresh processes: the
    first step, which compiles, is left out of the per-step time but not of end to end."""
    rows = [
        "ldm compiled against ldm eager (ratio: compiled / eager):",
        "",
        "| metric | " + " | ".join(variants) + " | eager |",
        "|---|" + "---|" * (len(variants) + 1),
    ]
    for key, label in METRICS[2:5]:
        cells = []
        for runs in variants.values():
            c = compare(runs, eager, key)
            cells.append(f"{c['a']:.3f} ({ratio_cell(c)})")
        eager_s = statistics.median(r[key] for r in eager)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {eager_s:.3f} |")
    same = ", ".join(f"{tool} {d}/255" for tool, d in diffs.items())
    return [*rows, "", f"Max pixel difference from eager: {same}.", ""]


def size_table(
    title: str,
    ours: list[dict],
    ref: list[dict],
    gflop: tuple[float, float],
    peak: float,
    diff: int,
) -> list[str]:
    """One size's table: every metric of both tools and their ratio, then the achieved GFLOP/s
    of the U-Net step and the VAE decode (`gflop`: their work) against the matmul `peak`."""
    lines = [title, "", "| metric | ldm | diffusers | ldm / diffusers |", "|---|---|---|---|"]
    for key, label in METRICS:
        if key not in ours[0]:
            continue
        c = compare(ours, ref, key)
        lines.append(f"| {label} | {c['a']:.2f} | {c['b']:.2f} | {ratio_cell(c)} |")
    for name, gf, key in (
        ("U-Net step", gflop[0], "unet_step_s"),
        ("VAE decode", gflop[1], "decode_s"),
    ):
        c = compare(ours, ref, key)
        lines.append(
            f"| {name} GFLOP/s ({gf:.0f} GFLOP) | {gf / c['a']:.0f} | {gf / c['b']:.0f} | "
            f"peak {peak:.0f} |"
        )
    return [*lines, "", f"Same image: max pixel difference {diff}/255.", ""]


def repeats_note(repeats: int) -> str:
    if repeats <= 1:
        return ""
    return (
        f", {repeats} times interleaved (medians; ratio: median and range of the {repeats} "
        "per-repeat ratios)"
    )
