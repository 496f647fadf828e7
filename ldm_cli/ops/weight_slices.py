"""Convolutions and linear layers computed a slice of output channels at a time (CPU inference).

Two kinds of weight go this way (`sliced`):
- a narrow one, kept in the file's fp16/bf16 and widened per call (models/narrow_weights):
  each slice is widened into a small buffer that stays in cache;
- an fp32 one larger than CHUNK_BYTES. oneDNN reorders a convolution's whole weight into its
  own blocked layout, in scratch memory, at every call: 113 MB for SD 1.5's largest (1280 x
  2560 x 3 x 3), allocated in the middle of a step. With the `ldm` allocator settings freed
  memory stays in the process, and those scratch blocks, placed wherever they fit, left the
  heap about 90 MB larger than it needed to be (found by logging each growth of the heap with
  a malloc shim): SD 1.5 from its fp32 file at 256x256, peak RSS 4070-4126 -> 4013-4033 MiB,
  steps as fast (1.20-1.26 -> 1.15-1.20 s; 512x512 alike within noise).

Each output channel is the same sum of products as without slicing; only the kernels' blocking
may differ, so results agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm_cli.ops.narrow_weights import is_narrow

# fp32 bytes of weight per call; 4-16 MiB measured alike at 256x256, 16 a little better
CHUNK_BYTES = 16 << 20


def sliced(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a product of `x` with `weight` goes a slice at a time: a narrow weight, or an
    fp32 weight above CHUNK_BYTES in CPU inference."""
    if is_narrow(weight, x):
        return True
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.compiler.is_compiling() or weight.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return weight.nbytes > CHUNK_BYTES


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **kwargs):
    """F.conv2d(x, weight.to(x.dtype), bias, **kwargs), output channels a slice at a time."""
    return by_output_slices(x, weight, bias, lambda x, w, b: F.conv2d(x, w, b, **kwargs), dim=1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, product):
    """product(x, weight.to(x.dtype), bias), output features a slice at a time."""
    return by_output_slices(x, weight, bias, product, dim=-1)


def rows_per_slice(weight: torch.Tensor, itemsize: int) -> int:
    """Output rows of `weight` that take at most CHUNK_BYTES at `itemsize` bytes a value."""
    return max(1, CHUNK_BYTES // (weight[0].numel() * itemsize))


def by_output_slices(x, weight, bias, product, dim: int) -> torch.Tensor:
    """product over slices of `weight`'s output rows (each in x's dtype, at most CHUNK_BYTES),
    joined along the output's `dim`."""
    rows = rows_per_slice(weight, x.element_size())
    outs = []
    for i in range(0, weight.shape[0], rows):
        part = None if bias is None else bias[i : i + rows].to(x.dtype)
        outs.append(product(x, weight[i : i + rows].to(x.dtype), part))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim)
