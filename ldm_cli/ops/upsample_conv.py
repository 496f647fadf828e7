"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, in 2.25 times fewer multiply-adds.

After a nearest 2x upsample every 2x2 block of the big image repeats one input pixel, so a 3x3
kernel centred on an output pixel of parity (a, b) only ever sees a 2x2 window of the small
input, with some of its nine weights landing on the same input pixel. Summing those weights
gives four 2x2 kernels, one per output parity. All four run as one 2x2 convolution with
4 * out_channels outputs over the input padded by one, and each parity reads its own shifted
window of that result. This is the same sum of products as the original with some weights
added first: equal up to float rounding, with 16 instead of 36 multiply-adds per output pixel
and no 4x-sized intermediate image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.ops import weight_slices
from ldm_cli.ops.channels_last import is_channels_last
from ldm_cli.ops.file_pages import drop_file_pages


def _fold_taps(t: torch.Tensor, parity: int, dim: int) -> torch.Tensor:
    """Sum the 3 taps along `dim` onto the 2 input pixels an output of `parity` reads.

    Parity 0 reads input pixels (i-1, i) with taps (0) and (1, 2); parity 1 reads (i, i+1)
    with taps (0, 1) and (2)."""
    t0, t1, t2 = t.unbind(dim)
    pair = (t0, t1 + t2) if parity == 0 else (t0 + t1, t2)
    return torch.stack(pair, dim)


# Below this many input values per image (channels x pixels) the folded path's few extra
# small ops cost more than the multiply-adds they save.
MIN_ELEMENTS = 32 * 1024
# Output channels are done in groups whose 2x2-convolution result is at most this big.
CHUNK_BYTES = 64 << 20


# Kernels are folded this many output channels at a time: the intermediate sums of the whole
# of SD 1.5's largest (1280 x 1280) would take 150 MB more at once.
FOLD_CHUNK = 128


def folded_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) -> (4 * out, in, 2, 2); parity (a, b) in rows [(2a + b) * out, ...)."""
    out = weight.shape[0]
    result = weight.new_empty(4, out, weight.shape[1], 2, 2)
    for c0 in range(0, out, FOLD_CHUNK):
        part = weight[c0 : c0 + FOLD_CHUNK]
        rows = [_fold_taps(part, a, 2) for a in (0, 1)]
        for a in (0, 1):
            for b in (0, 1):
                result[2 * a + b, c0 : c0 + FOLD_CHUNK] = _fold_taps(rows[a], b, 3)
    return result.view(4 * out, *result.shape[2:])


class FoldedKernels:
    """The folded kernels of one conv weight, remade whenever the weight changes (a new tensor,
    an in-place edit such as a LoRA patch, a dtype or device move). Under autograd they are
    rebuilt every call so that gradients reach the weight, and under torch.compile they are
    part of the compiled graph."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self.kernels: torch.Tensor | None = None

    def clear(self) -> None:
        self.kernels, self._key = None, None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: recomputed in the graph (no cache to key)
            return folded_kernels(weight)
        if (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference():
            return folded_kernels(weight)  # (inference tensors keep no version to key on)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        if key != self._key:
            self.clear()  # free the old copy before making the new
            with torch.no_grad():
                self.kernels = folded_kernels(weight)
            drop_file_pages(weight)  # used only through the kernels from now on
            self._key = key
        return self.kernels


class FoldedUpsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then `conv` (3x3), computed by `upsample2x_conv3x3`
    with its folded kernels kept. Moving or converting the module (`.to`, `.half`, the release
    of a one-shot run's U-Net) forgets them at once: they would be remade anyway, and their
    memory (125 MB for SD 1.5's U-Net) is then free for what comes next."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self.folded = FoldedKernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample2x_conv3x3(x, self.conv.weight, self.conv.bias, self.folded)

    def _apply(self, fn, recurse=True):
        self.folded.clear()
        return super()._apply(fn, recurse)


def upsample2x_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernels: FoldedKernels | None = None,
) -> torch.Tensor:
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)."""
    n, _, h, w = x.shape
    if x[0].numel() < MIN_ELEMENTS or weight.shape[-2:] != (3, 3):
        big = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if weight_slices.sliced(weight, x):
            return weight_slices.conv2d(big, weight, bias, padding=1)
        return F.conv2d(big, weight, bias, padding=1)
    out = weight.shape[0]
    folded = kernels(weight) if kernels is not None else folded_kernels(weight)
    by_parity = folded.view(4, out, *folded.shape[1:])
    if is_channels_last(x):
        return _channels_last(x, by_parity, bias)
    result = x.new_empty(n, out, h, 2, w, 2)
    chunk = channels_per_chunk(x, out)
    for c0 in range(0, out, chunk):
        c1 = min(out, c0 + chunk)
        kernel = by_parity[:, c0:c1].reshape(4 * (c1 - c0), *folded.shape[1:])
        # (n, 4*k, h+1, w+1); parity (a, b) of output pixel (2i+a, 2j+b) is at [.., i+a, j+b]
        y = F.conv2d(x, kernel, padding=1).view(n, 2, 2, c1 - c0, h + 1, w + 1)
        for a in (0, 1):
            for b in (0, 1):
                result[:, c0:c1, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
    result = result.view(n, out, 2 * h, 2 * w)
    return result if bias is None else result.add_(bias[:, None, None])


def channels_per_chunk(x: torch.Tensor, out: int) -> int:
    """Output channels per convolution call: their 2x2 result is 4x the size of their share of
    the output, kept within CHUNK_BYTES; on the CPU their folded kernels too are kept within
    weight_slices.CHUNK_BYTES (oneDNN copies a call's whole kernel at every call)."""
    n, cin, h, w = x.shape
    size = x.element_size()
    chunk = CHUNK_BYTES // (n * 4 * (h + 1) * (w + 1) * size)
    if x.device.type == "cpu":
        chunk = min(chunk, weight_slices.CHUNK_BYTES // (4 * cin * 4 * size))
    return max(1, min(out, chunk))


def _channels_last(
    x: torch.Tensor, by_parity: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``upsample2x_conv3x3`` for an NHWC input, with an NHWC result: the parities interleave
    in the two spatial axes of (n, h, 2, w, 2, channels). (Writing through NCHW-shaped views of
    the same memory, to share the loop above, made the SD 1.5 decode at 256x256 1.30 s
    instead of 1.16: the strided copies ran slower.)"""
    n, _, h, w = x.shape
    out = by_parity.shape[1]
    result = x.new_empty(n, h, 2, w, 2, out)
    chunk = channels_per_chunk(x, out)
    for c0 in range(0, out, chunk):
        c1 = min(out, c0 + chunk)
        kernel = by_parity[:, c0:c1].reshape(4 * (c1 - c0), *by_parity.shape[2:])
        y = F.conv2d(x, kernel.contiguous(memory_format=torch.channels_last), padding=1)
        # (n, h+1, w+1, 4*k) in memory; parity (a, b) of (2i+a, 2j+b) is at [.., i+a, j+b, a, b]
        y = y.permute(0, 2, 3, 1).reshape(n, h + 1, w + 1, 2, 2, c1 - c0)
        for a in (0, 1):
            for b in (0, 1):
                result[:, :, a, :, b, c0:c1] = y[:, a : a + h, b : b + w, a, b]
    result = result.view(n, 2 * h, 2 * w, out).permute(0, 3, 1, 2)
    return result if bias is None else result.add_(bias[:, None, None])
