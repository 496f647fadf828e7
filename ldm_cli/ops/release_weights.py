"""Giving the memory of weights a run will not use again to what comes next (CPU only).

A one-shot `ldm generate` holds the U-Net (3.3 GiB in fp32 for SD 1.5) and the text encoder
through the VAE decode, which is when its memory peaks. Dropping the Python references is not
always enough: a weight used in place from the file is a view of its memory map. So the pages
under each tensor are handed back with madvise(MADV_DONTNEED) (a file's pages stay in the page
cache), and the module moves to the meta device; the caller must never run it again
(``Pipeline`` refuses to).

Handing pages back costs work (~0.25 s for SD 1.5's 3.3 GiB U-Net on a 2-core EPYC, as long as a
small VAE decode), and it only pays for the room the decode will take. So the U-Net before a
decode frees only `decode_room` bytes, its largest tensors first; the rest stays resident (held
by the released module) until the process ends.

A tensor with its own allocation (an fp16 file converted to fp32 by ``converted_load``) can
instead go to the process's allocator as it is (`reuse`), where the decode's activations reuse
its pages, already faulted in: no system call and no page fault (with the ``ldm`` command's
allocator settings, ``allocator.keep_freed_memory``). That pays only where the decode's
activations fit in the freed tensors: glibc does not merge neighbouring ones (posix_memalign
leaves small blocks between them), so a larger activation takes fresh pages on top of memory
that was not handed back. SD 1.5 at 256x256 (activations up to 32 MiB, weights up to 59 MiB):
release and first decode 1.25 -> 1.06 s; at 512x512 (256 MiB activations) reuse would raise
peak memory by 650 MB, so there the pages are handed back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch
from torch import nn

from ldm_cli.core.config import VAEConfig
from ldm_cli.ops.converted_load import whole_pages

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
    start, stop = whole_pages(t.data_ptr(), t.nbytes)
    if stop <= start or madvise(start, stop - start, _MADV_DONTNEED) != 0:
        return 0
    return stop - start


def releasable(module: nn.Module) -> bool:
    """Every weight materialised on the CPU (not offloaded, not on a GPU)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" and not t.is_meta for t in tensors)


def owns_its_bytes(t: torch.Tensor) -> bool:
    """A CPU tensor with a storage of its own size from torch's allocator (not a view of a
    memory map or of a larger tensor): once nothing refers to it, its bytes are freed."""
    if t.device.type != "cpu" or t.is_meta:
        return False
    storage = t.untyped_storage()
    return storage.resizable() and storage.nbytes() == t.nbytes


def release_module(module: nn.Module, room: int | None = None, reuse: bool = False) -> int:
    """Free a CPU module's weights for good and leave it on the meta device; returns bytes
    freed: all of them, or with `room` its largest tensors until at least that many (the rest
    stays resident, held by the module, until the process ends). Freed pages are handed back
    to the system, except with `reuse`: then the tensors that own their bytes go to this
    process's allocator as they are, for allocations smaller than each of them. A module
    that is not `releasable` is left as it is (0)."""
    if not releasable(module):
        return 0
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}  # tied: once
    order = sorted(tensors.values(), key=lambda t: t.nbytes, reverse=True)
    if reuse:  # what the allocator can reuse first, then views of the file
        order.sort(key=lambda t: not owns_its_bytes(t))  # stable: by size within each
    freed, held = 0, []
    with torch.no_grad():
        for t in order:
            if room is not None and freed >= room:
                held.append(t)  # resident
            elif reuse and owns_its_bytes(t):
                freed += t.nbytes  # into the allocator, by the move to meta below
            else:
                freed += discard_pages(t)
                # its allocation stays taken: were it freed, the allocator would hand its
                # now empty pages out again, to be faulted in afresh
                held.append(t)
    module._held_until_exit = held
    module.to("meta")
    return freed


# The VAE decoder's working set measured 3-5 times its largest activation (SD 1.5, 256-512 px
# images: 272-803 MB above what sampling had left in use); room for twice that is made.
DECODE_ROOM_ACTIVATIONS = 8


def decode_largest_activation(
    vae: VAEConfig, latents: torch.Size, factor: int, itemsize: int
) -> int:
    """Bytes of the decoder's largest activation: the full-resolution input of its top level
    (the channels of the level below, upsampled)."""
    batch, _, height, width = latents
    channels = vae.ch * max(vae.ch_mult[:2])
    return batch * channels * height * factor * width * factor * itemsize


def decode_room(vae: VAEConfig, latents: torch.Size, factor: int, itemsize: int) -> int:
    """Bytes to free before decoding `latents` so that the decode does not raise peak memory:
    a multiple of the decoder's largest activation."""
    return DECODE_ROOM_ACTIVATIONS * decode_largest_activation(vae, latents, factor, itemsize)
