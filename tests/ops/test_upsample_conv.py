"""The folded upsample + 3x3 conv (four 2x2 kernels on the small input) against the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.models.vae import Upsample as VAEUpsample
from ldm_cli.ops import upsample_conv
from ldm_cli.ops.upsample_conv import FoldedKernels, folded_kernels, upsample2x_conv3x3


def plain(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.fixture(autouse=True)
def always_folded(monkeypatch):
    monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 0)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 4, 7), (1, 8, 9, 6), (3, 2, 16, 16)])
@pytest.mark.parametrize("out_channels", [1, 4])
def test_equals_upsample_then_conv_in_float64(shape, out_channels):
    g = torch.Generator().manual_seed(sum(shape) + out_channels)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_channels, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(out_channels, generator=g, dtype=torch.float64)
    got = upsample2x_conv3x3(x, w, b)
    assert got.shape == (shape[0], out_channels, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, plain(x, w, b), rtol=0, atol=1e-12)
    no_bias = upsample2x_conv3x3(x, w, None)
    torch.testing.assert_close(no_bias, plain(x, w, None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 4 * 10 * 8])
def test_output_channels_in_chunks_give_the_same_result(monkeypatch, chunk_bytes):
    # 1 byte: one channel at a time; otherwise 3 of the 7 channels (batch 4, 9x7 input)
    monkeypatch.setattr(upsample_conv, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 9, 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(upsample2x_conv3x3(x, w, b), plain(x, w, b), rtol=0, atol=1e-12)


def test_kernels_folded_in_chunks_of_output_channels(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(7, 3, 3, 3, generator=g, dtype=torch.float64)
    whole = folded_kernels(w)
    monkeypatch.setattr(upsample_conv, "FOLD_CHUNK", 3)  # 3 + 3 + 1 output channels
    assert torch.equal(folded_kernels(w), whole)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        upsample2x_conv3x3(x, w, None), plain(x, w, None), rtol=0, atol=1e-12
    )


def test_float32_error_is_rounding_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 12, 12, generator=g)
    w = torch.randn(64, 64, 3, 3, generator=g) / 24
    err = (upsample2x_conv3x3(x, w, None) - plain(x, w, None)).abs().max().item()
    assert err < 1e-5


def test_each_folded_kernel_sums_the_taps_its_parity_sees():
    w = torch.arange(9.0).view(1, 1, 3, 3)  # w[y, x] = 3y + x
    k = folded_kernels(w).view(2, 2, 2, 2)  # parity a, parity b, window row, window column
    # parity (0, 0): rows {0} and {1, 2}, columns {0} and {1, 2}
    assert k[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # parity (1, 1): rows {0, 1} and {2}, columns {0, 1} and {2}
    assert k[1, 1].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_cache_follows_in_place_weight_edits():
    up = VAEUpsample(4)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        first = up(x)
        up.conv.weight.mul_(2)  # a LoRA patch is such an in-place edit
        torch.testing.assert_close(up(x), plain(x, up.conv.weight, up.conv.bias))
        up.conv.weight = torch.nn.Parameter(torch.zeros_like(up.conv.weight))
        torch.testing.assert_close(up(x), plain(x, up.conv.weight, up.conv.bias))
    assert not torch.equal(first, up(x).detach())


def test_gradients_reach_the_weight_as_through_the_plain_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    cache = FoldedKernels()
    grads = torch.autograd.grad(upsample2x_conv3x3(x, w, b, cache).square().sum(), (x, w, b))
    want = torch.autograd.grad(plain(x, w, b).square().sum(), (x, w, b))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_a_module_built_under_inference_mode_still_upsamples():
    with torch.inference_mode():
        up = VAEUpsample(3)
        x = torch.randn(1, 3, 4, 4)
        torch.testing.assert_close(up(x), plain(x, up.conv.weight, up.conv.bias))


def test_moving_or_releasing_forgets_the_folded_kernels():
    from ldm_cli.core.config import TINY_SD1
    from ldm_cli.models.loading import build_empty
    from ldm_cli.models.unet_blocks import Upsample
    from ldm_cli.ops.release_weights import release_module

    up = VAEUpsample(4)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        up(x)
        assert up.folded.kernels is not None
        up.double()  # would be remade from the new weights anyway: freed at once
        assert up.folded.kernels is None
        torch.testing.assert_close(up(x.double()), plain(x.double(), up.conv.weight, up.conv.bias))
    unet = build_empty(TINY_SD1).unet.to_empty(device="cpu")
    ups = [m for m in unet.modules() if isinstance(m, Upsample)]
    with torch.no_grad():
        for m in ups:
            m.folded(m.conv.weight)
    assert ups and all(m.folded.kernels is not None for m in ups)
    release_module(unet)  # a one-shot run's U-Net before the decode: its caches go too
    assert all(m.folded.kernels is None for m in ups)
