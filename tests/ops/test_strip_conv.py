"""GroupNorm -> SiLU -> conv over row strips (big VAE inputs at inference) vs the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.models.vae import ResnetBlock
from ldm_cli.ops import strip_conv
from ldm_cli.ops.strip_conv import norm_silu_conv, use_strips


def plain(x, norm, conv):
    return conv(F.silu(norm(x)))


def _layers(c_in, c_out, groups, seed, affine=True):
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, c_in, eps=1e-6, affine=affine)
    if affine:
        nn.init.normal_(norm.weight, 1.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
    return norm.double(), nn.Conv2d(c_in, c_out, 3, padding=1).double()


@pytest.mark.parametrize("rows", [1, 2, 5, 13, 64])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_norm_silu_conv_for_any_strip_height(monkeypatch, rows, affine):
    monkeypatch.setattr(strip_conv, "strip_rows", lambda x: rows)
    norm, conv = _layers(8, 6, 4, seed=rows, affine=affine)
    x = torch.randn(2, 8, 13, 9, dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        got = norm_silu_conv(x, norm, conv)
        torch.testing.assert_close(got, plain(x, norm, conv), rtol=0, atol=1e-12)
        skip = torch.randn(2, 6, 13, 9, dtype=torch.float64)
        got = norm_silu_conv(x, norm, conv, residual=lambda r0, r1: skip[:, :, r0:r1])
        torch.testing.assert_close(got, plain(x, norm, conv) + skip, rtol=0, atol=1e-12)


def test_strip_height_follows_the_byte_budget():
    x = torch.empty(1, 256, 512, 512)
    assert strip_conv.strip_rows(x) == strip_conv.STRIP_BYTES // (256 * 512 * 4)
    assert strip_conv.strip_rows(torch.empty(1, 1, 8, 1 << 24)) == 1


def test_only_big_inputs_at_inference_with_a_plain_conv():
    big = torch.empty(1, 256, 256, 256)  # 64 MiB
    conv = nn.Conv2d(256, 256, 3, padding=1)
    with torch.no_grad():
        assert use_strips(big, conv)
        assert not use_strips(big[:, :, :128], conv)
        assert not use_strips(big, nn.Conv2d(256, 256, 3, padding=1, stride=2))
        assert not use_strips(big, nn.Conv2d(256, 256, 1))
    assert not use_strips(big, conv)  # autograd on: the plain path


@pytest.mark.parametrize(("c_in", "c_out"), [(16, 16), (16, 8)])
def test_vae_resnet_block_in_strips_matches_the_plain_block(monkeypatch, c_in, c_out):
    torch.manual_seed(0)
    block = ResnetBlock(c_in, c_out, groups=4).eval()
    for p in block.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    x = torch.randn(2, c_in, 21, 17)
    with torch.no_grad():
        expected = block(x)
        monkeypatch.setattr(strip_conv, "MIN_BYTES", 0)
        monkeypatch.setattr(strip_conv, "strip_rows", lambda x: 4)
        assert use_strips(x, block.conv1)
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
