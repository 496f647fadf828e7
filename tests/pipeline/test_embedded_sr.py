"""The shipped upscalers against the issue's targets: the embedded ldm-sr network on photos it
never saw and on shapes scenes at three scales, and the embedded x4 diffusion model keeping every
shape at those scales (the measurement of docs/upscaling.md, ldm_cli.evaluation.upscalers, on
fewer scenes)."""

from __future__ import annotations

import pytest
from PIL import Image

from ldm_cli.core.embedded import SR_NAMES, WEIGHTS_DIR
from ldm_cli.evaluation.upscalers import (
    SHAPES_SIDES,
    evaluate_set,
    network_method,
    photo_examples,
    resampler,
    shapes_examples,
)

SHIPPED = [WEIGHTS_DIR / name for name in SR_NAMES.values()]
pytestmark = pytest.mark.skipif(
    not all(p.exists() for p in SHIPPED), reason="the embedded ldm-sr networks are not built"
)
BICUBIC = resampler(Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def network():
    return network_method()


def test_held_out_photos_at_x4(network):
    rows, _ = evaluate_set(photo_examples(), {"bicubic": BICUBIC, "ldm-sr": network})
    ours = rows["ldm-sr"]
    assert ours["gain_db"] >= 1.0, rows
    assert ours["worst_gain_db"] >= -0.2, rows
    assert ours["colour_shift"] <= 2.0, rows


def test_the_x2_network_beats_bicubic_at_x2():
    from ldm_cli.evaluation.upscalers import evaluate_photos
    from ldm_cli.pipeline.tasks.image_upscaler import load_embedded_upscaler

    result = evaluate_photos(load_embedded_upscaler(2))
    assert result["mean_gain_db"] >= 1.0 and result["worst_gain_db"] >= 0, result


@pytest.mark.slow
@pytest.mark.parametrize("side", SHAPES_SIDES)
def test_shapes_scenes_at_every_scale(network, side):
    methods = {"bicubic": BICUBIC, "ldm-sr": network}
    rows, _ = evaluate_set(shapes_examples(side, 8), methods)
    for name in methods:
        if name != "bicubic":
            assert rows[name]["gain_db"] >= 1.0, (name, rows)
            assert rows[name]["shapes_kept"] >= rows["original"]["shapes_kept"] - 0.1, (name, rows)


@pytest.mark.slow
@pytest.mark.parametrize("side", SHAPES_SIDES)
def test_the_diffusion_model_keeps_the_shapes_at_every_scale(side):
    """Fine-tuned at 64, 128 and 256 px, with its colour fix: with the caption it keeps every
    object's shape and colour at each scale (the model before it drew blobs at 32 -> 128),
    beats bicubic by a decibel and keeps the mean colours."""
    from ldm_cli.evaluation.upscalers import diffusion_method

    methods = {"bicubic": BICUBIC, "ldm-shapes-x4": diffusion_method(prompted=True)}
    rows, _ = evaluate_set(shapes_examples(side, 4), methods)
    ours = rows["ldm-shapes-x4"]
    assert ours["shapes_kept"] >= rows["original"]["shapes_kept"] - 0.1, rows
    assert ours["gain_db"] >= 1.0, rows
    assert ours["colour_shift"] <= 2.0, rows
