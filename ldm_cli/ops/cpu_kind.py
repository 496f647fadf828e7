"""The kind of CPU torch runs on, for the defaults that depend on it (docs/benchmarks.md)."""

from __future__ import annotations

import functools

import torch


def _vendor_is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


@functools.cache
def amd_avx512() -> bool:
    """An AMD CPU whose best torch kernels are AVX-512 (Zen 4, Zen 5). On the 2-core Zen 5 EPYC
    of docs/benchmarks.md oneDNN ran a matmul as a 1x1 convolution at twice MKL's sgemm speed,
    and its 3x3 convolutions 1.35-1.5x faster on channels-last inputs at 128-256 channels."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and _vendor_is_amd()
