"""--deep-cache: deep U-Net features reused across calls (ldm_cli.runtime.deep_cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_metrics import psnr
from ldm_cli.core.pngmeta import params_from_png
from ldm_cli.models.unet import UNetModel
from ldm_cli.runtime.deep_cache import deep_cache
from ldm_cli.testing import random_checkpoint, randomize_
from tests.cli_helpers import ldm, one_thread_per_command, pixels, written  # noqa: F401


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return randomize_(UNetModel(TINY_SD1.unet), seed=1).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=4)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 77, TINY_SD1.unet.context_dim, generator=g)
    return x, torch.full((batch,), 500.0), context


def _full_passes(unet, calls):
    """Which of the calls ran the middle block (a full pass)."""
    seen = []
    handle = unet.middle_block.register_forward_pre_hook(lambda m, a: seen.append(True))
    pattern = []
    try:
        for args in calls:
            before = len(seen)
            unet(*args)
            pattern.append(len(seen) > before)
    finally:
        handle.remove()
    return pattern


@torch.inference_mode()
def test_one_full_pass_in_every_interval(unet):
    args = _inputs()
    with deep_cache(unet, 3):
        assert _full_passes(unet, [args] * 7) == [True, False, False] * 2 + [True]
    assert unet.feature_cache is None
    assert _full_passes(unet, [args] * 2) == [True, True]


@torch.inference_mode()
def test_a_reused_call_on_the_same_input_equals_the_full_pass(unet):
    """The kept features are exactly what a full pass would compute again for the same input,
    so only the shallow blocks' recomputation separates the two, and it is deterministic."""
    x, t, context = _inputs()
    reference = unet(x, t, context)
    with deep_cache(unet, 2):
        first, second = unet(x, t, context), unet(x, t, context)
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=1e-6, atol=1e-6)
    with deep_cache(unet, 2):
        unet(x, t, context)
        moved = unet(x + 0.5, t - 100, context)  # shallow blocks see the new input
    assert not torch.allclose(moved, reference, atol=1e-3)


@torch.inference_mode()
def test_another_batch_shape_starts_with_a_full_pass(unet):
    with deep_cache(unet, 4):
        pattern = _full_passes(unet, [_inputs(2), _inputs(2), _inputs(1), _inputs(1)])
    assert pattern == [True, False, True, False]


@torch.inference_mode()
def test_interval_zero_or_one_is_off_and_negative_is_refused(unet):
    x, t, context = _inputs()
    reference = unet(x, t, context)
    for interval in (0, 1):
        with deep_cache(unet, interval):
            assert _full_passes(unet, [(x, t, context)] * 3) == [True] * 3
            torch.testing.assert_close(unet(x, t, context), reference, rtol=0, atol=0)
    with pytest.raises(UserError, match="--deep-cache"), deep_cache(unet, -1):
        pass


def test_pipeline_images_change_a_little_and_record_the_setting(checkpoint):
    pipe = ldm_cli.load(checkpoint, device="cpu", dtype="fp32")
    options = {"steps": 8, "seed": 5, "sampler": "euler"}
    (plain,) = pipe.generate("a red circle", **options)
    (cached,) = pipe.generate("a red circle", deep_cache=2, **options)
    (off,) = pipe.generate("a red circle", deep_cache=1, **options)
    a, b = np.asarray(plain), np.asarray(cached)
    assert np.array_equal(np.asarray(off), a)
    assert not np.array_equal(a, b)
    assert psnr(a, b) > 20
    assert "Deep cache: 2" in cached.info["parameters"]
    assert "Deep cache" not in plain.info["parameters"]


def test_cli_writes_and_rereads_the_setting(checkpoint, tmp_path):
    common = ("--model", str(checkpoint), "--steps", "4", "--seed", "1", "--sampler", "euler")
    (first,) = written(
        ldm("generate", "a cat", *common, "--deep-cache", "3", "--out", str(tmp_path / "a"))
    )
    assert params_from_png(first).extra["Deep cache"] == "3"
    (again,) = written(
        ldm(
            "generate",
            "--from-png",
            str(first),
            "--model",
            str(checkpoint),
            "--out",
            str(tmp_path / "b"),
        )
    )
    assert np.array_equal(pixels(first), pixels(again))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--deep-cache", "-2"), "--deep-cache must be 0"),
        (("--deep-cache", "2", "--compile"), "--deep-cache does not work with --compile"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(checkpoint, tmp_path, args, message):
    proc = ldm(
        "generate", "a cat", "--model", str(checkpoint), *args, "--out", str(tmp_path), check=False
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
