"""Reading a checkpoint's tensors into another dtype on the CPU (an fp16 file run in fp32).

Each tensor is converted straight from the file's memory map into its own allocation, with no
intermediate buffer (reading into a buffer first made SD 1.5 fp16 -> fp32 take 5.0 s instead
of 3.1 s on one core), and the file pages it came from are then dropped from this process's
mapping (they stay in the page cache), so peak memory is the converted model plus one tensor,
not the model plus the file. The tensors come from torch's allocator (not one private memory
map, as before): a released U-Net's tensors are then free blocks that the VAE decode's
activations reuse, already faulted in, where pages handed back to the kernel had to be faulted
in afresh (82,000 faults, 0.09 s, in SD 1.5's first 256x256 decode; see release_weights).
(Asking for transparent huge pages made loading take 12.8 s: the kernel compacts memory to
find them.)
"""

from __future__ import annotations

import contextlib
import math
import mmap
from pathlib import Path

import torch

ALIGN = 64  # bytes; torch's CPU allocator starts every tensor on a cache line
_PAGE = mmap.PAGESIZE


def _advise(mapped: mmap.mmap, name: str, start: int = 0, length: int | None = None) -> None:
    """mmap.madvise where this platform has the advice (Linux); a hint, so never an error."""
    advice = getattr(mmap, name, None)
    if advice is None or not hasattr(mapped, "madvise"):
        return
    try:
        if length is None:
            mapped.madvise(advice)
        else:
            mapped.madvise(advice, start, length)
    except (OSError, ValueError):
        pass


def whole_pages(offset: int, nbytes: int) -> tuple[int, int]:
    """[start, end) of the whole pages inside [offset, offset + nbytes); empty when start >= end."""
    return -(-offset // _PAGE) * _PAGE, (offset + nbytes) // _PAGE * _PAGE


def _drop_pages(mapped: mmap.mmap, offset: int, nbytes: int) -> None:
    """Unmap the whole pages inside [offset, offset + nbytes) from this process (Linux)."""
    start, end = whole_pages(offset, nbytes)
    if end > start:
        _advise(mapped, "MADV_DONTNEED", start, end - start)


def read_converted(
    path: Path,
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]],
    target: torch.dtype,
    channels_last: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """{key: (stored dtype, shape, byte offset in the file)} -> CPU tensors in `target`; the
    4-d tensors named in `channels_last` are written in that memory format."""
    out = {}
    with open(path, "rb") as f:
        # ACCESS_COPY: a private mapping torch.frombuffer accepts as writable; nothing writes
        # to it, so no page is ever copied
        source = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            _advise(source, "MADV_SEQUENTIAL")
            for key, (stored, shape, offset) in tensors.items():
                count = math.prod(shape)
                if count == 0:
                    out[key] = torch.empty(shape, dtype=target)
                    continue
                src = torch.frombuffer(source, dtype=stored, count=count, offset=offset)
                if key in channels_last:
                    n, c, h, w = shape
                    dst = torch.empty((n, h, w, c), dtype=target).permute(0, 3, 1, 2)
                else:
                    dst = torch.empty(shape, dtype=target)
                dst.copy_(src.view(shape))
                del src
                _drop_pages(source, offset, count * stored.itemsize)
                out[key] = dst
        finally:
            with contextlib.suppress(BufferError):  # a tensor still views it: closed when freed
                source.close()
    return out
