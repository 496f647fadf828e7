"""A U-Net trained on the flow objective (`ldm train --objective flow`) in the SD pipeline:
flow sigmas from 1, x0 = x - sigma * v with timestep 1000 sigma, the flow samplers only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.pipeline.base import flow_unet_denoiser
from ldm_cli.testing import random_checkpoint

FLOW_SD1 = TINY_SD1.with_(prediction="flow")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = random_checkpoint(FLOW_SD1, tmp_path_factory.mktemp("flow") / "flow.safetensors")
    return ldm_cli.load(path, device="cpu")


def test_denoiser_feeds_the_unet_sigma_times_1000_and_returns_x_minus_sigma_v():
    seen = {}

    def unet(x, t, **cond):
        seen["t"], seen["x"] = t, x
        return torch.full_like(x, 2.0)

    x = torch.randn(2, 4, 8, 8)
    x0 = flow_unet_denoiser(unet)(x, torch.tensor([0.5, 0.25]))
    assert torch.equal(seen["t"], torch.tensor([500.0, 250.0])) and seen["x"] is x
    assert torch.allclose(x0, x - torch.tensor([0.5, 0.25]).view(-1, 1, 1, 1) * 2.0)


def test_flow_sigmas_and_samplers(pipe):
    req = pipe.request("a red circle", steps=4, seed=1)
    sigmas, timesteps = pipe.sigmas(req)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and req.sampler == "euler"
    assert torch.allclose(timesteps, sigmas[:-1] * 1000)
    for sampler in ("euler", "euler_a", "dpmpp_2m"):
        (image,) = pipe.generate("a red circle", steps=3, seed=1, sampler=sampler)
        assert np.asarray(image).std() > 0
    with pytest.raises(UserError, match="does not run flow models"):
        pipe.generate("a red circle", steps=3, sampler="ddim")


def test_img2img_at_strength_zero_is_the_vae_round_trip_and_one_ignores_the_image(pipe):
    (image,) = pipe.generate("a red circle", steps=3, seed=1)
    same = pipe.img2img(image, "a red circle", steps=3, seed=1, strength=0.0)[0]
    again = pipe.img2img(image, "a red circle", steps=3, seed=1, strength=1.0)[0]
    assert np.abs(np.asarray(same).astype(int) - np.asarray(image).astype(int)).max() < 255
    assert np.array_equal(np.asarray(again), np.asarray(image))
