"""The embedded default model: it ships, loads like any checkpoint, and follows prompts.

Golden tests: fixed prompts and seeds render images whose regions have the asked colours,
places, shapes and sizes (checked by the same pixel analysis as `ldm eval`), and equal the
stored golden PNGs up to floating-point noise across CPUs. After retraining the embedded model,
rewrite them with
`LDM_UPDATE_GOLDEN=1 pytest tests/pipeline/test_embedded_model.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_cli.core.embedded import DEFAULT_NAME, WEIGHTS_DIR
from ldm_cli.core.image_metrics import psnr
from ldm_cli.data.shapes import Scene, ShapeObject, caption
from ldm_cli.evaluation.pixel_analysis import COLOUR_NAMES, analyse, classify_pixels

GOLDEN_DIR = Path(__file__).parents[1] / "golden"
MODEL = WEIGHTS_DIR / DEFAULT_NAME
# (scene, seed): rendered at the generate defaults (30 steps, euler_a, 64x64, the model's own
# guidance scale: 3)
GOLDEN = [
    (Scene("blue", (ShapeObject("red", "circle", "large", "center"),)), 1),
    (Scene("yellow", (ShapeObject("black", "square", "large", "left"),)), 2),
    (Scene("green", (ShapeObject("white", "triangle", "large", "top"),)), 3),
    (
        Scene(
            "purple",
            (
                ShapeObject("yellow", "circle", "large", "top left"),
                # green squares never appear in training (a held-out pair)
                ShapeObject("green", "square", "large", "bottom right"),
            ),
        ),
        4,
    ),
]
# Equal up to float noise: a different CPU may pick other kernels, which moves a few pixels.
GOLDEN_MIN_PSNR = 30.0


@pytest.fixture(scope="module")
def pipe():
    from ldm_cli.pipeline.load import load

    return load(None, device="cpu")


def test_the_embedded_model_ships_small_and_loads_strictly():
    from ldm_cli.checkpoints.detect import detect_config
    from ldm_cli.checkpoints.file import read_header

    assert MODEL.is_file(), "weights/ldm-shapes.safetensors is missing"
    assert MODEL.stat().st_size <= 30 * 2**20
    assert (WEIGHTS_DIR / "ldm-shapes.clip-tower.safetensors").is_file()
    cfg = detect_config(read_header(MODEL))
    assert cfg.family == "sd1" and cfg.default_size == 64
    # what ldm_cli.training.embedded_config.EMBEDDED names, so `ldm train --config embedded`
    # remakes this architecture
    assert (cfg.text.clip_skip, cfg.default_cfg) == (2, 3.0)


def _golden_path(scene: Scene, seed: int) -> Path:
    slug = caption(scene).replace(",", "").replace(" ", "-")[:60]
    return GOLDEN_DIR / f"{seed}-{slug}.png"


@pytest.mark.parametrize(("scene", "seed"), GOLDEN, ids=[caption(s) for s, _ in GOLDEN])
def test_golden_prompts_give_the_asked_colours(pipe, scene, seed):
    (image,) = pipe.generate(caption(scene), seed=seed)
    assert image.size == (64, 64)
    result = analyse(image, scene)
    assert result["background_ok"], result
    for obj in result["objects"]:
        assert obj["colour_ok"] and obj["place_ok"], result
        assert obj["shape_ok"] and obj["size_ok"], result

    golden = _golden_path(scene, seed)
    if os.environ.get("LDM_UPDATE_GOLDEN") == "1":  # after retraining the embedded model
        image.save(golden)
    assert golden.is_file(), f"{golden} is missing"
    expected = np.asarray(Image.open(golden).convert("RGB"))
    assert psnr(np.asarray(image), expected) >= GOLDEN_MIN_PSNR


def test_the_short_prompt_of_the_readme(pipe):
    """ "a red circle on a blue background": blue border, a red region inside."""
    (image,) = pipe.generate("a red circle on a blue background", seed=1)
    labels = classify_pixels(np.asarray(image))
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    assert np.mean(border == COLOUR_NAMES.index("blue")) > 0.9
    assert np.sum(labels == COLOUR_NAMES.index("red")) >= 40  # a circle of at least ~7 px across


def test_inpainting_a_green_circle_into_a_generated_image(pipe):
    scene = Scene("blue", (ShapeObject("red", "circle", "large", "center"),))
    (base,) = pipe.generate(caption(scene), seed=1)
    mask = Image.new("L", base.size, 0)
    mask.paste(255, (40, 0, 64, 24))  # the top right cell
    target = Scene("blue", (ShapeObject("green", "circle", "large", "top right"),))
    (image,) = pipe.inpaint(base, mask, caption(target), seed=5, mask_blur=0)
    labels = classify_pixels(np.asarray(image))
    inside = labels[2:22, 42:62]
    assert np.mean(inside == COLOUR_NAMES.index("green")) > 0.15
    outside = np.ones(labels.shape, bool)
    outside[:24, 40:] = False
    assert np.array_equal(np.asarray(image)[outside], np.asarray(base)[outside])


def test_the_embedded_lcm_lora_draws_the_scenes_in_four_steps(pipe):
    """weights/ldm-shapes-lcm.safetensors (`ldm train lcm`): 4 lcm steps, no unconditional
    pass, the golden scenes' colours, shapes and places (weights/README.md has its eval)."""
    lora = WEIGHTS_DIR / "ldm-shapes-lcm.safetensors"
    assert lora.is_file() and lora.stat().st_size <= 5 * 2**20
    pipe.networks.add_lora(lora, 1.0)
    try:
        for scene, seed in GOLDEN[:3]:
            (image,) = pipe.generate(caption(scene), seed=seed, sampler="lcm", steps=4, cfg=1)
            result = analyse(image, scene)
            assert result["background_ok"], result
            for obj in result["objects"]:
                assert obj["colour_ok"] and obj["place_ok"] and obj["shape_ok"], result
            assert "Sampler: LCM" in image.info["parameters"]
    finally:
        pipe.networks.clear_loras()
