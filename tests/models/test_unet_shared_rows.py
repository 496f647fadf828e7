"""A CFG batch's repeated rows run once through the U-Net layers before the first
cross-attention (UNetModel._repeated_rows), with the same output as the whole batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm_cli.core.config import TINY_SD1
from ldm_cli.models.unet import UNetModel

VARIANTS = {
    "sd1": TINY_SD1.unet,
    # cross-attention only in the first transformer: the rows are repeated before it
    "no-self-attention": replace(TINY_SD1.unet, disable_self_attentions=(True, False)),
    # no transformer at the first level (SDXL, the embedded model): shared through a level
    "attention-deeper": replace(
        TINY_SD1.unet,
        channel_mult=(1, 2, 2),
        attention_resolutions=(2, 4),
        transformer_depth=(0, 1, 1),
    ),
}


def _unet(cfg) -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval().requires_grad_(False)
    for param in unet.parameters():  # zero-initialised output layers would hide differences
        param.normal_(0, 0.05)
    return unet


def _first_resblock_batches(unet: UNetModel) -> list[int]:
    seen: list[int] = []
    unet.input_blocks[1][0].register_forward_hook(lambda m, args, out: seen.append(len(out)))
    return seen


@pytest.mark.parametrize("name", VARIANTS)
def test_shared_rows_give_the_whole_batch_output(name, monkeypatch):
    unet = _unet(VARIANTS[name])
    seen = _first_resblock_batches(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(4, 7, 32, generator=g)
    t = torch.tensor([300.0, 700.0] * 2)
    with torch.inference_mode():
        shared = unet(torch.cat([x, x]), t, context=context)
        monkeypatch.setattr(UNetModel, "_repeated_rows", lambda *args: 1)
        whole = unet(torch.cat([x, x]), t, context=context)
    assert seen == [2, 4]
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-6)
    # the copies still differ after the context has been read
    assert (shared[:2] - shared[2:]).abs().max() > 1e-3


def test_rows_are_shared_only_when_everything_but_the_context_repeats():
    unet = _unet(TINY_SD1.unet)
    seen = _first_resblock_batches(unet)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(3, 7, 32, generator=g)
    other = x + 1e-3
    with torch.inference_mode():
        unet(torch.cat([x, x, x]), torch.tensor([500.0]), context=context)  # 3 copies
        unet(torch.cat([x, x, other]), torch.tensor([500.0]), context=context)
        unet(torch.cat([x] * 3), torch.tensor([500.0, 500.0, 501.0]), context=context)
    assert seen == [1, 3, 3]
