"""Attention in slices of queries (ldm_cli.ops.attention_slicing) and the VAE attention's
layout for torch's memory-bounded SDPA kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_cli.models.attention import CrossAttention
from ldm_cli.models.vae import AttnBlock
from ldm_cli.ops import attention_slicing
from ldm_cli.ops.attention_slicing import attention, query_slice
from ldm_cli.testing import randomize_


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The q, k, v of every SDPA call while the test runs."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_slicing.F, "scaled_dot_product_attention", spy)
    return calls


def _qkv(b, heads, n, m, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, length, d, generator=gen) for length in (n, m, m))


def test_slices_cover_the_queries_and_match_the_whole(monkeypatch, sdpa_calls):
    monkeypatch.setattr(attention_slicing, "SCORE_BUDGET", 2 * 3 * 50 * 7)  # 7 queries a call
    q, k, v = _qkv(2, 3, 45, 50, 16)
    whole = F.scaled_dot_product_attention(q, k, v)
    sdpa_calls.clear()
    sliced = attention(q, k, v, sliced=True)
    assert [c[0].shape[-2] for c in sdpa_calls] == [7] * 6 + [3]
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_cpu_is_not_sliced_and_other_devices_are(monkeypatch, sdpa_calls):
    """On CPU torch's flash kernel keeps memory bounded (measured); on a device without one
    (here the meta device standing in for MPS) large attentions are sliced."""
    monkeypatch.setattr(attention_slicing, "SCORE_BUDGET", 64 * 64)
    q, k, v = _qkv(1, 1, 256, 64, 8)
    attention(q, k, v)
    assert len(sdpa_calls) == 1
    attention(*(t.to("meta") for t in (q, k, v)))
    assert len(sdpa_calls) == 1 + 4
    assert query_slice(q, k, 2**26) == 2**26 // 64


def test_vae_attention_gives_sdpa_a_unit_stride_feature_axis(sdpa_calls):
    block = randomize_(AttnBlock(64, 32), seed=3)
    x = torch.randn(2, 64, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = block(x)
    ((q, k, v),) = sdpa_calls
    assert q.shape == (2, 1, 120, 64) and all(t.stride(-1) == 1 for t in (q, k, v))
    # the plain formula: softmax(q k^T / sqrt(c)) v over the 120 positions, plus the skip
    with torch.inference_mode():
        h = block.norm(x)
        seq = [m(h).flatten(2).transpose(1, 2) for m in (block.q, block.k, block.v)]
        weights = torch.softmax(seq[0] @ seq[1].transpose(1, 2) / 64**0.5, dim=-1)
        mixed = (weights @ seq[2]).transpose(1, 2).reshape(x.shape)
        expected = block.proj_out(mixed) + x
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unet_attention_is_unchanged_when_forced_to_slice(monkeypatch):
    attn = randomize_(CrossAttention(32, 4, 8), seed=2)
    x = torch.randn(2, 100, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = attn(x)
        monkeypatch.setattr(attention_slicing, "FUSED_DEVICES", ())  # as on MPS
        monkeypatch.setattr(attention_slicing, "SCORE_BUDGET", 2 * 4 * 100 * 16)
        sliced = attn(x)
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)


def test_sliced_attention_keeps_gradients(monkeypatch, sdpa_calls):
    monkeypatch.setattr(attention_slicing, "SCORE_BUDGET", 2 * 30 * 10)  # 10 queries a call
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 30, 30, 8))
    attention(q, k, v, sliced=True).square().sum().backward()
    assert len(sdpa_calls) == 3
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).square().sum(), q)[0]
    torch.testing.assert_close(q.grad, expected, rtol=1e-5, atol=1e-6)
