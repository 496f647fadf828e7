"""The shared 8-bit PSNR helper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.core.image_metrics import psnr


def test_known_value_and_identical_images():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = np.full((4, 4, 3), 16, dtype=np.uint8)  # mse 256
    assert math.isclose(psnr(a, b), 10 * math.log10(255**2 / 256))
    assert psnr(a, a) == math.inf
    assert psnr(a, a, identical=99.0) == 99.0


def test_arrays_tensors_images_and_lists_agree():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = psnr(x, y)
    assert psnr(torch.from_numpy(x), torch.from_numpy(y)) == expected
    images = ([Image.fromarray(i) for i in x], [Image.fromarray(i) for i in y])
    assert psnr(*images) == expected


def test_different_shapes_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
