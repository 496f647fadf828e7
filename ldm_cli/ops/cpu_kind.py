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


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def narrow_weights_by_default(file_bytes: int) -> bool:
    """Whether an fp16/bf16 file's U-Net weights stay narrow (widened per call, `--low-memory`)
    unless told otherwise. Measured per CPU kind (docs/benchmarks.md): on the AVX-512 Zen 5 EPYC
    the steps were as fast either way and the load 0.6 s faster, so narrow; on the AVX2 EPYC a
    step took 24% longer (SD 1.5 at 256x256, one thread: 9.1 s against 7.4 s), so the weights
    are widened at load there, unless that would leave less than the file's size again free
    (widening doubles the 16-bit weights; the step needs room besides)."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        return True
    free = available_memory_bytes()
    return free is not None and free < 3 * file_bytes
