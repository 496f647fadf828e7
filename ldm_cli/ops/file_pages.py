"""Letting go of a weight's file pages once a copy made from it is what the model uses.

A weight loaded in place from a safetensors file (stored in the dtype it runs in) is a view of
the file's private memory map: reading it maps the file's pages into the process. Where a
layer keeps a derived copy instead (the folded kernels of an upsampling convolution), both
would stay resident, the original for nothing. Its pages are clean copies of the page cache,
so they can be dropped with madvise(MADV_DONTNEED): the tensor
keeps its values (a later read maps the same file bytes again) and this process's memory no
longer counts them. SD 1.5 from an fp32 file: 133 MB for the U-Net's three upsampling
convolutions.

Only a tensor never written since it was loaded (version 0: a LoRA patch writes in place and
would be reverted) that lies inside a file mapping (never anonymous memory, whose dropped
pages would read back as zeros) is touched. Linux only; elsewhere nothing happens.
"""

from __future__ import annotations

import sys

import torch

from ldm_cli.ops.release_weights import discard_pages, owns_its_bytes


def file_mapped(start: int, stop: int) -> bool:
    """Whether [start, stop) lies inside one file-backed mapping of this process (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= start and stop <= high:
                    # an inode and a path: a file, not anonymous memory or [heap]
                    return fields[4] != "0" and len(fields) == 6 and fields[5].startswith("/")
    except OSError:
        return False
    return False


def drop_file_pages(t: torch.Tensor) -> int:
    """Drop the resident pages of a weight read in place from its file and never written
    since; returns the bytes dropped (0 when it is anything else)."""
    if t.device.type != "cpu" or t.is_meta or not t.is_contiguous() or t._version != 0:
        return 0
    if owns_its_bytes(t):
        return 0
    start = t.data_ptr()
    if not file_mapped(start, start + t.nbytes):
        return 0
    return discard_pages(t)
