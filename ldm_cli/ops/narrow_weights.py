"""U-Net weights kept in the file's fp16 (or bf16) and widened to fp32 a slice at a time.

An fp16 checkpoint run in fp32 on the CPU used to be converted whole at load: SD 1.5's 4.3 GB
of fresh fp32 memory, faulted in page by page, most of the load's second. The U-Net's large
convolution and linear weights (2.85 GB of it) can instead stay views of the file's fp16
bytes: each call widens a slice of at most 16 MiB of fp32 output channels into a small buffer
that stays in cache and computes that slice of the output (models/weight_slices), in fp32. The
widening is exact, so each output channel is the same sum of products; only the kernels'
blocking may differ, so results agree to float rounding (the same PNG to 1/255 for SD 1.5).

It is the default (`--low-memory`, `ldm_cli.load(low_memory=None)`; `loading.narrow_keys` picks
the weights) unless the U-Net is compiled or offloaded. Widening every call costs about what it
saves: SD 1.5 from its fp16 file on a 2-core Zen 5 EPYC, peak RSS 4.65 -> 3.13 GB (256x256) and
4.98 -> 3.58 GB (512x512), load 1.06 -> 0.43 s, `ldm generate` wall time 9.27 -> 8.32 s (4
steps at 256x256), 27.35 -> 27.27 s (20 steps), 51.98 -> 52.41 s (10 steps at 512x512); the
steps themselves were 0-10% slower across runs and the first one 0.4-1.1 s (new convolution
shapes to prepare). `--no-low-memory` converts at load as before.
"""

from __future__ import annotations

import torch

# weights smaller than this (in fp32) are converted at load: widening them per call buys little
MIN_BYTES = 1 << 20


def is_narrow(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """A weight stored in a narrower float type than the activations it multiplies (computed
    by models/weight_slices)."""
    if not (weight.is_floating_point() and x.is_floating_point()):
        return False
    return weight.element_size() < x.element_size()
