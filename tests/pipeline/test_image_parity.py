"""Image-conditioned pipelines against diffusers, loaded from the same single-file checkpoints
(seeded random weights): img2img against StableDiffusionImg2ImgPipeline, 9-channel inpainting
against StableDiffusionInpaintPipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm_cli.core.config import TINY_SD1
from ldm_cli.pipeline.load import load
from ldm_cli.testing import random_checkpoint
from tests.image_helpers import TINY_INPAINT, box_mask, photo
from tests.pipeline.test_pipeline_parity import NEGATIVE, PROMPT, write_config_dir

diffusers = pytest.importorskip("diffusers")

SEED = 77
STEPS = 10
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "ddim": ("DDIMScheduler", {"timestep_spacing": "leading"}),
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def reference(cls_name, checkpoint, config_dir):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        config=str(config_dir),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    pipe = getattr(diffusers, cls_name)(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe, sampler: str) -> None:
    cls_name, kwargs = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **kwargs)


def as_uint8(images) -> np.ndarray:
    return (images[0] * 255).round().astype(np.uint8)


def assert_close(ours: np.ndarray, theirs: np.ndarray, where: np.ndarray | None = None) -> None:
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    if where is not None:
        diff = diff[where]
    assert diff.max() <= 2, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"
    assert ours.std() > 5  # not trivially flat


@pytest.fixture(scope="module")
def img2img_pair(tmp_path_factory, reference_dir):
    checkpoint = random_checkpoint(
        TINY_SD1, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", seed=3
    )
    config_dir = write_config_dir(tmp_path_factory.mktemp("config"), reference_dir)
    theirs = reference("StableDiffusionImg2ImgPipeline", checkpoint, config_dir)
    return load(checkpoint, device="cpu", dtype="fp32"), theirs


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.6, 0.35])
def test_img2img_matches_diffusers(img2img_pair, sampler, strength):
    ours, theirs = img2img_pair
    use_scheduler(theirs, sampler)
    expected = theirs(
        PROMPT,
        image=photo(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    (got,) = ours.img2img(
        photo(),
        PROMPT,
        NEGATIVE,
        strength=strength,
        steps=STEPS,
        cfg=7.5,
        seed=SEED,
        sampler=sampler,
        scheduler="auto",
    )
    assert_close(np.asarray(got), as_uint8(expected))


@pytest.fixture(scope="module")
def inpaint_pair(tmp_path_factory, reference_dir):
    checkpoint = random_checkpoint(
        TINY_INPAINT, tmp_path_factory.mktemp("ckpt") / "tiny-inpaint.safetensors", seed=4
    )
    config_dir = write_config_dir(tmp_path_factory.mktemp("config"), reference_dir)
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    unet_config["in_channels"] = 9
    (config_dir / "unet" / "config.json").write_text(json.dumps(unet_config))
    theirs = reference("StableDiffusionInpaintPipeline", checkpoint, config_dir)
    return load(checkpoint, device="cpu", dtype="fp32"), theirs


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_nine_channel_inpaint_matches_diffusers(inpaint_pair, sampler, strength):
    """Without blur the binary mask is what both pipelines see; diffusers returns the raw
    decode, ours pastes it into the original through the mask, so they agree inside it."""
    ours, theirs = inpaint_pair
    assert ours.is_inpainting
    use_scheduler(theirs, sampler)
    mask = box_mask(64, 64, (20, 12, 52, 44))
    expected = theirs(
        PROMPT,
        image=photo(),
        mask_image=mask,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    (got,) = ours.inpaint(
        photo(),
        mask,
        PROMPT,
        NEGATIVE,
        strength=strength,
        mask_blur=0,
        steps=STEPS,
        cfg=7.5,
        seed=SEED,
        sampler=sampler,
    )
    got = np.asarray(got)
    inside = np.asarray(mask) > 0
    assert_close(got, as_uint8(expected), where=inside)
    assert np.array_equal(got[~inside], np.asarray(photo())[~inside])
