"""Write a shapes dataset folder in the Hugging Face imagefolder layout.

``out_dir/00000.png`` + ``00000.txt`` (its caption) for every image, and ``metadata.jsonl`` with
one ``{"file_name": ..., "text": ...}`` line per image. Image ``i`` depends only on ``(seed, i)``,
so the output is byte-identical for a given seed and a larger ``num`` extends a smaller one.
Training scenes never contain the held-out colour-shape pairs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import (
    CAPTION_STREAM,
    LAYOUT_STREAM,
    caption,
    free_layouts,
    render,
    training_scene,
)

METADATA_FILE = "metadata.jsonl"
PROGRESS_EVERY = 64
# Probability that a training caption leaves out the sizes, and (independently) the places.
SHORT_CAPTION_PROBABILITY = 0.2


def training_example(
    seed: int, index: int, size: int = 128, layout: str = "grid"
) -> tuple[Image.Image, str]:
    """(image, caption) of example ``index`` of the training set drawn with ``seed``; `layout`
    "free" moves the objects off their cells (`shapes.free_layouts`, a stream of its own)."""
    scene, rng = training_scene(seed, index)
    # A stream of its own, so the images are the same as without caption variants.
    with_size, with_place = np.random.default_rng([CAPTION_STREAM, seed, index]).random(2)
    text = caption(
        scene,
        with_size=with_size >= SHORT_CAPTION_PROBABILITY,
        with_place=with_place >= SHORT_CAPTION_PROBABILITY,
    )
    if layout == "free":
        layouts = free_layouts(scene, np.random.default_rng([LAYOUT_STREAM, seed, index]))
        return render(scene, size, layouts=layouts), text
    return render(scene, size, rng), text


def write_shapes_dataset(
    out_dir: str | Path,
    num: int,
    size: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    layout: str = "grid",
) -> Path:
    """Write ``num`` captioned images; ``progress(done, num)`` is called every 64 images and
    at the end. About 2 ms per 128 px image on one CPU core (10,000 images in 15-20 s)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(num - 1)))
    with open(out / METADATA_FILE, "w", encoding="utf-8") as metadata:
        for index in range(num):
            name = f"{index:0{width}d}"
            image, text = training_example(seed, index, size, layout)
            image.save(out / f"{name}.png", compress_level=1)
            (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            metadata.write(json.dumps({"file_name": f"{name}.png", "text": text}) + "\n")
            if progress is not None and ((index + 1) % PROGRESS_EVERY == 0 or index + 1 == num):
                progress(index + 1, num)
    return out
