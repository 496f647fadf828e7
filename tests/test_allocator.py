"""keep_freed_memory: freed activation-sized blocks are reused instead of faulted in anew."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates and frees a 64 MB tensor 20 times and prints the minor page faults of the last 10.
PROBE = """
import resource, sys
from ldm_cli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    torch.ones(16 * 1024 * 1024).sum()
print(applied, faults() - start)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    import os

    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = probe("keep")
    _, default = probe("default")
    assert applied == "True"
    assert default > 100_000  # each 64 MB block mmapped afresh: ~16,000 pages per round
    assert kept < default / 100


def test_ldm_malloc_default_opts_out():
    applied, _ = probe("keep", LDM_MALLOC="default")
    assert applied == "False"
