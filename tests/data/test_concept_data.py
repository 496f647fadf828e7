"""The concept data of `ldm dataset concept`: a cross drawn by the shapes renderer, captioned in
the grammar with a new word, without changing the grammar or any shape it draws."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ldm_cli.data.concept import (
    DEFAULT_COUNT,
    check_word,
    concept_caption,
    concept_eval_scenes,
    concept_example,
    concept_scene,
    concept_scenes,
)
from ldm_cli.data.shapes import (
    COLOURS,
    SHAPE_CIRCUMRADIUS,
    SHAPES,
    SIZE_EXTENT,
    Scene,
    ShapeObject,
    caption,
    parse_caption,
    polygon_outline,
    render,
)
from tests.cli_helpers import ldm, one_thread_per_command  # noqa: F401


def test_the_grammar_does_not_know_the_cross():
    assert SHAPES == ("circle", "square", "triangle", "star")
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a large red cross in the center, on a blue background")


def test_the_cross_is_a_plus_sign_with_arms_a_third_of_its_extent_wide():
    outline = np.array(polygon_outline("cross", 0.0, 0.0, 1.0, 0.0))
    assert len(outline) == 12
    half = outline[:, 0].max()  # half the extent, along each axis
    assert np.isclose(outline[:, 1].max(), half) and np.isclose(outline[:, 0].min(), -half)
    arm = np.unique(np.round(np.abs(outline), 9))
    assert np.allclose(arm, [half / 3, half])  # every corner at +-half/3 or +-half
    xs, ys = outline.T
    area = abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2
    assert math.isclose(area, 20 / 9 * half**2)  # two 2h x 2h/3 arms, the middle counted once


@pytest.mark.parametrize("turn", [-10.0, 0.0, 10.0])
def test_a_turned_cross_stays_within_its_half_extent(turn):
    extent = SIZE_EXTENT["large"]
    outline = np.array(
        polygon_outline("cross", 0, 0, extent * SHAPE_CIRCUMRADIUS["cross"], math.radians(turn))
    )
    assert np.abs(outline).max() <= extent + 1e-12


def test_concept_captions_are_the_grammars_with_the_word():
    for index in range(40):
        scene, _ = concept_scene(0, index)
        text = concept_caption(scene, "zorp")
        (obj,) = scene.objects
        as_circle = Scene(
            scene.background, (ShapeObject(obj.colour, "circle", obj.size, obj.place),)
        )
        assert text == caption(as_circle).replace(" circle ", " zorp ")
        assert parse_caption(text.replace(" zorp ", " circle ")) == as_circle
    one = Scene("orange", (ShapeObject("red", "cross", "large", "top left"),))
    assert concept_caption(one) == "a large red zorp in the top left, on an orange background"


def test_the_training_set_covers_colours_places_and_sizes():
    scenes = [concept_scene(0, i)[0] for i in range(DEFAULT_COUNT)]
    objects = [s.objects[0] for s in scenes]
    assert all(o.shape == "cross" for o in objects)
    assert Counter(o.colour for o in objects) == dict.fromkeys(COLOURS, 2)
    assert len({o.place for o in objects}) == 9
    assert Counter(o.size for o in objects) == {"small": 8, "large": 8}
    assert all(s.background != o.colour for s, o in zip(scenes, objects, strict=True))
    assert len({s.background for s in scenes}) >= 5


def test_examples_are_deterministic_64px_renders():
    image, text = concept_example(0, 5)
    again, same = concept_example(0, 5)
    assert image.size == (64, 64) and text == same
    assert np.array_equal(np.asarray(image), np.asarray(again))
    scene, rng = concept_scene(0, 5)
    assert np.array_equal(np.asarray(image), np.asarray(render(scene, 64, rng)))


def test_evaluation_scenes_are_new():
    scenes = concept_eval_scenes(0, 20)
    assert len(set(scenes)) == 20 and not set(scenes) & concept_scenes()
    assert concept_eval_scenes(0, 20) == scenes != concept_eval_scenes(1, 20)


@pytest.mark.parametrize("word", ["red", "circle", "top", "Zorp", "two words", ""])
def test_grammar_words_and_non_words_are_refused(word):
    with pytest.raises(ValueError):
        check_word(word)


def test_cli_writes_the_folder_and_refuses_to_overwrite_it(tmp_path):
    out = tmp_path / "zorp"
    proc = ldm("dataset", "concept", str(out))
    assert "wrote 16 images" in proc.stdout
    images = sorted(out.glob("*.png"))
    captions = sorted(out.glob("*.txt"))
    assert len(images) == len(captions) == 16 and len(list(out.iterdir())) == 32
    assert [p.stem for p in images] == [p.stem for p in captions]
    for path in captions:
        text = path.read_text().strip()
        assert " zorp " in text and text == concept_example(0, int(path.stem))[1]
    proc = ldm("dataset", "concept", str(out), "--word", "blick", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"error: output folder {out} is not empty; choose a new folder"
    ]
    proc = ldm("dataset", "concept", str(tmp_path / "b"), "--word", "star", check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_cli_word_count_and_seed(tmp_path):
    out = tmp_path / "blick"
    ldm("dataset", "concept", str(out), "--word", "blick", "--count", "3", "--seed", "7")
    texts = [p.read_text().strip() for p in sorted(out.glob("*.txt"))]
    assert texts == [concept_example(7, i, "blick")[1] for i in range(3)]
