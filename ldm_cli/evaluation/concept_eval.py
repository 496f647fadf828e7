"""Does a LoRA or textual-inversion embedding teach the embedded model a new shape? The judge of
`ldm eval --concept WORD` (the concept: `ldm_cli.data.concept`, a cross named by a new word).

`num` held-out one-object prompts in the grammar with the word for the shape ("a small green
zorp at the bottom, on a purple background"), from a seed stream of their own, one image each
(prompt k with seed `seed + k`). A case passes when the image has a region of the prompt's
colour whose centroid lies in the prompt's place (the largest such region is judged) and whose
soft matte matches the cross's template better than the four shapes of the grammar, with a
template IoU of at least IOU_PASS.

Template IoU: each of the five shapes is drawn as `shapes.render` draws it (anti-aliased, as
coverage 0..1) at the matte's centroid, at the size whose area equals the matte's (times
SCALES), turned by each of ROTATIONS (a circle once); its IoU with the matte is
sum(min) / sum(max), and a shape's score is its best over those sizes and turns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw

from ldm_cli.data.concept import (
    CONCEPT_SHAPE,
    DEFAULT_WORD,
    concept_caption,
    concept_eval_scenes,
)
from ldm_cli.data.shapes import SHAPES, SUPERSAMPLE, Scene, polygon_outline
from ldm_cli.evaluation.pixel_analysis import (
    COLOUR_NAMES,
    Region,
    as_rgb_array,
    background_of,
    classify_pixels,
    find_regions,
    region_matte,
)

TEMPLATE_SHAPES = (*SHAPES, CONCEPT_SHAPE)
# Turns (degrees) and sizes (times the size of equal area) each template is tried at: the
# training jitter turns shapes by up to 10 degrees.
ROTATIONS = tuple(range(-15, 16, 5))
SCALES = (0.88, 0.94, 1.0, 1.06, 1.12)
# The cross's IoU with its own template against the best the other shapes reach with the cross's
# (60 renders per shape and condition at 64 px, all colours, places and sizes, with the training
# jitter; and 40 round trips through the embedded VAE):
#   crosses:  exact 0.914-0.999, noise (sigma 12/255) 0.844+, blur (sigma 0.8 px) 0.813+,
#             blur and noise 0.789+, VAE round trip 0.803+ (all judged crosses, 100%)
#   circles, squares, triangles, stars, any condition: at most 0.713 (circles), never the best.
# 0.75 is the middle of that gap. The embedded model's own drawings of the grammar's shapes
# (48 one-object prompts, 30 steps) reach 0.73-0.95 with their own templates; 46 of 48 pass
# (the other two match another shape's template better), as many as the harmonic shape check
# of `ldm eval` accepts.
IOU_PASS = 0.75


@functools.cache
def _area_per_radius2(shape: str) -> float:
    """A shape's area at circumradius 1."""
    if shape == "circle":
        return math.pi
    xs, ys = np.array(polygon_outline(shape, 0.0, 0.0, 1.0, 0.0)).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def template(
    shape: str, cx: float, cy: float, radius: float, rotation: float, height: int, width: int
) -> np.ndarray:
    """Coverage (0..1) of `shape` at (cx, cy) with its circumradius and turn (radians), in
    pixels of a height x width window whose pixel (i, j) is centred at (j, i)."""
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    x, y, r = (cx + 0.5) * SUPERSAMPLE, (cy + 0.5) * SUPERSAMPLE, radius * SUPERSAMPLE
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        draw.polygon(polygon_outline(shape, x, y, r, rotation), fill=255)
    small = big.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float(np.maximum(a, b).sum())
    return float(np.minimum(a, b).sum()) / union if union else 0.0


def template_ious(matte: np.ndarray) -> dict[str, float]:
    """Each template shape's best IoU with a matte, over SCALES and ROTATIONS."""
    height, width = matte.shape
    area = float(matte.sum())
    if area <= 0:
        return dict.fromkeys(TEMPLATE_SHAPES, 0.0)
    ys, xs = np.indices(matte.shape)
    cx, cy = float((matte * xs).sum() / area), float((matte * ys).sum() / area)
    scores = {}
    for shape in TEMPLATE_SHAPES:
        radius = math.sqrt(area / _area_per_radius2(shape))
        turns = (0,) if shape == "circle" else ROTATIONS
        scores[shape] = max(
            soft_iou(
                matte,
                template(shape, cx, cy, radius * s, math.radians(t), height, width),
            )
            for s in SCALES
            for t in turns
        )
    return scores


def shape_of_region(rgb: np.ndarray, region: Region, background_rgb: np.ndarray) -> dict:
    """The template shape that best matches a region, its IoU and every shape's IoU."""
    matte, _ = region_matte(rgb, region, background_rgb)
    ious = template_ious(matte)
    best = max(ious, key=ious.get)
    return {
        "shape": best,
        "iou": round(ious[best], 4),
        "ious": {k: round(v, 4) for k, v in ious.items()},
    }


def judge(image: Image.Image | np.ndarray, scene: Scene, iou_pass: float = IOU_PASS) -> dict:
    """One case: does `image` show the scene's one object as a cross of its colour in its
    place? `ok`, with what was found (`found_shape`, `iou`, all `ious`, `background`)."""
    (obj,) = scene.objects
    rgb = as_rgb_array(image)
    labels = classify_pixels(rgb)
    background, background_rgb = background_of(rgb, labels)
    regions = find_regions(labels == COLOUR_NAMES.index(obj.colour))
    in_place = [r for r in regions if r.place == obj.place]
    row: dict = {
        "colour_ok": bool(regions),
        "place_ok": bool(in_place),
        "background": background,
        "found_shape": None,
        "iou": 0.0,
        "ok": False,
    }
    if in_place:
        region = max(in_place, key=lambda r: r.area)
        found = shape_of_region(rgb, region, background_rgb)
        row.update(
            found_shape=found["shape"],
            iou=found["iou"],
            ious=found["ious"],
            centroid=[round(float(c), 4) for c in region.centroid],
        )
        row["ok"] = found["shape"] == obj.shape and found["iou"] >= iou_pass
    return row


def evaluate_concept(
    pipe,
    word: str = DEFAULT_WORD,
    num: int = 20,
    seed: int = 0,
    steps: int = 30,
    cfg: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    sampler: str = "euler_a",
    batch_size: int = 16,
    exclude: frozenset[Scene] | None = None,
) -> dict:
    """The report: settings, `pass_rate` and per-case rows (prompt, seed and `judge`'s row).

    Works on `pipe` as given: load a LoRA first (`pipe.networks.add_lora`) or an embedding
    folder (`pipe.networks.load_embeddings`). `exclude`: scenes left out of the prompts
    (default: those of the default `ldm dataset concept` folder)."""
    from ldm_cli.pipeline.request import Request

    scenes = concept_eval_scenes(seed, num, exclude)
    size = pipe.config.default_size
    cfg = pipe.guidance_scale(cfg)
    base = Request(prompt="", steps=steps, cfg=cfg, sampler=sampler, width=size, height=size)
    rows: list[dict] = []
    for start in range(0, num, batch_size):
        chunk = scenes[start : start + batch_size]
        requests = [
            replace(base, prompt=concept_caption(scene, word), seed=seed + start + i)
            for i, scene in enumerate(chunk)
        ]
        for req, scene, (_, image) in zip(requests, chunk, pipe.render(requests), strict=True):
            rows.append({"prompt": req.prompt, "seed": req.seed, **judge(image, scene)})
        if progress:
            progress(len(rows), num)
    passed = sum(r["ok"] for r in rows)
    return {
        "settings": {
            "word": word,
            "num": num,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler": sampler,
            "size": size,
            "model": pipe.name,
            "iou_pass": IOU_PASS,
        },
        "passed": passed,
        "pass_rate": round(passed / num, 4) if num else float("nan"),
        "cases": rows,
    }
