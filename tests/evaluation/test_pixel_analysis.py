import dataclasses
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_cli.data.shapes import COLOURS, PLACES, SHAPES, Scene, ShapeObject, random_scene, render
from ldm_cli.evaluation.pixel_analysis import (
    COLOUR_NAMES,
    analyse,
    classify_pixels,
    label_components,
    place_of,
    score,
)


def _rendered(n, size, seed, blur=0.0, noise=0.0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, allow_heldout=True)
        image = render(scene, size, rng)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        if noise:
            pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (size, size, 3))
            image = np.clip(pixels, 0, 255).astype(np.uint8)
        yield image, scene


def _score(n, size, seed, **degrade):
    return score([analyse(image, scene) for image, scene in _rendered(n, size, seed, **degrade)])


def test_palette_colours_classify_as_themselves():
    palette = np.array([[COLOURS[name] for name in COLOUR_NAMES]], dtype=np.float64)
    assert classify_pixels(palette).tolist() == [list(range(len(COLOUR_NAMES)))]
    slightly_off = np.clip(palette + np.array([18, -15, 12]), 0, 255)
    assert classify_pixels(slightly_off).tolist() == [list(range(len(COLOUR_NAMES)))]
    assert classify_pixels(np.array([[[0, 128, 128]]], dtype=np.float64))[0, 0] == -1


def test_place_of_uses_thirds():
    assert place_of(0.1, 0.1) == "top left"
    assert place_of(0.5, 0.2) == "top"
    assert place_of(0.5, 0.5) == "center"
    assert place_of(0.9, 0.5) == "right"
    assert place_of(0.2, 0.99) == "bottom left"
    assert place_of(1.0, 1.0) == "bottom right"


def test_label_components_four_connected():
    mask = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 0, 1],
        ],
        dtype=bool,
    )
    labels, count = label_components(mask)
    assert count == 4
    assert ((labels > 0) == mask).all()
    assert labels[0, 0] == labels[1, 1] != labels[2, 0] == labels[3, 2]
    assert labels[0, 4] == labels[1, 3] != labels[3, 4]


@pytest.mark.parametrize("size", [64, 128])
def test_clean_renders_are_judged_right(size):
    result = _score(300, size, seed=10)
    for check in ("background", "colour", "place", "size"):
        assert result[check] == 1.0, result
    assert result["shape"] >= 0.97, result


@pytest.mark.parametrize(
    ("size", "degrade"),
    [
        (128, {"blur": 1.5}),
        (128, {"blur": 1.5, "noise": 8.0}),
        (64, {"blur": 1.5}),
        (64, {"blur": 1.0, "noise": 8.0}),
    ],
)
def test_blurred_and_noisy_renders_are_mostly_judged_right(size, degrade):
    result = _score(150, size, seed=11, **degrade)
    assert result["background"] == 1.0, result
    assert result["colour"] >= 0.97 and result["place"] >= 0.97, result
    assert result["shape"] >= 0.9, result


def test_wrong_background_is_judged_wrong():
    for image, scene in _rendered(60, 64, seed=12, blur=1.0):
        for colour in COLOURS:
            if colour != scene.background:
                result = analyse(image, dataclasses.replace(scene, background=colour))
                assert not result["background_ok"] and not result["all_ok"]


@pytest.mark.parametrize("blur", [0.0, 1.5])
def test_absent_object_colour_is_judged_wrong(blur):
    asked = wrong = 0
    for image, scene in _rendered(80, 128, seed=13, blur=blur):
        present = {scene.background} | {o.colour for o in scene.objects}
        for colour in sorted(set(COLOURS) - present):
            first = dataclasses.replace(scene.objects[0], colour=colour)
            result = analyse(image, dataclasses.replace(scene, objects=(first,)))
            asked += 1
            wrong += not result["objects"][0]["colour_ok"]
    assert wrong / asked >= (1.0 if blur == 0 else 0.98)


def test_wrong_shape_and_place_are_judged_wrong():
    for image, scene in _rendered(60, 128, seed=14):
        obj = scene.objects[0]
        other_shape = SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)]
        result = analyse(
            image, Scene(scene.background, (dataclasses.replace(obj, shape=other_shape),))
        )
        assert result["objects"][0]["colour_ok"] and not result["objects"][0]["shape_ok"]
        taken = {o.place for o in scene.objects}
        other_place = next(p for p in PLACES if p not in taken)
        result = analyse(
            image, Scene(scene.background, (dataclasses.replace(obj, place=other_place),))
        )
        assert result["objects"][0]["colour_ok"] and not result["objects"][0]["place_ok"]


def test_objects_of_one_colour_are_matched_by_place():
    scene = Scene(
        "white",
        (
            ShapeObject("red", "star", "small", "top left"),
            ShapeObject("red", "square", "large", "bottom right"),
        ),
    )
    image = render(scene, 128, np.random.default_rng(0))
    for asked in (scene, Scene("white", scene.objects[::-1])):
        assert analyse(image, asked)["all_ok"]


def test_missing_object_is_not_found():
    scene = Scene("blue", (ShapeObject("yellow", "circle", "large", "center"),))
    result = analyse(Image.new("RGB", (64, 64), COLOURS["blue"]), scene)
    assert result["background_ok"]
    assert not any(result["objects"][0][f"{c}_ok"] for c in ("colour", "place", "shape", "size"))


def test_accepts_arrays_and_large_images():
    scene = random_scene(np.random.default_rng(15))
    image = render(scene, 128, np.random.default_rng(16))
    expected = analyse(image, scene)
    assert expected["all_ok"]
    as_float = np.asarray(image, dtype=np.float32) / 255.0
    for variant in (
        np.asarray(image),
        as_float,
        image.resize((512, 512), Image.Resampling.BICUBIC),
    ):
        result = analyse(variant, scene)
        assert result["all_ok"] and result["background"] == expected["background"]


def test_score_aggregates_per_image_and_per_object():
    ok = {"colour_ok": True, "place_ok": True, "shape_ok": True, "size_ok": True}
    results = [
        {"background_ok": True, "objects": [ok, {**ok, "shape_ok": False}], "all_ok": False},
        {"background_ok": False, "objects": [ok], "all_ok": False},
    ]
    scores = score(results)
    assert scores["background"] == 0.5 and scores["scene"] == 0.0
    assert scores["colour"] == 1.0 and math.isclose(scores["shape"], 2 / 3)
    assert scores["images"] == 2 and scores["objects"] == 3
