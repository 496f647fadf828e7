"""A weight read in place from its file gives up its resident pages once a copy replaces it,
keeping its values; written weights and anonymous memory are never touched."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_cli.models.unet_blocks import Upsample
from ldm_cli.ops import upsample_conv
from ldm_cli.ops.file_pages import drop_file_pages, file_mapped

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps is Linux's")


def rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@pytest.fixture
def mapped(tmp_path):
    """Tensors viewing a safetensors file's private memory map, as a model loads them."""
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(64, 64, 3, 3, 16, generator=g), "small": torch.ones(8)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), "pt") as f:
        yield {k: f.get_tensor(k) for k in tensors}, tensors


def test_a_file_view_drops_its_pages_and_keeps_its_values(mapped):
    views, originals = mapped
    big = views["big"]
    assert torch.equal(big, originals["big"])  # read: its pages are mapped now
    before = rss_file_kb()
    dropped = drop_file_pages(big)
    assert dropped > 2 << 20
    assert before - rss_file_kb() > 1 << 10  # kB
    assert torch.equal(big, originals["big"])  # read again from the file


def test_written_anonymous_and_owned_tensors_are_left_alone(mapped):
    views, originals = mapped
    patched = views["big"]
    patched.add_(1)  # as a LoRA patch: version 1, its pages private copies now
    assert drop_file_pages(patched) == 0
    assert torch.equal(patched, originals["big"] + 1)
    anonymous = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    torch.frombuffer(anonymous, dtype=torch.float32).fill_(3.0)
    fresh = torch.frombuffer(anonymous, dtype=torch.float32)  # version 0, but no file
    assert not file_mapped(fresh.data_ptr(), fresh.data_ptr() + 4)
    assert drop_file_pages(fresh) == 0 and bool((fresh == 3.0).all())
    owned = torch.ones(1 << 20)
    assert drop_file_pages(owned) == 0 and bool((owned == 1).all())
    assert drop_file_pages(views["big"][..., 0]) == 0  # not contiguous


def file_weight(views, out: int, inp: int) -> torch.nn.Parameter:
    """A contiguous (out, in, 3, 3) view of the file, as a conv weight loads in place."""
    return torch.nn.Parameter(views["big"].view(-1)[: out * inp * 9].view(out, inp, 3, 3), False)


def spy(monkeypatch, module) -> list[int]:
    dropped = []
    real = module.drop_file_pages
    monkeypatch.setattr(module, "drop_file_pages", lambda t: dropped.append(real(t)) or dropped[-1])
    return dropped


def test_folded_kernels_let_the_file_weight_go(mapped, monkeypatch):
    monkeypatch.setattr(upsample_conv, "MIN_ELEMENTS", 0)
    dropped = spy(monkeypatch, upsample_conv)
    views, originals = mapped
    up = Upsample(256)
    up.conv.weight = file_weight(views, 256, 256)
    expected = originals["big"].view(-1)[: 256 * 256 * 9].view(256, 256, 3, 3)
    x = torch.randn(1, 256, 6, 6)
    with torch.no_grad():
        first = up(x)
        again = up(x)  # from the cached kernels
    assert len(dropped) == 1 and dropped[0] > 2 << 20
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert torch.equal(up.conv.weight, expected)
