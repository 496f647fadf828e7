"""Does a ControlNet put the shapes where the control map has them? The embedded ControlNet's
measurement (`ldm eval --control FILE`).

Held-out sketches: scenes from the evaluation seed stream that are not in the training set (at
`heldout_fraction` with a colour-shape pair the training never saw), each object moved off its
cell's centre, resized and turned (`shapes.free_layouts`; the captions' place words cannot
say where), rendered exactly and turned into control maps by the ControlNet's preprocessor.
Each is generated with its caption and the map; for every object the pixels of its colour in
the result are compared with its pixels in the exact render: intersection over union. A case
succeeds when IoU >= 0.7 and the object has the prompt's colour (the template check of
`pixel_analysis`). The same prompts without the ControlNet give the baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from ldm_cli.data.shapes import free_layouts, render, sample_eval_prompts
from ldm_cli.evaluation.pixel_analysis import COLOUR_NAMES, analyse, classify_pixels

IOU_PASS = 0.7
EVAL_STREAM_OFFSET = 77  # a seed stream of its own: not the prompts of `ldm eval`


def palette_labels(image: Image.Image) -> np.ndarray:
    """Each pixel's palette colour index (-1: none), as `pixel_analysis` classifies them."""
    return classify_pixels(np.asarray(image.convert("RGB")))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def judge(result: Image.Image, truth: Image.Image, scene) -> list[dict]:
    """Per object: its IoU with the truth's pixels and whether analyse finds its colour."""
    found = analyse(result, scene)["objects"]
    ours, theirs = palette_labels(result), palette_labels(truth)
    cases = []
    for obj, check in zip(scene.objects, found, strict=True):
        colour = COLOUR_NAMES.index(obj.colour)
        overlap = iou(ours == colour, theirs == colour)
        cases.append(
            {
                "object": f"{obj.colour} {obj.shape}",
                "iou": round(overlap, 3),
                "colour_ok": bool(check["colour_ok"]),
                "ok": overlap >= IOU_PASS and bool(check["colour_ok"]),
            }
        )
    return cases


def evaluate_control(
    pipe,
    control_path,
    num: int,
    seed: int = 0,
    steps: int = 30,
    cfg: float | None = None,
    preprocess: str = "canny",
    exclude=frozenset(),
    heldout_fraction: float = 0.5,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The report: per-case IoU with and without the ControlNet, and the summary rows."""
    from ldm_cli.control.units import ControlSpec

    side = pipe.config.default_size
    prompts = sample_eval_prompts(
        seed + EVAL_STREAM_OFFSET, num, heldout_fraction, mix="half", exclude=exclude
    )
    rows = []
    rng = np.random.default_rng(seed + EVAL_STREAM_OFFSET)
    for k, prompt in enumerate(prompts):
        truth = render(prompt.scene, side, layouts=free_layouts(prompt.scene, rng))
        control = ControlSpec(control_path, truth, preprocess=preprocess)  # the map of the render
        settings = {"steps": steps, "cfg": cfg, "seed": seed + k, "width": side, "height": side}
        (with_control,) = pipe.generate(prompt.text, control=control, **settings)
        (without,) = pipe.generate(prompt.text, **settings)
        rows.append(
            {
                "prompt": prompt.text,
                "heldout_pair": prompt.heldout,
                "control": judge(with_control, truth, prompt.scene),
                "prompt_only": judge(without, truth, prompt.scene),
            }
        )
        if progress:
            progress(k + 1, num)
    return {"cases": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in ("control", "prompt_only"):
        for group, keep in (("all", None), ("heldout_pairs", True)):
            cases = [c for r in rows if keep is None or r["heldout_pair"] == keep for c in r[key]]
            if not cases:
                continue
            out[f"{key}/{group}"] = {
                "objects": len(cases),
                "pass_rate": round(sum(c["ok"] for c in cases) / len(cases), 4),
                "mean_iou": round(float(np.mean([c["iou"] for c in cases])), 4),
                "colour_ok": round(sum(c["colour_ok"] for c in cases) / len(cases), 4),
            }
    return out
