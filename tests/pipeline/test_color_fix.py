"""The Gaussian colour fix of diffusion upscales: the input's low band, the model's detail."""

import torch
import torch.nn.functional as F

from ldm_cli.pipeline.tasks.color_fix import gaussian_color_fix, low_band


def _low_res(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, 16, 16), generator=g) * 1.6 - 0.8  # [-1, 1], no clamping


def _bicubic(low_res, factor=4):
    return F.interpolate(low_res / 2 + 0.5, scale_factor=factor, mode="bicubic")[0].clamp(0, 1)


def test_a_bicubic_enlargement_is_left_as_it_is():
    low = _low_res()
    reference = _bicubic(low)
    assert torch.allclose(gaussian_color_fix(reference, low), reference, atol=1e-6)


def test_a_colour_cast_over_the_whole_image_is_removed():
    low = _low_res(1)
    reference = _bicubic(low)
    cast = (reference + torch.tensor([0.05, -0.03, 0.02]).view(3, 1, 1)).clamp(0, 1)
    fixed = gaussian_color_fix(cast, low)
    assert (fixed - reference).mean(dim=(1, 2)).abs().max() < 2e-3
    assert (cast - reference).mean(dim=(1, 2)).abs().max() > 0.015


def test_detail_above_the_band_is_kept():
    """A checkerboard at the output's Nyquist frequency (which the input cannot hold) survives."""
    low = torch.zeros((1, 3, 16, 16))
    flat = _bicubic(low)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = ((yy + xx) % 2).float() * 0.2 - 0.1
    fixed = gaussian_color_fix(flat + checker, low)
    assert torch.allclose(fixed - flat, checker.expand(3, -1, -1), atol=2e-3)


def test_the_low_band_of_a_constant_is_the_constant():
    constant = torch.full((1, 3, 20, 24), 0.3)
    assert torch.allclose(low_band(constant, 2.0), constant)
