"""Convolutional pieces of the LDM U-Net, with the module names of the original ``openaimodel.py``.

``nn.Identity`` entries stand where the original holds a dropout, so that the indices of the
following layers (``out_layers.3``) match the checkpoint keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.models.attention import SpatialTransformer
from ldm_cli.ops.upsample_conv import FoldedUpsample
from ldm_cli.ops.winograd_conv import WinogradConv2d

RESBLOCK_GROUPNORM_EPS = 1e-5
TIMESTEP_MAX_PERIOD = 10000


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: int = TIMESTEP_MAX_PERIOD
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], (n, dim), fp32."""
    half = dim // 2
    # Same operation order as the original (and diffusers), so results agree bit for bit.
    exponent = (
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        / half
    )
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalizes half-precision inputs in float32, as the original does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between, plus a skip path.

    The 3x3 convolutions can take the opt-in Winograd path (see ``winograd_conv``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        norm_groups: int = 32,
    ):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(),
            WinogradConv2d(channels, out_channels, kernel_size=3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels, eps=RESBLOCK_GROUPNORM_EPS),
            nn.SiLU(),
            nn.Identity(),
            WinogradConv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (a large weight goes a slice at a time: models/weight_slices)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.op = WinogradConv2d(channels, out_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(FoldedUpsample):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (computed as
    four 2x2 convolutions on the small input: see ``upsample_conv``)."""


class TimestepEmbedSequential(nn.Sequential):
    """A sequence that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        repeats: int = 1,
    ) -> torch.Tensor:
        """``repeats`` > 1: ``x`` and ``emb`` are the rows a batch of ``context`` repeats that
        many times; the first transformer repeats them (UNetModel.forward)."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb if repeats == 1 else emb[: x.shape[0]])
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, repeats)
                repeats = 1
            else:
                x = layer(x)
        return x
