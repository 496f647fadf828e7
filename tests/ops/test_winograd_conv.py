"""Winograd F(2x2, 3x3) convolution against F.conv2d: values, gradients, weight edits, policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.core.errors import UserError
from ldm_cli.models.unet_blocks import ResBlock
from ldm_cli.models.vae import ResnetBlock
from ldm_cli.ops import winograd_conv
from ldm_cli.ops.winograd_conv import WinogradConv2d, set_winograd, winograd_conv3x3, winograd_tile


@pytest.fixture(autouse=True)
def restore_setting():
    previous = set_winograd("auto")
    yield
    set_winograd(*previous)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def data(n, cin, cout, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) / (3 * cin**0.5)
    return x, weight, torch.randn(cout, generator=g, dtype=dtype)


SHAPES = [  # n, cin, cout, h, w: odd and even sizes, 1-4 images, channels off multiples of 8
    (1, 3, 5, 7, 9),
    (2, 8, 4, 6, 6),
    (3, 12, 20, 5, 4),
    (4, 4, 3, 1, 1),
    (1, 17, 9, 2, 3),
    (2, 6, 7, 11, 10),
    (1, 33, 40, 16, 13),
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_conv2d_in_float64(shape, tile):
    x, weight, bias = data(*shape)
    for b in (bias, None):
        want = F.conv2d(x, weight, b, padding=1)
        got = winograd_conv3x3(x, weight, b, tile=tile)
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-13
        cl = winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, b, tile=tile)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(cl, want) < 1e-13


@pytest.mark.parametrize(("tile", "min_tiles"), [(2, 9), (4, 2)])
def test_bands_with_a_shorter_last_band(monkeypatch, tile, min_tiles):
    monkeypatch.setattr(winograd_conv, "BAND_BYTES", 1)
    monkeypatch.setattr(winograd_conv, "MIN_BAND_TILES", min_tiles)
    x, weight, bias = data(1, 5, 6, 13, 6)  # tile rows 3 + 3 + 1 (tile 2) or 1 + 1 + 1 + 1 (tile 4)
    want = F.conv2d(x, weight, bias, padding=1)
    assert relative_error(winograd_conv3x3(x, weight, bias, tile=tile), want) < 1e-13


@pytest.mark.parametrize("shape", [(2, 64, 64, 24, 24), (1, 320, 320, 9, 12), (3, 40, 24, 17, 15)])
def test_float32_error_is_rounding_level(shape):
    x, weight, bias = data(*shape, dtype=torch.float64)
    want = F.conv2d(x, weight, bias, padding=1)
    x32, w32, b32 = x.float(), weight.float(), bias.float()
    assert relative_error(winograd_conv3x3(x32, w32, b32), want) < 3e-6
    assert relative_error(winograd_conv3x3(x32, w32, b32, tile=4), want) < 1e-4


def test_gradients_match_conv2d_backward():
    x, weight, bias = (t.float().requires_grad_() for t in data(2, 6, 5, 7, 8))
    out = winograd_conv3x3(x, weight, bias)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, bias), upstream)
    want = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1), (x, weight, bias), upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    only_x = torch.autograd.grad(winograd_conv3x3(x, weight.detach(), None).sum(), x)[0]
    want_x = torch.autograd.grad(F.conv2d(x, weight, padding=1).sum(), x)[0]
    torch.testing.assert_close(only_x, want_x, rtol=1e-5, atol=1e-5)


def test_weight_edits_and_new_weights_are_seen():
    """Nothing derived from a weight is kept between calls: in-place edits (a LoRA patch),
    new tensors, loads and dtype moves all take effect at once."""
    set_winograd("always")
    conv = WinogradConv2d(6, 4, 3, padding=1)
    x = torch.randn(1, 6, 5, 5)

    def check():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-5)

    with torch.no_grad():
        check()
        conv.weight.mul_(2)
        check()
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
        check()
        conv.load_state_dict({"weight": torch.randn(4, 6, 3, 3), "bias": torch.zeros(4)})
        check()
        conv.double()
        x = x.double()
        check()
    with torch.inference_mode():
        conv = WinogradConv2d(4, 4, 3, padding=1)
        x = torch.randn(1, 4, 6, 6)
        first = winograd_conv3x3(x, conv.weight, conv.bias)
        conv.weight.mul_(-1)
        second = winograd_conv3x3(x, conv.weight, conv.bias)
    torch.testing.assert_close(second, F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_weights_are_widened_a_slice_at_a_time(monkeypatch, dtype):
    """--low-memory keeps fp16/bf16 weights: the transform widens them slice by slice and
    gives what the same weights widened whole give."""
    monkeypatch.setattr(winograd_conv.weight_slices, "CHUNK_BYTES", 320 * 9 * 4 * 100)
    x, weight, bias = data(1, 320, 640, 9, 12, dtype=torch.float32)
    narrow = weight.to(dtype)
    want = winograd_conv3x3(x, narrow.float(), bias)
    assert torch.equal(winograd_conv3x3(x, narrow, bias), want)  # 7 slices of 100 rows
    assert relative_error(want, F.conv2d(x, narrow.float(), bias, padding=1)) < 3e-6


def test_policy():
    x, weight = torch.empty(2, 320, 16, 16), torch.empty(640, 320, 3, 3)
    assert winograd_tile(x, weight) == 2
    assert winograd_tile(x.double(), weight.double()) == 2
    assert winograd_tile(x[:, :64], weight[:, :64]) == 0  # too few channels to pay off
    assert winograd_tile(x[:, :256], weight[:, :256]) == 0  # even at 256 on the EPYC
    assert winograd_tile(x[:1, :, :4, :4], weight) == 0  # too few pixels
    assert winograd_tile(x.half(), weight.half()) == 0
    assert winograd_tile(x.bfloat16(), weight) == 0
    assert winograd_tile(x, weight.half()) == 2  # a narrow (--low-memory) weight: widened
    assert winograd_tile(x, weight.bfloat16()) == 2
    assert winograd_tile(x, weight.requires_grad_()) == 0  # training keeps F.conv2d
    with torch.no_grad():
        assert winograd_tile(x, weight) == 2
    set_winograd("never")
    assert winograd_tile(x, weight) == 0
    set_winograd("always", tile=4)
    assert winograd_tile(x[:, :4, :1, :1], weight[:, :4]) == 4
    with pytest.raises(ValueError):
        set_winograd("sometimes")


def test_default_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.delenv(winograd_conv.ENV_VAR, raising=False)
    for capability, mode in (("AVX2", "auto"), ("AVX512", "never"), ("DEFAULT", "never")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert winograd_conv.default_mode() == mode
    monkeypatch.setenv(winograd_conv.ENV_VAR, "Always")
    assert winograd_conv.default_mode() == "always"
    monkeypatch.setenv(winograd_conv.ENV_VAR, "sometimes")
    with pytest.raises(UserError, match="LDM_WINOGRAD='sometimes'"):
        winograd_conv.default_mode()


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_never_on_other_devices(mode):
    set_winograd(mode)
    x = torch.empty(2, 320, 16, 16, device="meta")
    weight = torch.empty(320, 320, 3, 3, device="meta")
    assert winograd_tile(x, weight) == 0
    conv = WinogradConv2d(320, 320, 3, padding=1, device="meta")
    assert conv(x).device.type == "meta"  # through F.conv2d


def test_other_conv_geometries_fall_back():
    set_winograd("always")
    x = torch.randn(1, 4, 8, 8)
    for kwargs in ({"stride": 2, "padding": 1}, {"padding": 2, "dilation": 2}, {"padding": 0}):
        conv = WinogradConv2d(4, 4, 3, **kwargs)
        want = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        torch.testing.assert_close(conv(x), want, rtol=0, atol=0)


def test_blocks_keep_their_keys_and_outputs():
    set_winograd("always")
    torch.manual_seed(0)
    unet_block, vae_block = ResBlock(8, 24, 12, norm_groups=4), ResnetBlock(8, 12, 4)
    for block in (unet_block, vae_block):
        convs = [m for m in block.modules() if isinstance(m, WinogradConv2d)]
        assert len(convs) == 2
        assert not any("_winograd" in key for key in block.state_dict())
    x, emb = torch.randn(2, 8, 9, 7), torch.randn(2, 24)
    with torch.no_grad():
        got = unet_block(x, emb), vae_block(x)
        set_winograd("never")
        want = unet_block(x, emb), vae_block(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
