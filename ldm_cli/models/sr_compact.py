"""Real-ESRGAN's compact super-resolution network (SRVGGNetCompact), with its file's key names.

`body.0` is a 3x3 convolution from RGB to `features` channels, then `convs` pairs of PReLU and
3x3 convolution, a last PReLU and a 3x3 convolution to 3 * scale^2 channels that one pixel
shuffle turns into the output; the nearest-upsampled input is added, so the network learns the
residual. The embedded `ldm-sr` networks are in this layout. It is spandrel's `Compact` with
PReLU (equal to it on the same tensors: tests/pipeline/test_image_upscaler.py), kept here because
importing spandrel, which registers fifty architectures and imports torchvision, takes longer
than an upscale of a 256-pixel image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

IN_CHANNELS = 3


@dataclass(frozen=True)
class CompactShape:
    scale: int
    features: int = 64
    convs: int = 16


class SRVGGCompact(nn.Module):
    def __init__(self, shape: CompactShape):
        super().__init__()
        self.shape = shape
        f = shape.features
        layers: list[nn.Module] = [nn.Conv2d(IN_CHANNELS, f, 3, 1, 1), nn.PReLU(f)]
        for _ in range(shape.convs):
            layers += [nn.Conv2d(f, f, 3, 1, 1), nn.PReLU(f)]
        layers.append(nn.Conv2d(f, IN_CHANNELS * shape.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(shape.scale)

    @property
    def upscale(self) -> int:
        return self.shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        base = nn.functional.interpolate(x, scale_factor=self.shape.scale, mode="nearest")
        return self.upsampler(out) + base


_BODY_KEY = re.compile(r"^body\.(\d+)\.(weight|bias)$")


def compact_shape(state: dict[str, torch.Tensor]) -> CompactShape | None:
    """The shape of a state dict in this layout with PReLU activations, else None."""
    indices = set()
    for key in state:
        match = _BODY_KEY.match(key)
        if match is None:
            return None
        indices.add(int(match.group(1)))
    if not indices or indices != set(range(max(indices) + 1)) or len(indices) % 2 == 0:
        return None
    last = max(indices)
    first = state.get("body.0.weight")
    if first is None or first.ndim != 4 or first.shape[1] != IN_CHANNELS:
        return None
    if any(state[f"body.{i}.weight"].ndim != 1 for i in range(1, last, 2)):
        return None  # ReLU variants have no activation weights; spandrel reads those
    outputs = state[f"body.{last}.weight"].shape[0]
    scale = math.isqrt(outputs // IN_CHANNELS)
    if scale < 1 or scale * scale * IN_CHANNELS != outputs:
        return None
    return CompactShape(scale=scale, features=int(first.shape[0]), convs=(last - 2) // 2)
