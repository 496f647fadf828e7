"""Large fp32 weights multiplied a slice of output channels at a time on the CPU (so oneDNN's
per-call weight reorder stays small): the same outputs, and only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.core.config import TINY_SD1
from ldm_cli.models.loading import build_empty
from ldm_cli.models.unet_blocks import Downsample
from ldm_cli.ops import conv_linear, upsample_conv, weight_slices
from ldm_cli.ops.winograd_conv import WinogradConv2d


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(weight_slices, "CHUNK_BYTES", 4 << 10)  # 4 KiB: a few rows a slice


def test_sliced_applies_to_large_fp32_weights_in_cpu_inference(monkeypatch):
    x = torch.randn(1, 8, 4, 4)
    big = torch.zeros(1 + weight_slices.CHUNK_BYTES // 4)
    assert weight_slices.sliced(big, x)
    assert not weight_slices.sliced(big[: weight_slices.CHUNK_BYTES // 4], x)  # at the limit
    assert weight_slices.sliced(torch.zeros(4, dtype=torch.float16), x)  # narrow: any size
    assert not weight_slices.sliced(big, x.half())  # fp16 compute keeps its kernels
    assert not weight_slices.sliced(big.requires_grad_(), x)  # training keeps conv2d's backward
    with torch.no_grad():
        assert weight_slices.sliced(big, x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not weight_slices.sliced(big.detach(), x)


@pytest.mark.usefixtures("small_slices")
@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_and_linear_by_slices_equal_whole(stride):
    g = torch.Generator().manual_seed(0)
    conv = WinogradConv2d(24, 40, 3, stride=stride, padding=1)
    x = torch.randn(2, 24, 9, 7, generator=g)
    calls = []
    real = weight_slices.conv2d
    with torch.inference_mode():
        with pytest.MonkeyPatch.context() as m:
            m.setattr(weight_slices, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
            got = conv(x)
        want = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    assert calls and weight_slices.rows_per_slice(conv.weight, 4) < 40  # really sliced
    torch.testing.assert_close(got, want)
    linear = conv_linear.Linear(64, 50)
    rows = torch.randn(3, 300, 64, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear(rows), F.linear(rows, linear.weight, linear.bias))


@pytest.mark.usefixtures("small_slices")
def test_upsampling_convolutions_by_slices_equal_whole(monkeypatch):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(16, 12, 3, 3, generator=g), torch.randn(16, generator=g)
    for size in (2, 12):  # below and above upsample_conv.MIN_ELEMENTS / 12
        monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 12 * 8 * 8)
        x = torch.randn(2, 12, size, size, generator=g)
        want = F.conv2d(F.interpolate(x, scale_factor=2.0), w, b, padding=1)
        with torch.inference_mode():
            got = upsample_conv.upsample2x_conv3x3(x, w, b, upsample_conv.FoldedKernels())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 12, 12, 12, generator=g)
    assert upsample_conv.channels_per_chunk(x, 16) == (4 << 10) // (16 * 12 * 4)


def test_downsampling_weights_are_sliced_and_keep_their_keys():
    unet = build_empty(TINY_SD1).unet
    downs = [m for m in unet.modules() if isinstance(m, Downsample)]
    assert downs and all(isinstance(d.op, WinogradConv2d) for d in downs)
    assert any(k.endswith(".op.weight") for k in unet.state_dict())
