"""The VAE decoder run channels-last (NHWC) on CPUs where oneDNN's convolutions gain from it.

On the 2-core Zen 5 EPYC of docs/benchmarks.md oneDNN's 3x3 convolutions at the decoder's top
levels run 1.35-1.5x faster on channels-last inputs and weights (128 channels at 256x256:
278 -> 411 GFLOP/s), though not at the low-resolution levels. The decoder's own layout
changes (the folded upsample and the strip path write their output in the input's layout)
keep every activation channels-last, so no copies between layouts are made; its conv weights
are written channels-last when an fp16 checkpoint is converted to fp32 at load
(``stored_channels_last``), or else stored channels-last on the first such decode (a copy of
them, 0.2 GB for SD 1.5).
LDM_VAE_LAYOUT=nhwc|nchw overrides the default, which is nhwc on AMD AVX-512 CPUs only (not
measured elsewhere; an earlier whole-model try on another CPU was 8-9% slower).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ldm_cli.env_choice import env_choice
from ldm_cli.file_pages import drop_file_pages
from ldm_cli.models.cpu_kind import amd_avx512

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


@torch.no_grad()
def weights_channels_last(module: nn.Module) -> None:
    """Store `module`'s 4-d conv weights channels-last (once; they are replaced in place)."""
    layout = torch.channels_last
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d) or conv.weight.shape[-2:] == (1, 1):
            continue
        if not conv.weight.is_contiguous(memory_format=layout):
            copy = conv.weight.data.contiguous(memory_format=layout)
            drop_file_pages(conv.weight)
            conv.weight.data = copy


DECODER_PREFIX = "first_stage_model.decoder."


def stored_channels_last(key: str, shape: tuple[int, ...], target: torch.dtype) -> bool:
    """Whether the loader should write checkpoint tensor `key` channels-last when it converts it
    to `target` on the CPU: a decoder conv weight that the NHWC decode would copy anyway."""
    if default_layout() != "nhwc" or target != torch.float32 or not key.startswith(DECODER_PREFIX):
        return False
    return key.endswith(".weight") and len(shape) == 4 and tuple(shape[-2:]) != (1, 1)
