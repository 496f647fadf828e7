"""Keep freed memory inside the process (glibc malloc), so sampling steps stop page-faulting.

By default glibc serves each allocation above 128 KiB-32 MiB with its own mmap and unmaps it
on free, and trims the heap top back to the kernel. A U-Net call allocates and frees
activations of tens of MB hundreds of times, so every step asked the kernel for fresh zeroed
pages again: ~475,000 minor faults per 256x256 CFG call of SD 1.5, 2.70 s against 2.20 s
without them, and 11.2 s against 8.4 s at 512x512 (2-core EPYC, docs/benchmarks.md); peak RSS
did not grow (5.60 GB against 5.47 GB at 512). The settings are process-wide, so the `ldm`
command applies them at start; the library (`ldm_cli.load`) leaves its host's allocator alone.
`LDM_MALLOC=default` turns this off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_KEEP_TOP = 1 << 30  # give the heap top back only above 1 GiB free (a released U-Net, say)
_TOP_PAD = 1 << 28


def keep_freed_memory() -> bool:
    """Tune glibc malloc to reuse freed blocks; False where it does not apply (not glibc,
    LDM_MALLOC=default) or a setting was refused."""
    if os.environ.get("LDM_MALLOC", "").lower() == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_TOP), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
