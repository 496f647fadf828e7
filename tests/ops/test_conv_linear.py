"""Linear layers as oneDNN 1x1 convolutions (ldm_cli.ops.conv_linear)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.errors import UserError
from ldm_cli.ops import conv_linear
from ldm_cli.ops.conv_linear import Linear, linear, set_linear_mode, uses_conv


@pytest.fixture
def conv_mode():
    previous = set_linear_mode("conv")
    yield
    set_linear_mode(None if previous == conv_linear.default_mode() else previous)


@pytest.mark.parametrize("shape", [(2, 300, 64), (512, 64), (1, 2, 130, 64)])
def test_equals_f_linear(conv_mode, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    with torch.inference_mode():
        assert uses_conv(x, weight)
        out = linear(x, weight, bias)
        assert out.shape == (*shape[:-1], 96)
        torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
        # a strided input (heads merged back by transpose) and no bias
        strided = x.transpose(-2, -3) if x.dim() > 2 else x.t().contiguous().t()
        torch.testing.assert_close(
            linear(strided, weight, None), F.linear(strided, weight), rtol=1e-5, atol=1e-5
        )


def test_when_the_convolution_is_used(conv_mode):
    small = torch.randn(64, 32)
    weight = torch.randn(32, 32)
    with torch.inference_mode():
        assert not uses_conv(torch.randn(127, 32), weight)  # few rows: sgemm is as fast
        assert uses_conv(torch.randn(128, 32), weight)
        wide = torch.empty(10240, 1280)
        assert not uses_conv(torch.randn(128, 1280), wide)  # the widest weights need 256 rows
        assert uses_conv(torch.randn(256, 1280), wide)
        assert not uses_conv(torch.randn(256, 32, dtype=torch.float64), weight.double())
        assert not uses_conv(small, weight)
    x = torch.randn(256, 32, requires_grad=True)
    assert not uses_conv(x, weight)  # training keeps sgemm and its backward
    set_linear_mode("blas")
    with torch.inference_mode():
        assert not uses_conv(torch.randn(256, 32), weight)


def test_module_is_a_drop_in_linear(conv_mode):
    reference = nn.Linear(64, 48)
    layer = Linear(64, 48)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(3, 100, 64)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_the_environment_chooses_the_mode(monkeypatch):
    conv_linear.default_mode.cache_clear()
    try:
        monkeypatch.setenv("LDM_LINEAR", "blas")
        assert conv_linear.default_mode() == "blas"
        conv_linear.default_mode.cache_clear()
        monkeypatch.setenv("LDM_LINEAR", "fast")
        with pytest.raises(UserError, match="LDM_LINEAR='fast'"):
            conv_linear.default_mode()
    finally:
        monkeypatch.delenv("LDM_LINEAR")
        conv_linear.default_mode.cache_clear()
