"""GroupNorm -> SiLU -> 3x3 convolution over horizontal strips, for big inference inputs.

A VAE decoder's ResnetBlock at 512x512 holds its 256-channel input (256 MiB), the normalised
copy of it (another 256 MiB) and the convolution's output at once. Each output row of a 3x3
convolution only reads three input rows, and GroupNorm only needs its per-group mean and
variance, which one cheap reduction gives. So the block can normalise, activate and convolve a
strip of rows at a time (with one row of halo on each side), writing into the output: the same
sums, with the full-size normalised copy replaced by one strip. Only the per-group statistics
and the order of the affine's two roundings differ from ``F.group_norm``, so results agree to
float rounding (about 1e-6 relative).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.models.channels_last import is_channels_last

# Inputs at least this big (bytes per image) go through strips, each about STRIP_BYTES of input.
MIN_BYTES = 64 << 20
STRIP_BYTES = 16 << 20


def use_strips(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Inference on a big 4-d input, with a plain 3x3 stride-1 padding-1 conv."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or x.dim() != 4:
        return False
    if x[0].numel() * x.element_size() < MIN_BYTES:
        return False
    plain = conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    return plain and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"


def strip_rows(x: torch.Tensor) -> int:
    return max(1, STRIP_BYTES // (x[:, :, :1].numel() * x.element_size()))


def group_affine(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, channel) scale and shift with norm(x) == x * scale + shift, (n, c, 1, 1)."""
    n, c = x.shape[:2]
    groups = norm.num_groups
    if is_channels_last(x):  # (n, h*w, groups, c / groups) is a view of NHWC memory
        nhwc = x.permute(0, 2, 3, 1).reshape(n, -1, groups, c // groups)
        var, mean = torch.var_mean(nhwc, dim=(1, 3), correction=0)
    else:
        var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=2, correction=0)
    rstd = (var + norm.eps).rsqrt()
    scale = rstd.repeat_interleave(c // groups, dim=1)
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if norm.weight is not None:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    return scale[:, :, None, None], shift[:, :, None, None]


def norm_silu_conv(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    conv: nn.Conv2d,
    residual: Callable[[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """conv(silu(norm(x))) (+ residual(r0, r1) on output rows r0:r1), strip by strip."""
    n, _, height, width = x.shape
    scale, shift = group_affine(x, norm)
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(
        (n, conv.out_channels, height, width), dtype=x.dtype, device=x.device, memory_format=layout
    )
    rows = strip_rows(x)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        top, bottom = max(r0 - 1, 0), min(r1 + 1, height)
        strip = torch.addcmul(shift, x[:, :, top:bottom], scale)
        F.silu(strip, inplace=True)
        if top < r0 and bottom > r1:  # halo rows above and below: exactly rows r0..r1
            part = F.conv2d(strip, conv.weight, conv.bias, padding=(0, 1))
        else:  # the convolution's zero padding is the image border; the row beside a halo is cut
            part = F.conv2d(strip, conv.weight, conv.bias, padding=1)[:, :, r0 - top : r1 - top]
        if residual is not None:
            part += residual(r0, r1)
        out[:, :, r0:r1] = part
    return out
