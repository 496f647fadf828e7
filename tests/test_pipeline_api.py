"""The public Python API on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

import ldm_cli
from ldm_cli.config import TINY_SD1
from ldm_cli.errors import UserError
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
