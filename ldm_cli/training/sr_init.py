"""The super-resolution network's starting point: a linear upscaler inside it.

A compact network trained from its default initialisation starts as a nearest-neighbour
upscale and needs tens of thousands of steps to pass bicubic; a CPU run has a few thousand.
So three of its channels start as an identity path through every convolution (the inputs are
pixels >= 0, which every PReLU passes unchanged), and the last convolution reads them with a
3x3 filter per output sub-pixel fitted by least squares to training pairs: the best linear
upscaler of that footprint, a little better than bicubic. The other channels start random
(Kaiming, for PReLU) and their weights in the last convolution at zero, so the network starts
exactly as that linear upscaler and training only adds to it.
"""

from __future__ import annotations

import torch
from torch import nn

PASS_CHANNELS = 3
PRELU_SLOPE = 0.25  # torch's default PReLU slope, for the Kaiming gain


def fit_linear_filters(low: torch.Tensor, high: torch.Tensor, scale: int) -> torch.Tensor:
    """Least-squares 3x3 filters [scale * scale, 3, 3] with biases [scale * scale]: from a
    low-res pixel's neighbourhood to the residual of each of its sub-pixels over it (what the
    network's last convolution adds to the nearest upsample). One filter for all colours."""
    lo = low.double().reshape(-1, 1, *low.shape[-2:])  # every colour channel an example
    hi = high.double().reshape(-1, 1, *high.shape[-2:])
    patches = nn.functional.unfold(nn.functional.pad(lo, (1, 1, 1, 1), mode="replicate"), 3)
    design = patches.permute(0, 2, 1).reshape(-1, 9)  # [N * h * w, 9]
    design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1)
    centre = lo.reshape(-1)
    shuffled = nn.functional.pixel_unshuffle(hi, scale)  # [N, s*s, h, w]
    targets = shuffled.permute(0, 2, 3, 1).reshape(-1, scale * scale) - centre[:, None]
    solution = torch.linalg.lstsq(design, targets).solution  # [10, s*s]
    return solution.T.float()  # [s*s, 10]: 9 weights, then the bias


def init_with_linear_path(network: nn.Module, filters: torch.Tensor, seed: int) -> nn.Module:
    """Set a compact network (spandrel's Compact) up as described in the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in network.body if isinstance(m, nn.Conv2d)]
    prelus = [m for m in network.body if isinstance(m, nn.PReLU)]
    scale = network.upscale
    with torch.no_grad():
        for conv in convs[:-1]:
            fan_in = conv.in_channels * 9
            std = (2 / (1 + PRELU_SLOPE**2) / fan_in) ** 0.5
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            conv.bias.zero_()
            conv.weight[:PASS_CHANNELS] = 0
            for c in range(PASS_CHANNELS):
                conv.weight[c, c, 1, 1] = 1.0
        for prelu in prelus:
            prelu.weight.fill_(PRELU_SLOPE)
            prelu.weight[:PASS_CHANNELS] = 1.0
        last = convs[-1]
        last.weight.zero_()
        last.bias.zero_()
        for colour in range(PASS_CHANNELS):
            for sub in range(scale * scale):
                row = colour * scale * scale + sub  # PixelShuffle's channel order
                last.weight[row, colour] = filters[sub, :9].view(3, 3)
                last.bias[row] = filters[sub, 9]
    return network


def linear_start(network: nn.Module, batches, seed: int) -> tuple[nn.Module, dict]:
    """Fit the filters on `batches` of (low, high) pairs and set the network up with them;
    returns it and the fit's L1 on those pairs, against bicubic's."""
    lows, highs = zip(*batches, strict=True)
    low, high = torch.cat(lows), torch.cat(highs)
    filters = fit_linear_filters(low, high, network.upscale)
    init_with_linear_path(network, filters, seed)
    with torch.no_grad():
        l1 = (network(low) - high).abs().mean().item()
        bicubic = nn.functional.interpolate(low, scale_factor=network.upscale, mode="bicubic")
        l1_bicubic = (bicubic.clamp(0, 1) - high).abs().mean().item()
    return network, {"linear_start_l1": round(l1, 5), "bicubic_l1": round(l1_bicubic, 5)}
