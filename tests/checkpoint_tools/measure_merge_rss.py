"""Peak memory of `ldm merge` on two full-size SD 1.5 fp16 files (not a test: run it by hand).

    OMP_NUM_THREADS=1 python -m tests.checkpoint_tools.measure_merge_rss [FOLDER]

Two files of SD 1.5's exact layout (1,131 tensors, 2.1 GB each) are written tensor by tensor with
seeded random fp16 values (the model is built on the meta device, so no model is ever in memory),
merged in a fresh process (weighted sum, then add difference with A as the third file), and the
peak resident set size of that process (VmHWM) printed beside the one of a process that only
imports the same modules. The files are deleted afterwards. FOLDER (default: a
new temporary folder) needs about 6 GB free.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MERGE = (
    """
import sys
from pathlib import Path
from ldm_cli.checkpoint_tools.merge import MergeJob, run_merge
a, b, out = map(Path, sys.argv[1:4])
c = Path(sys.argv[4]) if len(sys.argv) > 4 else None
run_merge(MergeJob(a, b, out, 0.3, c))
"""
    + "print(open('/proc/self/status').read())"
)
_IMPORT_ONLY = (
    "import ldm_cli.checkpoint_tools.merge, ldm_cli.checkpoints.detect, torch\n"
    "print(open('/proc/self/status').read())"
)


def write_full_size(path: Path, seed: int) -> Path:
    import torch

    from ldm_cli.checkpoint_tools.stream_writer import DTYPE_NAMES, OutTensor, write_streaming
    from ldm_cli.core.config import SD15
    from ldm_cli.models.loading import build_empty

    state = build_empty(SD15).state_dict()  # meta tensors: names and shapes only
    gen = torch.Generator().manual_seed(seed)

    def maker(shape, dtype):
        def make():
            if not dtype.is_floating_point:
                return torch.zeros(shape, dtype=dtype)
            return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)

        return make

    tensors = {}
    for key, meta in state.items():
        dtype = torch.float16 if meta.is_floating_point() else meta.dtype
        tensors[key] = OutTensor(DTYPE_NAMES[dtype], tuple(meta.shape), maker(meta.shape, dtype))
    return write_streaming(path, tensors, {})


def peak_rss_mib(code: str, *args: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a fresh Python process running `code`: its VmHWM, the
    high-water mark of its own memory (ru_maxrss would start from this process's size, which
    Linux carries over a fork and exec)."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True
    )
    peak = re.search(r"^VmHWM:\s+(\d+) kB", proc.stdout, re.M)
    return int(peak.group(1)) / 1024, time.perf_counter() - start


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ldm-rss-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        a = write_full_size(root / "a.safetensors", 1)
        b = write_full_size(root / "b.safetensors", 2)
        size = a.stat().st_size / 2**30
        base, _ = peak_rss_mib(_IMPORT_ONLY)
        summed, t1 = peak_rss_mib(_MERGE, a, b, root / "sum.safetensors")
        (root / "sum.safetensors").unlink()
        diff, t2 = peak_rss_mib(_MERGE, a, b, root / "diff.safetensors", a)
        print(f"inputs: 2 x {size:.2f} GiB (SD 1.5 layout, fp16)")
        print(f"python + torch + ldm imported: peak RSS {base:.0f} MiB")
        print(f"weighted sum:   peak RSS {summed:.0f} MiB ({t1:.0f} s)")
        print(f"add difference: peak RSS {diff:.0f} MiB ({t2:.0f} s)")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"writing the inputs tensor by tensor: peak RSS {own:.0f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
