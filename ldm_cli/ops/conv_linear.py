"""Linear layers computed by oneDNN as 1x1 convolutions on AMD AVX-512 CPUs.

torch's CPU ``F.linear`` is MKL's sgemm, which on a 2-core AMD EPYC (Zen 5, AVX-512) reaches
213-238 GFLOP/s, while oneDNN, which torch uses for convolutions, computes the same products
as a 1x1 convolution at 430-500 GFLOP/s (the U-Net's shapes, 256+ rows; docs/benchmarks.md).
A linear layer over rows of K features is exactly a 1x1 convolution over a [1, K, rows, 1]
channels-last view of the same memory, and the output comes back as a view too, so nothing is
copied; the result is the same sum of products, equal to ``F.linear`` up to float rounding.
With few rows the weight dominates and sgemm is as fast or faster (MIN_ROWS,
MAX_SMALL_WEIGHT).

The U-Net's attention and feed-forward layers and the text encoders' layers use ``Linear``
(a drop-in ``nn.Linear``: same parameters and state-dict keys). LDM_LINEAR=conv|blas overrides
the choice by CPU; the default is ``conv`` on AMD CPUs with AVX-512 and ``blas`` elsewhere: not
measured on Intel CPUs, where sgemm was fast already (355 GFLOP/s on the 2-core Xeon of
docs/benchmarks.md), nor on AVX2-only CPUs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.core.env_choice import env_choice
from ldm_cli.ops import weight_slices
from ldm_cli.ops.cpu_kind import amd_avx512

MODES = ("conv", "blas")
ENV_VAR = "LDM_LINEAR"
# Measured on the Zen 5 EPYC (sgemm time / 1x1-conv time, 2 threads): 1.2-2.4 from 256 rows,
# 1.3-2.4 at 128-154 rows but for the widest weight (1280 -> 10240 features, 13M: 0.85), 0.5-1.1
# below 64 rows.
MIN_ROWS = 128
ALL_WEIGHTS_ROWS = 256
MAX_SMALL_WEIGHT = 8 * 2**20  # elements, for MIN_ROWS <= rows < ALL_WEIGHTS_ROWS
_settings: dict = {"mode": None}


@functools.cache
def default_mode() -> str:
    """$LDM_LINEAR, else ``conv`` on AMD AVX-512 CPUs and ``blas`` elsewhere."""
    return env_choice(ENV_VAR, MODES) or ("conv" if amd_avx512() else "blas")


def current_mode() -> str:
    return _settings["mode"] or default_mode()


def set_linear_mode(mode: str | None) -> str:
    """Choose ``conv`` or ``blas`` (None: the default again); returns the previous mode."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"bad linear mode {mode!r}")
    previous = current_mode()
    _settings["mode"] = mode
    return previous


def uses_conv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` computes this product as a 1x1 convolution: CPU fp32 inference
    with enough rows, in ``conv`` mode."""
    if torch.compiler.is_compiling() or current_mode() != "conv":
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if x.dim() < 2 or x.shape[-1] == 0:
        return False
    rows = x.numel() // x.shape[-1]
    return rows >= ALL_WEIGHTS_ROWS or (rows >= MIN_ROWS and weight.numel() <= MAX_SMALL_WEIGHT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where ``uses_conv`` says so."""
    if not uses_conv(x, weight):
        return F.linear(x, weight, bias)
    features = x.shape[-1]
    rows = x.numel() // features
    # [rows, K] as [1, K, rows, 1]: channels innermost, which oneDNN reads as channels-last
    image = x.reshape(1, rows, 1, features).permute(0, 3, 1, 2)
    kernel = weight.reshape(*weight.shape, 1, 1)
    out = F.conv2d(image, kernel, bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose forward is ``linear`` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if weight_slices.sliced(self.weight, x):
            return weight_slices.linear(x, self.weight, self.bias, linear)
        return linear(x, self.weight, self.bias)
