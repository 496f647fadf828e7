"""Fidelity of 8-bit images: PSNR and SSIM from scikit-image's metrics, and the mean colour
shift. The numbers the trainer, the benchmarks, the upscaler tables and the tests report."""

from __future__ import annotations

import math
import warnings

import numpy as np


def _stacked(images) -> np.ndarray:
    """An array of 0-255 values from an array, a CPU tensor, a PIL image or a list of them."""
    if isinstance(images, list | tuple):
        return np.stack([np.asarray(image, dtype=np.float64) for image in images])
    return np.asarray(images, dtype=np.float64)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = _stacked(a), _stacked(b)
    if x.shape != y.shape:
        raise ValueError(f"comparing arrays of different shapes {x.shape} and {y.shape}")
    return x, y


def psnr(a, b, identical: float = math.inf) -> float:
    """PSNR in dB over all pixels of ``a`` against ``b`` (skimage's peak_signal_noise_ratio,
    data range 255).

    ``identical`` is returned when they are equal (JSON metrics pass a finite stand-in).
    """
    from skimage.metrics import peak_signal_noise_ratio

    x, y = _pair(a, b)
    if np.array_equal(x, y):
        return identical
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(peak_signal_noise_ratio(y, x, data_range=255))


def ssim(a, b) -> float:
    """Mean SSIM of RGB images [H, W, 3] (or a stack [N, H, W, 3], averaged over images):
    skimage's structural_similarity, data range 255, Gaussian window as Wang et al."""
    from skimage.metrics import structural_similarity

    x, y = _pair(a, b)
    if x.ndim == 3:
        x, y = x[None], y[None]
    values = [
        structural_similarity(
            yi,
            xi,
            data_range=255,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for xi, yi in zip(x, y, strict=True)
    ]
    return float(np.mean(values))


def colour_shift(a, b) -> float:
    """The largest per-channel difference of the mean colours of ``a`` and ``b``, in 8-bit
    levels: how far the picture as a whole moved in colour."""
    x, y = _pair(a, b)
    return float(
        np.abs(x.reshape(-1, x.shape[-1]).mean(0) - y.reshape(-1, y.shape[-1]).mean(0)).max()
    )
