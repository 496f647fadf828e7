"""An SDXL ControlNet in diffusers' layout (how SDXL ControlNets ship): `ldm` against diffusers'
StableDiffusionXLControlNetPipeline on the same tiny files, Euler, same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldm_cli
from ldm_cli.core.config import TINY_SDXL
from tests.control.controlnet_helpers import save_state
from tests.pipeline.test_sdxl import (  # noqa: F401 (fixtures)
    NEGATIVE,
    PROMPT,
    SEED,
    SIZE,
    SIZE_EMBED_DIM,
    files,
    ours,
    reference,
)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_torch_thread")
STEPS = 4


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    from diffusers import ControlNetModel

    from tests.control.controlnet_helpers import diffusers_controlnet_config, randomize_

    # the tiny VAE halves the image once: one stride-2 convolution in the hint embedding
    config = diffusers_controlnet_config(TINY_SDXL.unet, SIZE_EMBED_DIM, (16, 32))
    net = randomize_(ControlNetModel(**config), 31, scale=2.0).eval()
    path = save_state(net.state_dict(), tmp_path_factory.mktemp("xl") / "cn-xl.safetensors")
    image = Image.new("RGB", (SIZE, SIZE))
    ImageDraw.Draw(image).rectangle((10, 14, 50, 40), outline="white", width=3)
    return net, path, image


def test_sdxl_controlnet_matches_diffusers(ours, reference, controlnet):  # noqa: F811
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    net, path, image = controlnet
    base = reference["base"]
    pipe = StableDiffusionXLControlNetPipeline(
        **{
            k: v
            for k, v in base.components.items()
            if k not in ("image_encoder", "feature_extractor")
        },
        controlnet=net,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        base.original_scheduler_config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=5.0, height=SIZE, width=SIZE, controlnet_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]  # fmt: skip
    expected = (out * 255).round().astype(np.uint8)
    settings = dict(
        steps=STEPS, cfg=5.0, seed=SEED, sampler="euler", scheduler="normal", width=SIZE,
        height=SIZE,
    )  # fmt: skip
    (image_ours,) = ours.generate(
        PROMPT, NEGATIVE, control=ldm_cli.Control(path, image, weight=0.8), **settings
    )
    (plain,) = ours.generate(PROMPT, NEGATIVE, **settings)
    got = np.asarray(image_ours).astype(int)
    diff = np.abs(got - expected.astype(int))
    moved = np.abs(got - np.asarray(plain).astype(int))
    print(f"SDXL ControlNet: max diff {diff.max()}, effect mean {moved.mean():.3f}")
    assert diff.max() <= 2 and expected.std() > 5
    assert moved.max() >= 8
