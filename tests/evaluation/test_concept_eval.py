"""The judge of `ldm eval --concept`: template IoU tells the cross from the grammar's shapes on
exact and degraded renders, and checks colour and place; the embedded model alone fails it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_cli.data.concept import concept_eval_scenes
from ldm_cli.data.shapes import COLOURS, PLACES, SHAPES, Scene, render
from ldm_cli.evaluation.concept_eval import (
    IOU_PASS,
    TEMPLATE_SHAPES,
    judge,
    shape_of_region,
    template_ious,
)
from ldm_cli.evaluation.pixel_analysis import (
    COLOUR_NAMES,
    as_rgb_array,
    background_of,
    classify_pixels,
    find_regions,
)

NUM = 24


def _cases(seed: int = 3, num: int = NUM):
    """Held-out cross scenes (all colours, places and both sizes) and a jitter generator."""
    return concept_eval_scenes(seed, num), np.random.default_rng(seed)


def _with_shape(scene: Scene, **changes) -> Scene:
    (obj,) = scene.objects
    return Scene(scene.background, (dataclasses.replace(obj, **changes),))


def _degrade(image: Image.Image, rng, blur: float = 0.0, noise: float = 0.0) -> Image.Image:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("blur, noise", [(0.0, 0.0), (0.0, 12.0), (0.8, 12.0)])
def test_crosses_pass_at_their_colour_and_place(blur, noise):
    scenes, rng = _cases()
    rows = [judge(_degrade(render(s, 64, rng), rng, blur, noise), s) for s in scenes]
    assert sum(r["ok"] for r in rows) >= 0.95 * len(rows), rows
    assert min(r["iou"] for r in rows) >= IOU_PASS + 0.03


@pytest.mark.parametrize("shape", SHAPES)
def test_the_known_shapes_in_the_same_spot_never_pass(shape):
    scenes, rng = _cases()
    for scene in scenes:
        row = judge(_degrade(render(_with_shape(scene, shape=shape), 64, rng), rng, 0.8, 12), scene)
        assert row["place_ok"] and row["found_shape"] == shape and not row["ok"], row
        assert row["ious"]["cross"] < IOU_PASS - 0.03


def test_a_cross_of_another_colour_or_place_fails():
    scenes, rng = _cases(num=12)
    for k, scene in enumerate(scenes):
        (obj,) = scene.objects
        others = [c for c in COLOURS if c not in (obj.colour, scene.background)]
        moved = PLACES[(PLACES.index(obj.place) + 1 + k % 8) % len(PLACES)]
        wrong_colour = render(_with_shape(scene, colour=others[k % len(others)]), 64, rng)
        wrong_place = render(_with_shape(scene, place=moved), 64, rng)
        assert not judge(wrong_colour, scene)["colour_ok"]
        row = judge(wrong_place, scene)
        assert row["colour_ok"] and not row["place_ok"] and not row["ok"]


def test_an_empty_background_fails():
    scene = concept_eval_scenes(0, 1)[0]
    blank = Image.new("RGB", (64, 64), COLOURS[scene.background])
    assert judge(blank, scene) == {
        "colour_ok": False,
        "place_ok": False,
        "background": scene.background,
        "found_shape": None,
        "iou": 0.0,
        "ok": False,
    }


@pytest.mark.parametrize("side", [64, 128])
def test_shape_of_region_names_each_template_shape(side):
    scene = concept_eval_scenes(1, 1)[0]
    rng = np.random.default_rng(0)
    for shape in TEMPLATE_SHAPES:
        for size in ("small", "large"):
            image = render(_with_shape(scene, shape=shape, size=size), side, rng)
            rgb = as_rgb_array(image)
            labels = classify_pixels(rgb)
            _, background_rgb = background_of(rgb, labels)
            (region,) = find_regions(labels == COLOUR_NAMES.index(scene.objects[0].colour))
            found = shape_of_region(rgb, region, background_rgb)
            assert found["shape"] == shape and found["iou"] >= 0.85, (shape, size, found)


def test_an_empty_matte_matches_nothing():
    assert template_ious(np.zeros((8, 8))) == dict.fromkeys(TEMPLATE_SHAPES, 0.0)


def test_the_embedded_model_alone_does_not_draw_the_concept():
    from ldm_cli.evaluation.concept_eval import evaluate_concept
    from ldm_cli.pipeline.load import load

    report = evaluate_concept(load(None, device="cpu"), "zorp", num=4, steps=10)
    assert report["pass_rate"] < 0.1, report["cases"]
    assert [c["seed"] for c in report["cases"]] == [0, 1, 2, 3]
    assert all("zorp" in c["prompt"] for c in report["cases"])
    assert report["settings"]["iou_pass"] == IOU_PASS
