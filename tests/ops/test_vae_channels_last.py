"""The VAE decoder run channels-last (ldm_cli.ops.channels_last): same image as NCHW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.core.config import TINY_SD1
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.ops import channels_last, strip_conv, upsample_conv
from ldm_cli.ops.strip_conv import norm_silu_conv
from ldm_cli.ops.upsample_conv import upsample2x_conv3x3

CL = torch.channels_last


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


@pytest.mark.parametrize("rows", [1, 4, 13])
def test_strips_keep_the_layout_and_the_values(monkeypatch, rows):
    monkeypatch.setattr(strip_conv, "strip_rows", lambda x: rows)
    torch.manual_seed(rows)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6).double()
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    x = torch.randn(2, 8, 13, 9, dtype=torch.float64) * 3 + 1
    skip = torch.randn(2, 6, 13, 9, dtype=torch.float64)
    with torch.no_grad():
        want = conv(F.silu(norm(x))) + skip
        got = norm_silu_conv(_nhwc(x), norm, conv, residual=lambda r0, r1: skip[:, :, r0:r1])
    assert channels_last.is_channels_last(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("band_rows", [1, 3, 13])
def test_nhwc_group_statistics_pool_bands_exactly(monkeypatch, band_rows):
    x = torch.randn(2, 8, 13, 9, dtype=torch.float64) * 3 + torch.arange(13.0)[:, None]
    monkeypatch.setattr(strip_conv, "BAND_BYTES", band_rows * 9 * 8 * 8)
    var, mean = strip_conv.group_var_mean_nhwc(_nhwc(x), 4)
    want_var, want_mean = torch.var_mean(x.reshape(2, 4, -1), dim=2, correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-12, atol=0)


def test_folded_upsample_keeps_the_layout_and_the_values(monkeypatch):
    monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(upsample_conv, "CHUNK_BYTES", 4096)  # several channel groups
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(10, 6, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(10, generator=g, dtype=torch.float64)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    got = upsample2x_conv3x3(_nhwc(x), weight, bias)
    assert channels_last.is_channels_last(got)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _decoders(monkeypatch):
    monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 0)  # the fold and the strips both run
    monkeypatch.setattr(strip_conv, "MIN_BYTES", 1 << 14)
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_SD1.vae).eval().requires_grad_(False)
    for p in vae.parameters():
        p.normal_(0, 0.1)
    return vae


def test_decode_nhwc_equals_nchw(monkeypatch):
    vae = _decoders(monkeypatch)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        monkeypatch.setattr(channels_last, "default_layout", lambda: "nchw")
        want = vae.decode(z)
        assert want.is_contiguous()
        monkeypatch.setattr(channels_last, "default_layout", lambda: "nhwc")
        got = vae.decode(z)
    assert channels_last.is_channels_last(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_decoder_activation_stays_nhwc_and_no_weight_is_copied(monkeypatch):
    vae = _decoders(monkeypatch)
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nhwc")
    weights = {n: p.data_ptr() for n, p in vae.decoder.named_parameters()}
    layouts = []
    for name, module in vae.decoder.named_modules():
        if name and name.count(".") <= 2:  # blocks, levels, the attention and its projections
            module.register_forward_hook(
                lambda m, i, out, name=name: layouts.append(
                    (name, channels_last.is_channels_last(out))
                )
            )
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, 16, 16))
    assert any(name == "mid.attn_1" for name, _ in layouts)
    assert [name for name, nhwc in layouts if not nhwc and name != "conv_out"] == []
    assert {n: p.data_ptr() for n, p in vae.decoder.named_parameters()} == weights


def test_nhwc_only_for_frozen_cpu_fp32_inference(monkeypatch):
    vae = _decoders(monkeypatch)
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nhwc")
    z = torch.randn(1, 4, 8, 8)
    decoder = vae.decoder
    assert not channels_last.decode_channels_last(z, decoder)  # grad mode on
    with torch.no_grad():
        assert channels_last.decode_channels_last(z, decoder)
        assert not channels_last.decode_channels_last(z.double(), decoder)
        decoder.conv_out.weight.requires_grad_(True)  # being trained: keep its layout
        assert not channels_last.decode_channels_last(z, decoder)
    decoder.conv_out.weight.requires_grad_(False)
    with torch.device("meta"):
        offloaded = AutoencoderKL(TINY_SD1.vae).decoder.requires_grad_(False)
    with torch.no_grad():
        assert not channels_last.decode_channels_last(z, offloaded)  # weights come in per layer
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nchw")
    with torch.no_grad():
        assert not channels_last.decode_channels_last(z, decoder)


def test_fp16_checkpoint_loads_decoder_convs_channels_last(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from ldm_cli.models.loading import load_model
    from ldm_cli.testing import random_checkpoint

    path = random_checkpoint(TINY_SD1, tmp_path / "t.safetensors", seed=2, dtype=torch.float16)
    stored = load_file(path)
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nhwc")
    model, _ = load_model(path, dtype=torch.float32)
    state = model.state_dict()
    decoder_3x3 = [k for k in state if k.startswith("first_stage_model.decoder.")
                   and state[k].dim() == 4 and state[k].shape[-1] == 3]  # fmt: skip
    assert decoder_3x3
    for key, value in state.items():
        torch.testing.assert_close(value, stored[key].float(), rtol=0, atol=0)
        assert channels_last.is_channels_last(value) == (key in decoder_3x3), key
    monkeypatch.setattr(channels_last, "default_layout", lambda: "nchw")
    plain, _ = load_model(path, dtype=torch.float32)
    assert not any(channels_last.is_channels_last(v) for v in plain.state_dict().values())
