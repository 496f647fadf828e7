"""3x3 convolutions (stride 1, padding 1) by Winograd minimal filtering, F(2x2, 3x3), on the CPU.

On the CPU both oneDNN's convolution and a batched matmul run at about the fp32 peak, so the
only way to be faster is to do less arithmetic. Winograd's F(2x2, 3x3) makes each 2x2 output
tile from a 4x4 input tile with 16 multiplies per (input, output) channel pair instead of 36:

    Y = A^T [ (G g G^T) * (B^T d B) ] A,

where * is elementwise over the 16 transform positions, and summing over input channels turns
it into 16 independent matmuls [tiles, Cin] @ [Cin, Cout]. The input and output transforms
(B^T d B, A^T m A) are exact adds and subtracts, and so is the weight transform G g G^T
but for halvings. The result is the same sum of products with the operands
regrouped, equal to F.conv2d up to float rounding (about 2-3 times conv2d's own fp32 error).

Layout: channels are innermost (each band of the zero-padded input is copied to NHWC), so
every tile is a strided view and the matmuls need no transposes. The image is processed in
bands of tile rows small enough (BAND_BYTES) that a band's tiles, transformed tiles and
products stay in cache; an earlier whole-image version lost to conv2d above 64x64 because its
transforms were bound by memory bandwidth. Within a band each transform is one matmul with the
Kronecker product of the 1-D transform (16x16 for B, 4x16 for A): a handful of large ops
instead of dozens of small add/subs, because every torch op is an OpenMP parallel region with
a start-up cost. That cost is what decides on a machine whose cores are busy with another job:
there each multithreaded op waits milliseconds for its worker threads to be scheduled, and the
path's 6-8 ops per band make it several times slower than one oneDNN call (see the bench).

The transformed weights (16/9 the size of the originals) are made afresh at every call, one
matmul: keeping them would cost 3.9 GB more for the SD 1.5 U-Net in fp32 (and 0.6 GB for its
VAE, whose convs run once per image anyway), more than the whole gain is worth. Where the
weights are large against the image (1280 channels at 8x8), remaking them costs more than the
multiplies it saves, which is what MIN_PIXELS encodes. Gradients, where asked for, are
conv2d's own backward.

F(4x4, 3x3) (36 multiplies per 4x4 tile) is available as tile=4 through `set_winograd`. It
is faster still, but its fp32 error is about 20 times that of F(2x2, 3x3) (1-2e-5 of the output
scale per conv) and its transformed weights are 4x the size of the originals, so it is not the
default.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ldm_cli.core.env_choice import env_choice
from ldm_cli.ops import weight_slices
from ldm_cli.ops.narrow_weights import is_narrow

# Bytes of transformed tiles, products and outputs per band (measured: 8 MiB was fastest on a
# 2 MiB-L2 Xeon; 16-64 MiB lose 5-30% at 128x128 and above).
BAND_BYTES = 8 << 20
# Fewer tiles than this per matmul and re-reading the 16 transformed weight matrices dominates.
MIN_BAND_TILES = 128
# Below these (the smaller of Cin and Cout; output pixels over the whole batch) the transforms
# cost more than the multiplies saved, measured with ldm_cli.bench.winograd --sweep at 2
# threads on a 2-core AMD EPYC (AVX2): 1.1-1.3x faster at 320 channels and up (640>320 at 64x64
# too), even at 256, 0.3-0.8x at 128-192, 0.7x for SD 1.5's 1280 channels at 8x8 (128 pixels).
MIN_CHANNELS = 320
MIN_PIXELS = 512

_MATRICES = {  # (B^T, G, A^T) for F(m x m, 3x3), interpolation points 0, +-1 (and +-2 for m=4)
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}  # fmt: skip

# The default mode follows the CPU: "auto" where torch's best CPU kernels are AVX2 (there, on a
# 2-core AMD EPYC, the eligible layers ran 1.1-1.3x faster than oneDNN's; docs/benchmarks.md has
# the whole-model effect), "never" on AVX-512 CPUs, where on the 2-core Xeon of
# docs/benchmarks.md it made the SD 1.5 U-Net step 12-18% slower. LDM_WINOGRAD=auto|always|never
# overrides it; None until first asked.
_settings: dict = {"mode": None, "tile": 2}
MODES = ("auto", "always", "never")
ENV_VAR = "LDM_WINOGRAD"


def default_mode() -> str:
    """The mode before any `set_winograd`: $LDM_WINOGRAD, else by the CPU's kernels."""
    avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2"
    return env_choice(ENV_VAR, MODES) or ("auto" if avx2 else "never")


def current_mode() -> str:
    if _settings["mode"] is None:
        _settings["mode"] = default_mode()
    return _settings["mode"]


@functools.cache
def _kron(tile: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms as matrices over flattened tiles: B^T(x)B^T, G(x)G, A^T(x)A^T."""
    mats = (torch.tensor(m, dtype=torch.float64) for m in _MATRICES[tile])
    return tuple(torch.kron(m, m).to(dtype) for m in mats)


def set_winograd(mode: str = "auto", tile: int = 2) -> tuple[str, int]:
    """Choose when `winograd_tile` says yes; returns the previous (mode, tile) to restore.

    The default is `default_mode()`. "auto": CPU fp32/fp64 inference calls above the
    measured size thresholds. "always": every CPU fp32/fp64 call, autograd included (for
    tests). "never": F.conv2d everywhere."""
    if mode not in MODES or tile not in _MATRICES:
        raise ValueError(f"bad Winograd setting {mode!r}, tile {tile}")
    previous = (current_mode(), _settings["tile"])
    _settings.update(mode=mode, tile=tile)
    return previous


def winograd_tile(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The output tile size to compute conv2d(x, weight, padding=1) with, or 0 for F.conv2d.

    Only the CPU is measured to gain; CUDA and other devices keep their own kernels. Under
    autograd "auto" keeps F.conv2d, whose backward the Winograd path would reuse anyway."""
    if torch.compiler.is_compiling():  # first: current_mode() may ask the CPU, a graph break
        return 0
    mode, tile = current_mode(), _settings["tile"]
    if mode == "never":
        return 0
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return 0
    if weight.dtype != x.dtype and not is_narrow(weight, x):  # narrow: widened in the transform
        return 0
    if x.dtype not in (torch.float32, torch.float64) or x.dim() != 4 or x.numel() == 0:
        return 0
    if weight.shape[1:] != (x.shape[1], 3, 3):
        return 0
    if mode == "always":
        return tile
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return 0
    n, _, h, w = x.shape
    if min(weight.shape[:2]) < MIN_CHANNELS or min(h, w) < 2 or n * h * w < MIN_PIXELS:
        return 0
    return tile


def transform_weight(
    weight: torch.Tensor, tile: int = 2, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> G g G^T as ((tile + 2)^2, Cin, Cout), the matmuls' right operand,
    in `dtype` (default: the weight's).

    One matmul over the weight as it lies (its taps are the last, contiguous dimension); the
    result is stored (k, Cout, Cin) and returned as a transposed view, which bmm reads as it
    is. Permuting the weight to (Cin, Cout) order first was a strided copy 30x slower. A narrow
    (fp16/bf16, `--low-memory`) weight is widened a slice of output channels at a time, each
    slice transformed while it is in cache, so no whole widened copy is ever made."""
    cout, cin = weight.shape[:2]
    dtype = dtype or weight.dtype
    gg = _kron(tile, dtype)[1].to(weight.device)
    if weight.dtype == dtype:
        transformed = torch.mm(gg, weight.reshape(cout * cin, 9).T)
        return transformed.view(-1, cout, cin).transpose(1, 2)
    transformed = torch.empty((gg.shape[0], cout, cin), dtype=dtype, device=weight.device)
    rows = weight_slices.rows_per_slice(weight, torch.finfo(dtype).bits // 8)
    for i in range(0, cout, rows):
        part = weight[i : i + rows].to(dtype).reshape(-1, 9).T
        torch.mm(gg, part, out=transformed[:, i : i + rows].view(gg.shape[0], -1))
    return transformed.transpose(1, 2)


def _forward(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    a = m + 2
    k = a * a
    n, cin, h, w = x.shape
    cout = u.shape[2]
    bb, _, aa = (t.to(x.device) for t in _kron(m, x.dtype))
    th, tw = -(-h // m), -(-w // m)  # tiles down and across; odd sizes are padded, then cropped
    row_bytes = n * tw * (2 * k * cin + (k + m * m) * cout) * x.element_size()
    rows = max(1, min(th, max(BAND_BYTES // row_bytes, -(-MIN_BAND_TILES // (n * tw)))))
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    # one band of the zero-padded input, NHWC; its border columns are never written
    band = x.new_zeros(n, m * rows + 2, m * tw + 2, cin)
    s = band.stride()
    if channels_last:
        out = x.new_empty(n, m * th, m * tw, cout)
    else:
        out = x.new_empty(n, cout, m * th, m * tw)
    most = n * rows * tw
    tiles_buf, v_buf = x.new_empty(k * most * cin), x.new_empty(k * most * cin)
    m_buf, y_buf = x.new_empty(k * most * cout), x.new_empty(m * m * most * cout)
    if bias is not None and not channels_last:
        bias = bias[:, None, None, None, None]
    for r0 in range(0, th, rows):
        b = min(th, r0 + rows) - r0
        t = n * b * tw
        top, height = m * r0 - 1, m * b + 2  # the input rows this band's tiles read
        lo, hi = max(top, 0), min(top + height, h)
        if lo > top:
            band[:, : lo - top].zero_()
        if hi - top < height:
            band[:, hi - top : height].zero_()
        band[:, lo - top : hi - top, 1 : w + 1].copy_(x[:, :, lo:hi].permute(0, 2, 3, 1))
        # tile (i, j) element (p, q) of image `n`: band pixel (m*i + p, m*j + q)
        view = (a, a, n, b, tw, cin), (s[1], s[2], s[0], m * s[1], m * s[2], s[3])
        tiles = tiles_buf[: k * t * cin].view(k, t * cin)
        tiles.view(view[0]).copy_(band.as_strided(*view))
        v = torch.mm(bb, tiles, out=v_buf[: k * t * cin].view(k, t * cin))
        prods = torch.bmm(v.view(k, t, cin), u, out=m_buf[: k * t * cout].view(k, t, cout))
        y = torch.mm(aa, prods.view(k, t * cout), out=y_buf[: m * m * t * cout].view(m * m, -1))
        y = y.view(m, m, n, b, tw, cout)
        if channels_last:
            src = y.permute(2, 3, 0, 4, 1, 5)
            dst = out[:, m * r0 : m * (r0 + b)].view(n, b, m, tw, m, cout)
        else:
            src = y.permute(2, 5, 3, 0, 4, 1)
            dst = out[:, :, m * r0 : m * (r0 + b)].view(n, cout, b, m, tw, m)
        if bias is None:
            dst.copy_(src)
        else:
            torch.add(src, bias, out=dst)
    if channels_last:
        out = out.permute(0, 3, 1, 2)
    if m * th != h or m * tw != w:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = out[:, :, :h, :w].contiguous(memory_format=fmt)
    return out


class _WinogradConv(torch.autograd.Function):
    """Winograd forward; the backward is conv2d's own (exact gradients of the convolution)."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, tile):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _forward(x, u, bias, tile)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )
        return gx, gw, gb, None, None


def winograd_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tile: int = 2,
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a (Cout, Cin, 3, 3) weight, by F(tile, 3x3).

    Channels-last input gives channels-last output, as F.conv2d does."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        u = transform_weight(weight.detach(), tile, x.dtype)
        return _WinogradConv.apply(x, weight, bias, u, tile)
    bias = None if bias is None else bias.to(x.dtype)
    return _forward(x, transform_weight(weight, tile, x.dtype), bias, tile)


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict keys) whose plain 3x3 stride-1 padding-1 calls
    go through `winograd_conv3x3` wherever `winograd_tile` says it is faster, and whose large
    or narrow weights otherwise go a slice at a time (models/weight_slices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = self.padding_mode == "zeros"
        plain = self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
        plain = plain and self.dilation == (1, 1) and self.groups == 1
        tile = winograd_tile(x, self.weight) if plain and zeros else 0
        if tile:
            return winograd_conv3x3(x, self.weight, self.bias, tile)
        if zeros and self.groups == 1 and weight_slices.sliced(self.weight, x):
            return weight_slices.conv2d(
                x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                dilation=self.dilation,
            )  # fmt: skip
        return super().forward(x)
