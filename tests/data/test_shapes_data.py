import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm_cli.data import shapes_writer
from ldm_cli.data.shapes import (
    COLOURS,
    EVAL_MIXES,
    HELDOUT_PAIRS,
    PLACES,
    SHAPES,
    SIZES,
    TRAIN_STREAM,
    Scene,
    ShapeObject,
    caption,
    heldout_scenes,
    is_heldout,
    object_layout,
    parse_caption,
    polygon_outline,
    random_scene,
    render,
    sample_eval_prompts,
    scene_is_heldout,
    training_scene,
    training_scenes,
)
from ldm_cli.data.shapes_writer import write_shapes_dataset

objects = st.builds(
    ShapeObject,
    colour=st.sampled_from(list(COLOURS)),
    shape=st.sampled_from(SHAPES),
    size=st.sampled_from(SIZES),
    place=st.sampled_from(PLACES),
)


@st.composite
def scenes(draw):
    first = draw(objects)
    chosen = [first]
    if draw(st.booleans()):
        chosen.append(draw(objects.filter(lambda o: o.place != first.place)))
    return Scene(background=draw(st.sampled_from(list(COLOURS))), objects=tuple(chosen))


def test_caption_examples():
    two = Scene(
        "yellow",
        (
            ShapeObject("red", "circle", "small", "top left"),
            ShapeObject("blue", "square", "large", "right"),
        ),
    )
    assert caption(two) == (
        "a small red circle in the top left and a large blue square on the right,"
        " on a yellow background"
    )
    one = Scene("orange", (ShapeObject("green", "star", "large", "center"),))
    assert caption(one) == "a large green star in the center, on an orange background"


def test_caption_round_trip_for_generated_scenes():
    rng = np.random.default_rng(0)
    for _ in range(1000):
        scene = random_scene(rng, allow_heldout=True)
        assert parse_caption(caption(scene)) == scene


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_caption_round_trip_for_any_scene(scene):
    assert parse_caption(caption(scene)) == scene


def test_parse_is_lenient_about_case_spacing_and_spelling():
    scene = parse_caption("  A Large  WHITE triangle in the centre,  on a black background. ")
    assert scene == Scene("black", (ShapeObject("white", "triangle", "large", "center"),))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a red circle on the left, on a blue background",  # no size
        "a small red circle on the left",  # no background
        "a small pink circle on the left, on a blue background",  # unknown colour
        "a small red circle on the left and a large blue star on the left, on a black background",
    ],
)
def test_parse_rejects_non_captions(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_random_scenes_follow_the_documented_rules():
    rng = np.random.default_rng(1)
    counts = {1: 0, 2: 0}
    for _ in range(3000):
        scene = random_scene(rng)
        counts[len(scene.objects)] += 1
        colours = [o.colour for o in scene.objects]
        assert scene.background not in colours
        assert len(set(colours)) == len(colours)
        assert len({o.place for o in scene.objects}) == len(scene.objects)
        assert not scene_is_heldout(scene)
    assert min(counts.values()) > 1200


def test_heldout_pairs_only_appear_when_allowed():
    assert len(HELDOUT_PAIRS) == 4
    rng = np.random.default_rng(2)
    seen = {
        (o.colour, o.shape)
        for _ in range(3000)
        for o in random_scene(rng, allow_heldout=True).objects
    }
    assert seen >= HELDOUT_PAIRS
    assert all(is_heldout(ShapeObject(c, s, "small", "top")) for c, s in HELDOUT_PAIRS)


def test_heldout_scenes_contain_a_heldout_object():
    scenes_ = heldout_scenes(np.random.default_rng(3), 500)
    assert all(scene_is_heldout(s) for s in scenes_)
    assert all(s.background not in [o.colour for o in s.objects] for s in scenes_)
    assert {len(s.objects) for s in scenes_} == {1, 2}


def test_eval_prompts_are_deterministic_and_mixed():
    prompts = sample_eval_prompts(seed=7, n=40, mix="half")
    assert prompts == sample_eval_prompts(seed=7, n=40, mix="half")
    assert prompts != sample_eval_prompts(seed=8, n=40, mix="half")
    assert sum(p.heldout for p in prompts) == 20
    for p in prompts:
        assert p.text == caption(p.scene)
        assert p.heldout == scene_is_heldout(p.scene)


def test_grammar_mix_holds_out_pairs_at_the_grammars_rate():
    prompts = sample_eval_prompts(seed=7, n=2000, mix="grammar")
    assert prompts == sample_eval_prompts(seed=7, n=2000, mix="grammar")
    objects = [o for p in prompts for o in p.scene.objects]
    rate = sum(is_heldout(o) for o in objects) / len(objects)
    assert 0.10 < rate < 0.15  # 4 of the 32 colour-shape pairs
    assert all(p.heldout == scene_is_heldout(p.scene) for p in prompts)
    with pytest.raises(ValueError, match="unknown eval mix"):
        sample_eval_prompts(seed=7, n=4, mix="all")


def test_eval_prompts_leave_out_the_training_scenes():
    train = training_scenes(seed=3, num=2000)
    assert 1000 < len(train) <= 2000  # one-object scenes repeat
    plain = sample_eval_prompts(seed=0, n=300)
    assert sum(p.scene in train for p in plain) > 20  # a small grammar: many would be seen
    for mix in EVAL_MIXES:
        prompts = sample_eval_prompts(seed=0, n=300, mix=mix, exclude=train)
        assert len(prompts) == 300 and not any(p.scene in train for p in prompts)
    assert sample_eval_prompts(seed=0, n=300, exclude=train) == sample_eval_prompts(
        seed=0, n=300, exclude=train
    )


def test_training_scenes_are_the_datasets_scenes():
    for i in range(20):
        scene, _ = training_scene(5, i)
        _, text = shapes_writer.training_example(5, i, size=16)  # sizes, places may be left out
        assert text.endswith(f"{scene.background} background")
        assert all(o.colour in text and o.shape in text for o in scene.objects)


def test_eval_scenes_use_a_different_stream_than_training():
    train = [shapes_writer.training_example(0, i, size=16)[1] for i in range(20)]
    evaluation = [
        p.text for p in sample_eval_prompts(seed=0, n=20, heldout_fraction=0.0, mix="half")
    ]
    assert train != evaluation


def test_render_size_background_and_determinism():
    scene = random_scene(np.random.default_rng(4))
    image = render(scene, 64, np.random.default_rng(5))
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == COLOURS[scene.background]
    again = render(scene, 64, np.random.default_rng(5))
    assert image.tobytes() == again.tobytes()
    assert render(scene, 64).tobytes() == render(scene, 64).tobytes()


def _bounds(obj, layout):
    cx, cy, radius, rotation = layout
    if obj.shape == "circle":
        return cx - radius, cy - radius, cx + radius, cy + radius
    xs, ys = zip(*polygon_outline(obj.shape, cx, cy, radius, rotation), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def test_jittered_objects_stay_apart_and_inside_the_canvas():
    rng = np.random.default_rng(6)
    for _ in range(2000):
        scene = random_scene(rng, allow_heldout=True)
        boxes = [_bounds(obj, object_layout(obj, rng)) for obj in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert min(x0, y0) > 0.001 and max(x1, y1) < 0.999
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap > 0.002


def _read_tree(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_writer_layout_and_determinism(tmp_path):
    calls = []
    out = write_shapes_dataset(
        tmp_path / "a", 5, size=32, seed=3, progress=lambda d, t: calls.append((d, t))
    )
    names = sorted(p.name for p in out.iterdir())
    expected = [f"0000{i}.{ext}" for i in range(5) for ext in ("png", "txt")]
    assert names == expected + ["metadata.jsonl"]
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [f"0000{i}.png" for i in range(5)]
    for line in lines:
        text = (out / line["file_name"].replace(".png", ".txt")).read_text().strip()
        assert text == line["text"]
        assert not any(f"{colour} {shape}" in text for colour, shape in HELDOUT_PAIRS)
    assert calls[-1] == (5, 5)
    write_shapes_dataset(tmp_path / "b", 5, size=32, seed=3)
    assert _read_tree(tmp_path / "a") == _read_tree(tmp_path / "b")
    write_shapes_dataset(tmp_path / "c", 5, size=32, seed=4)
    assert _read_tree(tmp_path / "a") != _read_tree(tmp_path / "c")


def test_a_longer_dataset_starts_with_the_shorter_one(tmp_path):
    write_shapes_dataset(tmp_path / "short", 3, size=24, seed=1)
    write_shapes_dataset(tmp_path / "long", 5, size=24, seed=1)
    short, long = _read_tree(tmp_path / "short"), _read_tree(tmp_path / "long")
    assert all(long[name] == data for name, data in short.items() if name != "metadata.jsonl")
    assert long["metadata.jsonl"].startswith(short["metadata.jsonl"])


def test_training_captions_sometimes_leave_out_size_and_place():
    texts = [shapes_writer.training_example(0, i, size=16)[1] for i in range(400)]
    without_place = [t for t in texts if "," not in t]
    without_size = [t for t in texts if not any(f" {size} " in t for size in SIZES)]
    assert 40 < len(without_place) < 120 and 40 < len(without_size) < 120
    assert any(
        t.count(" ") == 6 for t in without_place if t in without_size
    )  # "a red circle on a blue background"
    full = [t for t in texts if t not in without_place and t not in without_size]
    assert all(caption(parse_caption(t)) == t for t in full)


def test_caption_variants_do_not_change_the_images():
    rng = np.random.default_rng([TRAIN_STREAM, 0, 7])
    scene = random_scene(rng, allow_heldout=False)
    image = render(scene, 16, rng)
    assert np.array_equal(
        np.asarray(image), np.asarray(shapes_writer.training_example(0, 7, 16)[0])
    )
