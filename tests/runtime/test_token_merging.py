"""--token-merging: ToMe for the U-Net's full-resolution self-attention
(ldm_cli.runtime.token_merging)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.pngmeta import params_from_png
from ldm_cli.models.attention import BasicTransformerBlock
from ldm_cli.models.unet import UNetModel
from ldm_cli.runtime.token_merging import TokenMerger, token_merging
from ldm_cli.testing import random_checkpoint, randomize_
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=6)


def _tokens(batch=2, h=8, w=6, width=5, seed=0):
    return torch.randn(batch, h * w, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h, w", [(8, 6), (7, 5), (2, 2)])
def test_unmerge_gives_each_token_its_group_mean(h, w):
    x = _tokens(h=h, w=w)
    merger = TokenMerger(0.5, h, w)
    merge, unmerge = merger.plan(x)
    merged = merge(x)
    assert merged.shape == (2, h * w - int(0.5 * h * w), x.shape[-1])
    restored = unmerge(merged)
    # tokens that now share a value form the groups; each holds its members' mean
    for b in range(2):
        values, group = restored[b].unique(dim=0, return_inverse=True)
        assert len(values) == merged.shape[1]
        for g in range(len(values)):
            members = x[b][group == g]
            torch.testing.assert_close(values[g], members.mean(0), rtol=1e-5, atol=1e-6)
            if len(members) == 1:
                assert torch.equal(values[g], members[0])


def test_the_most_similar_tokens_are_merged():
    h = w = 4
    x = _tokens(batch=1, h=h, w=w, width=8, seed=1)
    x[0, 1] = x[0, 0] * 3.0  # same direction as token 0: cosine 1
    merger = TokenMerger(1 / 16, h, w)  # a single merge
    merger.generator.manual_seed(0)
    merge, unmerge = merger.plan(x)
    restored = unmerge(merge(x))
    changed = (restored != x).any(-1)[0].nonzero().flatten().tolist()
    assert sorted(changed) == [0, 1]


def test_partitions_are_seeded_and_advance_per_plan():
    first = TokenMerger(0.5, 8, 8)
    second = TokenMerger(0.5, 8, 8)
    a1, a2 = first.partition("cpu"), first.partition("cpu")
    b1 = second.partition("cpu")
    assert torch.equal(a1[1], b1[1]) and not torch.equal(a1[1], a2[1])
    sources, destinations = a1
    assert len(destinations) == 16 and len(sources) == 48
    assert sorted(torch.cat([sources, destinations]).tolist()) == list(range(64))


@torch.inference_mode()
def test_a_block_over_equal_tokens_gives_the_same_output():
    """With all tokens equal, self-attention over fewer copies gives the same values."""
    torch.manual_seed(0)
    block = randomize_(BasicTransformerBlock(16, 2, 8, context_dim=12), seed=2).eval()
    x = torch.randn(2, 1, 16).expand(2, 64, 16).contiguous()
    context = torch.randn(2, 7, 12)
    plain = block(x, context)
    block.token_merger = TokenMerger(0.5, 8, 8)
    try:
        merged = block(x, context)
    finally:
        block.token_merger = None
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-6)


@torch.inference_mode()
def test_only_full_resolution_self_attention_sees_fewer_tokens(monkeypatch):
    import ldm_cli.models.attention as attention_module

    torch.manual_seed(0)
    unet = randomize_(UNetModel(TINY_SD1.unet), seed=3).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([400.0, 400.0])
    context = torch.randn(2, 77, TINY_SD1.unet.context_dim)
    real = attention_module.attention

    def shapes(ratio):
        seen = []

        def recording(q, k, v):
            seen.append((q.shape[2], k.shape[2]))
            return real(q, k, v)

        monkeypatch.setattr(attention_module, "attention", recording)
        with token_merging(unet, ratio, 16, 16):
            unet(x, t, context)
        return seen

    plain, merged = shapes(0.0), shapes(0.5)
    assert len(plain) == len(merged)
    changed = [(a, b) for a, b in zip(plain, merged, strict=True) if a != b]
    # self-attention of the three level-0 blocks (one down, two up): 256 -> 128 queries and keys;
    # cross-attention (77 keys) and the 8x8 blocks are untouched
    assert changed == [((256, 256), (128, 128))] * 3
    assert ((256, 77)) in merged and (64, 64) in merged


def test_pipeline_image_changes_a_little_and_records_the_ratio(checkpoint):
    pipe = ldm_cli.load(checkpoint, device="cpu", dtype="fp32")
    options = {"steps": 6, "seed": 2, "sampler": "euler"}
    (plain,) = pipe.generate("a blue square", **options)
    (merged,) = pipe.generate("a blue square", token_merging=0.5, **options)
    (again,) = pipe.generate("a blue square", token_merging=0.5, **options)
    a, b = np.asarray(plain, dtype=np.float64), np.asarray(merged, dtype=np.float64)
    assert np.array_equal(np.asarray(again), np.asarray(merged))
    assert not np.array_equal(a, b)
    assert 10 * np.log10(255.0**2 / np.mean((a - b) ** 2)) > 20
    assert "Token merging ratio: 0.5" in merged.info["parameters"]
    assert "Token merging" not in plain.info["parameters"]


def test_cli_writes_and_rereads_the_ratio(checkpoint, tmp_path):
    common = ("--model", str(checkpoint), "--steps", "4", "--seed", "1")
    args = ("generate", "a cat", *common, "--token-merging", "0.4", "--out", str(tmp_path / "a"))
    (first,) = written(ldm(*args))
    assert params_from_png(first).extra["Token merging ratio"] == "0.4"
    again = ldm("generate", "--from-png", str(first), *common[:2], "--out", str(tmp_path / "b"))
    (second,) = written(again)
    assert np.array_equal(pixels(first), pixels(second))


def test_bad_ratios_are_refused(checkpoint, tmp_path):
    proc = ldm(
        "generate", "a cat", "--model", str(checkpoint), "--token-merging", "0.95",
        "--out", str(tmp_path), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--token-merging must be within [0, 0.9]" in proc.stderr
    with pytest.raises(UserError), token_merging(None, -0.1, 8, 8):
        pass


@torch.inference_mode()
def test_a_guidance_batch_is_not_shared_while_tokens_merge():
    """The U-Net runs its first layers once for the identical halves of a CFG batch (on the
    CPU), but not while token merging is on: the guard must see the merger, which
    `use_token_merger` sets on the U-Net itself (it read the class attribute of the blocks,
    which was always None, so the guard never fired)."""
    from ldm_cli.runtime.token_merging import token_merging

    torch.manual_seed(0)
    unet = randomize_(UNetModel(TINY_SD1.unet), seed=5).eval()
    first = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    rows = []
    hook = first.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    x = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1).contiguous()
    t = torch.tensor([400.0, 400.0])
    context = torch.randn(2, 77, TINY_SD1.unet.context_dim)
    try:
        unet(x, t, context)
        with token_merging(unet, 0.5, 16, 16):
            unet(x, t, context)
        unet(x, t, context)
    finally:
        hook.remove()
    assert rows == [1, 2, 1]  # shared rows, then the whole batch under the merger, then shared
    assert unet.token_merger is None and first.token_merger is None
