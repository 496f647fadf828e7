"""The VAE decoder run channels-last (NHWC) on CPUs where oneDNN's convolutions gain from it.

On the 2-core Zen 5 EPYC of docs/benchmarks.md oneDNN's 3x3 convolutions at the decoder's top
levels run 1.35-1.5x faster on channels-last inputs (128 channels at 256x256: 278 -> 411
GFLOP/s), though not at the low-resolution levels. The decoder's own layout changes (the
folded upsample, the strip path and the attention block write their output in the input's
layout) keep every activation channels-last, so no copies between layouts are made. The conv
weights can stay as the checkpoint stores them: oneDNN reorders either layout into its own,
and a convolution took as long with NCHW weights as with NHWC ones (SD 1.5's decoder shapes,
within 1-4%). They used to be copied channels-last at the first decode, which only paid
because the attention block's NCHW output then went back to NHWC at the next convolution;
without that copy (0.2 GB, read from the file) the first decode at 256x256 took 1.23-1.27 s
against 1.27-1.34. An fp16 checkpoint's are still written channels-last when they are
converted to fp32 at load (``stored_channels_last``), which costs nothing.
LDM_VAE_LAYOUT=nhwc|nchw overrides the default, which is nhwc on AMD AVX-512 CPUs only (not
measured elsewhere; an earlier whole-model try on another CPU was 8-9% slower).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ldm_cli.core.env_choice import env_choice
from ldm_cli.ops.cpu_kind import amd_avx512

LAYOUTS = ("nhwc", "nchw")
ENV_VAR = "LDM_VAE_LAYOUT"


@functools.cache
def default_layout() -> str:
    return env_choice(ENV_VAR, LAYOUTS) or ("nhwc" if amd_avx512() else "nchw")


def is_channels_last(x: torch.Tensor) -> bool:
    """Laid out NHWC (and not also plain contiguous, as 1x1 images are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def decode_channels_last(z: torch.Tensor, decoder: nn.Module) -> bool:
    """Whether this decode runs NHWC: CPU fp32 inference of a frozen decoder whose weights are
    all in CPU memory (not offloaded: accelerate's hooks bring those in per layer), nhwc."""
    if default_layout() != "nhwc" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if z.device.type != "cpu" or z.dtype != torch.float32 or z.dim() != 4:
        return False
    return not any(
        p.requires_grad or p.is_meta or p.device.type != "cpu" for p in decoder.parameters()
    )


DECODER_PREFIX = "first_stage_model.decoder."


def stored_channels_last(key: str, shape: tuple[int, ...], target: torch.dtype) -> bool:
    """Whether the loader should write checkpoint tensor `key` channels-last when it converts it
    to `target` on the CPU: a decoder conv weight that the NHWC decode reads (free while it is
    converted anyway; the decode needs no such copy of weights used in place)."""
    if default_layout() != "nhwc" or target != torch.float32 or not key.startswith(DECODER_PREFIX):
        return False
    return key.endswith(".weight") and len(shape) == 4 and tuple(shape[-2:]) != (1, 1)
