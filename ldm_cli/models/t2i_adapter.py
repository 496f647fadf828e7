"""T2I-Adapter (TencentARC), in the layout its released files use (diffusers' ``T2IAdapter``:
``adapter.conv_in``, ``adapter.body.i.{in_conv,resnets.j.block1,block2}``).

The control image is folded into channels (pixel unshuffle by 8, or 16 for SDXL), then blocks of
residual convolutions give one feature map per U-Net level; `UNetModel.forward(adapter=...)`
adds them to the encoder's features. Unlike a ControlNet it runs once per image, not per step.
Full adapters only (SD 1.x/2.x: every block after the first halves the size; SDXL: only the
third does).
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, down: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class FullAdapter(nn.Module):
    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        res_blocks: int,
        unshuffle: int,
        downs: tuple[bool, ...],
    ):
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(unshuffle)
        self.conv_in = nn.Conv2d(in_channels * unshuffle**2, channels[0], 3, padding=1)
        widths = (channels[0], *channels)
        self.body = nn.ModuleList(
            AdapterBlock(widths[i], widths[i + 1], res_blocks, downs[i])
            for i in range(len(channels))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv_in(self.unshuffle(x))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    """`unshuffle`: the pixel unshuffle factor (8 for SD 1.x/2.x, 16 for SDXL); `xl`: SDXL's
    blocks (one halving, in the third block) instead of a halving in every block after the
    first."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = (320, 640, 1280, 1280),
        res_blocks: int = 2,
        unshuffle: int = 8,
        xl: bool = False,
    ):
        super().__init__()
        downs = tuple(i == 2 if xl else i > 0 for i in range(len(channels)))
        self.adapter = FullAdapter(in_channels, tuple(channels), res_blocks, unshuffle, downs)
        self.in_channels = in_channels
        # control pixels per latent pixel: the first feature map is the latents' size (SD) or
        # half of it (SDXL, whose first level ends in a downsampling)
        self.hint_factor = unshuffle // 2 if xl else unshuffle

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps for `UNetModel.forward(adapter=...)` from `hint` [B, C, H, W] in [0, 1]."""
        return self.adapter(hint)
