"""The public Python API on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.testing import random_checkpoint


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=2)
    return ldm_cli.load(path, device="cpu", dtype="fp32")


def _count_unet_batches(pipe, **kwargs) -> list[int]:
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        pipe.generate("a red circle", steps=2, seed=0, **kwargs)
    finally:
        handle.remove()
    return sizes


def test_cfg_batches_cond_and_uncond_in_one_call(pipe):
    assert _count_unet_batches(pipe, cfg=7.5, sampler="euler") == [2, 2]


def test_cfg_one_skips_the_unconditional_pass(pipe):
    assert _count_unet_batches(pipe, cfg=1.0, sampler="euler") == [1, 1]


def test_api_components_follow_the_original_signatures(pipe):
    x = torch.randn(1, 4, 16, 16)
    ctx = pipe.text_encoder(pipe.tokenizer(["a cat"]))
    assert ctx.shape == (1, 77, TINY_SD1.text.hidden_size)
    eps = pipe.unet(x, torch.tensor([500]), ctx)
    assert eps.shape == x.shape
    img = pipe.vae.decode(x)
    assert img.shape == (1, 3, 32, 32)
    assert pipe.vae.encode(img).mean.shape == x.shape


def test_generate_returns_images_with_parameters(pipe):
    images = pipe.generate("a cat", seed=3, steps=2, num_images=2, batch_size=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    assert "Seed: 3," in images[0].info["parameters"]
    assert "Seed: 4," in images[1].info["parameters"]


@pytest.mark.parametrize(
    "sampler",
    [
        "euler",
        "euler_a",
        "heun",
        "dpm2",
        "lms",
        "ddim",
        "ddpm",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_sde",
        "unipc",
    ],
)
def test_every_sampler_runs_through_the_pipeline(pipe, sampler):
    (image,) = pipe.generate("a cat", seed=1, steps=3, sampler=sampler)
    assert image.size == (64, 64)


def test_bad_requests_are_user_errors(pipe):
    with pytest.raises(UserError, match="multiples"):
        pipe.generate("x", width=65)
    with pytest.raises(UserError, match="unknown sampler"):
        pipe.generate("x", sampler="k_nope")
    bad = [
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"steps": 10**6}, "steps must be between 1 and 10000"),
        ({"seed": "1"}, "seed must be a whole number, got '1'"),
        ({"seed": 2**64}, "seed must be between 0 and 2\\*\\*64-1"),
        ({"seed": 2**64 - 1, "num_images": 2}, "with 2 images"),
        ({"width": 0}, "width must be between 1 and 16384 pixels, got 0"),
        ({"num_images": 0}, "num_images must be between 1 and 100000, got 0"),
        ({"batch_size": 0}, "batch_size must be between 1 and 100000, got 0"),
    ]
    for options, message in bad:
        with pytest.raises(UserError, match=message):
            pipe.generate("x", **{"steps": 1, **options})
    with pytest.raises(UserError, match="prompt must be text, got None"):
        pipe.generate(None, steps=1)


def test_bad_settings_fail_before_sampling(pipe):
    pipe.vae_tiling = "maybe"
    try:
        with pytest.raises(UserError, match="unknown VAE tiling 'maybe'"):
            pipe.generate("x", steps=1, sampler="euler", seed=1)
    finally:
        pipe.vae_tiling = "auto"


def test_a_misspelt_option_is_named_as_the_methods(pipe):
    from PIL import Image

    with pytest.raises(
        TypeError, match=r"Pipeline.img2img\(\) got an unexpected keyword .*'strenght'"
    ):
        pipe.img2img(Image.new("RGB", (64, 64)), "x", strenght=0.5)


def test_user_error_is_exported():
    assert ldm_cli.UserError is UserError
