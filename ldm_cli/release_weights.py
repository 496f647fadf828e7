"""Giving the memory of weights a run will not use again back to the system (CPU only).

A one-shot `ldm generate` holds the U-Net (3.3 GiB in fp32 for SD 1.5) and the text encoder
through the VAE decode, which is when its memory peaks. Dropping the Python references would
not free them: the weights are views into one memory map (the file's, or the fp16 -> fp32
arena of ``converted_load``) that the VAE's weights keep alive. So the pages under each tensor
are handed back with madvise(MADV_DONTNEED), which drops them from this process (a file's pages
stay in the page cache), and the module moves to the meta device. The bytes it held are then
gone: the caller must never run that module again (``Pipeline`` refuses to).

Handing pages back is itself work (~0.25 s for SD 1.5's 3.3 GiB U-Net on a 2-core EPYC, as
long as a small VAE decode), and it only pays for the room the decode will take: what is not
handed back is returned when the process exits. So the U-Net before a decode gives back only
`decode_room` bytes, its largest tensors first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn

from ldm_cli.config import VAEConfig
from ldm_cli.converted_load import whole_pages

_MADV_DONTNEED = 4  # Linux, every architecture


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none (not Linux or no libc found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def discard_pages(t: torch.Tensor) -> int:
    """Drop the whole pages inside `t`'s own bytes from this process; returns bytes dropped.

    Only the tensor's range, never the rest of a storage it shares. Afterwards those bytes read
    as zeros (anonymous memory) or as the file's (a private file mapping): garbage to the
    tensor's owner, so `t` must be dead. A hint: nothing happens where madvise is missing."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or t.is_meta or not t.is_contiguous():
        return 0
    start, stop = whole_pages(t.data_ptr(), t.numel() * t.element_size())
    if stop <= start or madvise(start, stop - start, _MADV_DONTNEED) != 0:
        return 0
    return stop - start


def releasable(module: nn.Module) -> bool:
    """Every weight materialised on the CPU (not offloaded, not on a GPU)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" and not t.is_meta for t in tensors)


def release_module(module: nn.Module, room: int | None = None) -> int:
    """Free a CPU module's weights for good and leave it on the meta device; returns bytes
    handed back: all of them, or with `room` its largest tensors until at least that many
    (the rest stays resident until the process ends). A module that is not `releasable` is
    left as it is (0)."""
    if not releasable(module):
        return 0
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}  # tied: once
    order = sorted(tensors.values(), key=lambda t: t.numel() * t.element_size(), reverse=True)
    with torch.no_grad():
        freed = 0
        for t in order:
            if room is not None and freed >= room:
                break
            freed += discard_pages(t)
    module.to("meta")
    return freed


# The VAE decoder's working set measured 3-5 times its largest activation (SD 1.5, 256-512 px
# images: 272-803 MB above what sampling had left in use); room for twice that is made.
DECODE_ROOM_ACTIVATIONS = 8


def decode_room(vae: VAEConfig, latents: torch.Size, factor: int, itemsize: int) -> int:
    """Bytes to free before decoding `latents` so that the decode does not raise peak memory:
    a multiple of the decoder's largest activation, the full-resolution input of its top
    level (the channels of the level below, upsampled)."""
    batch, _, height, width = latents
    channels = vae.ch * max(vae.ch_mult[:2])
    largest = batch * channels * height * factor * width * factor * itemsize
    return DECODE_ROOM_ACTIVATIONS * largest
