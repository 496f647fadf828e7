"""Giving the memory of weights a run will not use again back to the system (CPU only).

A one-shot `ldm generate` holds the U-Net (3.3 GiB in fp32 for SD 1.5) and the text encoder
through the VAE decode, which is when its memory peaks. Dropping the Python references would
not free them: the weights are views into one memory map (the file's, or the fp16 -> fp32
arena of ``converted_load``) that the VAE's weights keep alive. So the pages under each tensor
are handed back with madvise(MADV_DONTNEED), which drops them from this process (a file's pages
stay in the page cache), and the module moves to the meta device. The bytes it held are then
gone: the caller must never run that module again (``Pipeline`` refuses to).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn

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


def release_module(module: nn.Module) -> int:
    """Free a CPU module's weights for good and leave it on the meta device; returns bytes
    handed back. A module that is not `releasable` is left as it is (0)."""
    if not releasable(module):
        return 0
    with torch.no_grad():
        seen: set[int] = set()
        freed = 0
        for t in [*module.parameters(), *module.buffers()]:
            if t.data_ptr() not in seen:  # tied weights share their bytes
                seen.add(t.data_ptr())
                freed += discard_pages(t)
    module.to("meta")
    return freed
