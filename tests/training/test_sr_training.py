"""`ldm train upscaler`: its training pairs, its linear start, a short run end to end that
resumes exactly, and the file it writes loading in `ldm upscale`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm_cli.cli import train_upscaler as cli_train_upscaler
from ldm_cli.data.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, photo
from ldm_cli.models.sr_compact import CompactShape, SRVGGCompact
from ldm_cli.training.settings import LoopOptions, StageSettings
from ldm_cli.training.sr_init import fit_linear_filters, init_with_linear_path
from ldm_cli.training.sr_pairs import SourcePool, degrade, mosaic, sample_batch
from ldm_cli.training.sr_stage import SrPlan, train_sr
from tests.cli_helpers import ldm, written


def test_held_out_photos_are_never_trained_on():
    assert not set(HELDOUT_PHOTOS) & set(TRAIN_PHOTOS)
    for name in TRAIN_PHOTOS[:3]:
        image = photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def pool() -> SourcePool:
    rng = np.random.default_rng(0)
    flat = [rng.integers(0, 256, (80, 80, 3), dtype=np.uint8) for _ in range(4)]
    return SourcePool({"photos": flat, "textures": flat[:2]})


def test_batches_are_seeded_and_the_right_shapes():
    a = sample_batch(pool(), 4, 8, 5, torch.Generator().manual_seed(3))
    b = sample_batch(pool(), 4, 8, 5, torch.Generator().manual_seed(3))
    c = sample_batch(pool(), 4, 8, 5, torch.Generator().manual_seed(4))
    assert a[0].shape == (5, 3, 8, 8) and a[1].shape == (5, 3, 32, 32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[0].min() >= 0 and a[0].max() <= 1


def test_the_clean_case_is_a_bicubic_shrink():
    high = np.asarray(Image.fromarray(photo("coins")).crop((0, 0, 64, 64)))
    rng = np.random.default_rng(0)
    expected = np.asarray(Image.fromarray(high).resize((16, 16), Image.Resampling.BICUBIC))
    lows = [degrade(high, 4, rng) for _ in range(40)]
    clean = sum(np.array_equal(low, expected) for low in lows)
    assert 10 <= clean <= 35  # CLEAN_FRACTION of 0.5, plus the odd draw that changes nothing


def test_mosaics_tile_small_images_of_one_size():
    small = [np.full((20, 20, 3), i, np.uint8) for i in range(9)] + [
        np.zeros((50, 50, 3), np.uint8)
    ]
    out = mosaic(small, 40)
    assert [m.shape for m in out] == [(40, 40, 3), (40, 40, 3), (50, 50, 3)]  # 1 left over


def test_the_network_starts_as_the_fitted_linear_upscaler():
    """On pairs that a linear 3x3 upscaler makes exactly, the fit recovers it and the
    initialised network reproduces it (its other channels do not show yet)."""
    gen = torch.Generator().manual_seed(0)
    low = torch.rand(6, 3, 12, 12, generator=gen)
    kernel = torch.randn(4, 1, 3, 3, generator=gen) * 0.2
    padded = torch.nn.functional.pad(low.reshape(-1, 1, 12, 12), (1, 1, 1, 1), mode="replicate")
    residual = torch.nn.functional.conv2d(padded, kernel) + 0.01
    base = torch.nn.functional.interpolate(low.reshape(-1, 1, 12, 12), scale_factor=2)
    high = (torch.nn.functional.pixel_shuffle(residual, 2) + base).reshape(6, 3, 24, 24)
    filters = fit_linear_filters(low, high, 2)
    assert torch.allclose(filters[:, :9], kernel.view(4, 9), atol=1e-4)
    net = init_with_linear_path(SRVGGCompact(CompactShape(2, 8, 2)), filters, seed=0)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # zero padding at the edges
    with torch.no_grad():
        assert torch.allclose(net(low)[inner], high[inner], atol=1e-4)


def quick_plan(run_dir: Path, steps: int, **loop) -> SrPlan:
    return SrPlan(
        run_dir=run_dir,
        shape=CompactShape(2, 8, 1),
        settings=StageSettings(steps, 2, 1e-3, warmup=1, weight_decay=0.0),
        loop=LoopOptions(run_dir=run_dir, seed=5, log_every=1, save_every=2, quiet=True, **loop),
        low_side=8,
        photos=("coins",),
        counts=(9, 2, 1),
        heldout=("camera",),
    )


def test_a_resumed_run_ends_with_the_same_weights(tmp_path):
    whole = train_sr(quick_plan(tmp_path / "a", 4))
    assert whole["heldout_photos"]["images"]["camera"]["network"]["psnr_db"] > 20
    stopped = train_sr(quick_plan(tmp_path / "b", 4, stop_after=2))
    assert "export" not in stopped
    train_sr(quick_plan(tmp_path / "b", 4, resume=True))
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_defaults_are_the_shipped_recipe():
    from ldm_cli.models.sr_compact import CompactShape as Shape

    shipped = Shape(4)
    assert (shipped.features, shipped.convs) == (
        cli_train_upscaler.FEATURES,
        cli_train_upscaler.CONVS,
    )


@pytest.mark.slow
def test_cli_trains_a_file_that_ldm_upscale_reads(tmp_path):
    run = tmp_path / "run"
    args = ("--steps", "2", "--patch", "8", "--features", "8", "--convs", "1", "-b", "2")
    proc = ldm("train", "upscaler", "-o", str(run), "--scale", "2", *args, "--threads", "1")
    assert "mean gain over bicubic" in proc.stdout
    model = run / "model.safetensors"
    Image.fromarray(photo("astronaut")).resize((24, 24)).save(tmp_path / "a.png")
    out = ldm("upscale", str(tmp_path / "a.png"), "--upscaler", str(model), "-o", str(tmp_path))
    (path,) = written(out)
    assert Image.open(path).size == (48, 48)
    refused = ldm("train", "upscaler", "-o", str(tmp_path / "r"), "--scale", "3", check=False)
    assert refused.returncode == 2 and "--scale must be 2 or 4" in refused.stderr


def test_the_old_train_form_still_works_with_a_notice(tmp_path):
    proc = ldm("train", str(tmp_path / "absent"), "-o", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "note: `ldm train DATA_DIR` is now `ldm train model DATA_DIR`",
        f"error: dataset folder {tmp_path / 'absent'} does not exist",
    ]
    listing = ldm("train", "--help").stdout
    assert "model" in listing and "upscaler" in listing
