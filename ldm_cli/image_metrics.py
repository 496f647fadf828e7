"""PSNR of 8-bit images: the one fidelity number the trainer, the benchmarks and tests report."""

from __future__ import annotations

import math

import numpy as np


def _stacked(images) -> np.ndarray:
    """An array of 0-255 values from an array, a CPU tensor, a PIL image or a list of them."""
    if isinstance(images, list | tuple):
        return np.stack([np.asarray(image, dtype=np.float64) for image in images])
    return np.asarray(images, dtype=np.float64)


def psnr(a, b, identical: float = math.inf) -> float:
    """PSNR in dB from the mean squared error over all pixels of ``a`` against ``b``.

    ``identical`` is returned when they are equal (JSON metrics pass a finite stand-in).
    """
    x, y = _stacked(a), _stacked(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr of arrays of different shapes {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return identical if mse == 0 else 10 * math.log10(255.0**2 / mse)
