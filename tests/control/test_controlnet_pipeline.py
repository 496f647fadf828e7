"""Whole images with ControlNets: `ldm` against diffusers' StableDiffusionControlNetPipeline on
the same single-file checkpoint and ControlNet files (seeded random weights), Euler, same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.control.controlnet_helpers import random_controlnet, save_state, to_diffusers
from tests.pipeline.test_pipeline_parity import NEGATIVE, PROMPT, SEED, write_config_dir

diffusers = pytest.importorskip("diffusers")

SIZE = 64
STEPS = 8


def control_image(seed: int, size=(96, 96)) -> Image.Image:
    """White shapes on black at 1.5x the output size (resized as diffusers resizes it)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size[0] - 30, 2)
        draw.ellipse((x, y, x + 30, y + 30), outline="white", width=3)
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    checkpoint = random_checkpoint(TINY_SD1, root / "tiny-sd1.safetensors", seed=11)
    nets = {}
    for k, seed in enumerate((21, 22)):
        # the tiny VAE halves the image once: a hint embedding with one stride-2 convolution
        model = random_controlnet(TINY_SD1.unet, seed=seed, scale=3.0, widths=(16, 32))
        nets[k] = (
            model,
            save_state(model.state_dict(), root / f"cn{k}.safetensors", "control_model."),
        )
    images = [control_image(1), control_image(2)]
    return checkpoint, nets, images


@pytest.fixture(scope="module")
def ours(files):
    return load(files[0], device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory, reference_dir):
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    config_dir = write_config_dir(tmp_path_factory.mktemp("config"), reference_dir)
    base = StableDiffusionPipeline.from_single_file(
        str(files[0]), config=str(config_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    nets = [to_diffusers(model, TINY_SD1.unet) for model, _ in files[1].values()]
    pipes = {}
    for count in (1, 2):
        pipe = StableDiffusionControlNetPipeline(
            **{k: v for k, v in base.components.items() if k != "image_encoder"},
            controlnet=nets[0] if count == 1 else nets,
        )
        pipe.scheduler = EulerDiscreteScheduler.from_config(
            base.scheduler.config, timestep_spacing="linspace"
        )
        pipe.set_progress_bar_config(disable=True)
        pipes[count] = pipe
    return pipes


def reference_image(pipe, images, **kwargs) -> np.ndarray:
    out = pipe(
        PROMPT, image=images, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=7.5, height=SIZE, width=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kwargs,
    ).images[0]  # fmt: skip
    return (out * 255).round().astype(np.uint8)


def our_image(pipe, controls, mode="balanced") -> np.ndarray:
    (image,) = pipe.generate(
        PROMPT, NEGATIVE, steps=STEPS, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal",
        width=SIZE, height=SIZE, control=controls, control_mode=mode,
    )  # fmt: skip
    return np.asarray(image)


def assert_same_image(a: np.ndarray, b: np.ndarray, plain: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 2, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"
    assert a.std() > 5
    # the ControlNets changed the picture far more than the two implementations differ, so
    # the agreement is about them
    moved = np.abs(a.astype(int) - plain.astype(int))
    print(f"ControlNet effect: mean {moved.mean():.3f}, max {moved.max()}; ", end="")
    print(f"ldm-diffusers mean {diff.mean():.4f}")
    assert moved.max() >= 8 and moved.mean() > 10 * diff.mean()


@pytest.fixture(scope="module")
def plain(ours):
    return our_image(ours, None)


def test_one_controlnet_matches_diffusers(files, ours, reference, plain):
    _, nets, images = files
    control = ldm_cli.Control(nets[0][1], images[0])
    assert_same_image(our_image(ours, control), reference_image(reference[1], images[0]), plain)


def test_two_controlnets_with_weights_match_multicontrolnet(files, ours, reference, plain):
    _, nets, images = files
    controls = [
        ldm_cli.Control(nets[0][1], images[0], weight=0.7),
        ldm_cli.Control(nets[1][1], images[1], weight=0.5),
    ]
    expected = reference_image(reference[2], images, controlnet_conditioning_scale=[0.7, 0.5])
    assert_same_image(our_image(ours, controls), expected, plain)


def test_start_end_and_guess_mode_match_diffusers(files, ours, reference, plain):
    _, nets, images = files
    control = ldm_cli.Control(nets[0][1], images[0], start=0.25, end=0.75)
    expected = reference_image(
        reference[1], images[0], control_guidance_start=0.25, control_guidance_end=0.75
    )
    assert_same_image(our_image(ours, control), expected, plain)
    control = ldm_cli.Control(nets[0][1], images[0])
    expected = reference_image(reference[1], images[0], guess_mode=True)
    assert_same_image(our_image(ours, control, "controlnet"), expected, plain)
