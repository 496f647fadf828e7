"""The colour fix of diffusion upscales: the low frequencies come from the input, the rest from
the model (StableSR's "colour fix", with one Gaussian band instead of a wavelet stack).

A diffusion upscaler redraws the whole image, and small drifts of colour or brightness over
large areas cost more fidelity than its sharper edges gain. The input already knows everything
below its own resolution, so the result keeps the model's detail above that band and takes the
band itself from the bicubic enlargement of the input:

    fixed = result - blur(result) + blur(bicubic(input)),  blur = Gaussian, sigma = f / 2

with f the scale (sigma half an input pixel, in output pixels). On unseen shapes scenes the
embedded x4 model gains 0.5-2.4 dB PSNR from it (docs/upscaling.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

COLOR_FIXES = ("gaussian", "none")
AUTO = "auto"  # gaussian for the embedded x4 model, none for real checkpoints (as diffusers)


def low_band(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """`pixels` [B, C, H, W] blurred by a Gaussian of `sigma` pixels, edges reflected."""
    from torchvision.transforms.functional import gaussian_blur

    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(pixels, [size, size], [sigma, sigma])


def gaussian_color_fix(result: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
    """`result` [3, H, W] in [0, 1] with its low band replaced by the low-res input's
    ([1, 3, h, w] in [-1, 1], H = f h); clamped to [0, 1]."""
    factor = result.shape[-1] / low_res.shape[-1]
    reference = F.interpolate(
        low_res.float().cpu() / 2 + 0.5, size=result.shape[-2:], mode="bicubic"
    ).clamp(0, 1)
    sigma = factor / 2
    high = result[None] - low_band(result[None], sigma)
    return (high + low_band(reference, sigma))[0].clamp(0, 1)
