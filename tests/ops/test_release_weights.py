"""Weights a run will not use again are given back: only their own pages, the rest of a shared
memory map untouched, and a pipeline refuses to use a released part; the last batch's image is
the image of a run that keeps everything."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.core.config import SD15, TINY_SD1, VAEConfig
from ldm_cli.ops.release_weights import decode_room, discard_pages, owns_its_bytes, release_module
from ldm_cli.pipeline.request import Request
from ldm_cli.testing import random_checkpoint

linux = pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_DONTNEED) is Linux's")
PAGE = mmap.PAGESIZE


def arena_tensors(sizes: list[int]) -> tuple[mmap.mmap, list[torch.Tensor]]:
    """Tensors of `sizes` floats back to back in one anonymous map, as converted_load lays out."""
    arena = mmap.mmap(-1, sum(sizes) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    out, offset = [], 0
    for n in sizes:
        t = torch.frombuffer(arena, dtype=torch.float32, count=n, offset=offset)
        t.fill_(1.0)
        out.append(t)
        offset += n * 4
    return arena, out


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@linux
def test_discard_drops_only_the_whole_pages_of_the_tensor():
    # the first tensor ends mid-page, so the page it shares with the second must stay
    first, second = 3 * PAGE // 4 + 100, 2 * PAGE // 4
    _arena, (a, b) = arena_tensors([first, second])
    dropped = discard_pages(a)
    begin, end = a.data_ptr(), a.data_ptr() + first * 4
    assert dropped == end // PAGE * PAGE - (-(-begin // PAGE) * PAGE) > 0
    zeros = int((a == 0).sum())
    assert zeros * 4 == dropped  # the dropped pages read back as fresh zero pages
    assert bool((a[-1] == 1.0).item()) and bool((b == 1.0).all())


@linux
def test_discard_gives_the_memory_back():
    _arena, (big,) = arena_tensors([64 << 20])  # 256 MiB
    before = resident_bytes()
    assert discard_pages(big) >= (256 << 20) - 2 * PAGE
    assert before - resident_bytes() > 200 << 20


def test_release_module_leaves_it_on_meta_and_skips_what_it_cannot_free():
    layer = torch.nn.Linear(64, 64)
    release_module(layer)
    assert layer.weight.is_meta and layer.bias.is_meta
    assert release_module(torch.nn.Linear(4, 4).to("meta")) == 0


@linux
def test_release_with_room_frees_the_largest_tensors_until_there_is_room():
    module = torch.nn.Module()
    arena, tensors = arena_tensors([(4 << 20) + 7, 1 << 20, (8 << 20) + 3, 1 << 20])
    for i, t in enumerate(tensors):
        module.register_buffer(f"t{i}", t)
    freed = release_module(module, room=40 << 20)  # the 32 MiB tensor, then the 16 MiB one
    assert 48 << 20 > freed >= (48 << 20) - 4 * PAGE
    assert all(bool((tensors[i][PAGE:-PAGE] == 0).all()) for i in (0, 2))
    assert bool((tensors[1] == 1).all()) and bool((tensors[3] == 1).all())  # still resident
    assert all(b.is_meta for b in module.buffers())
    del arena


def test_reused_tensors_go_to_the_allocator_and_the_rest_are_held_by_the_module():
    module = torch.nn.Module()
    sizes = [4 << 20, 1 << 20, 8 << 20, 1 << 20]
    for i, n in enumerate(sizes):
        module.register_buffer(f"t{i}", torch.ones(n))
    kept = [module.t1, module.t3]
    assert all(owns_its_bytes(t) for t in module.buffers())
    freed = release_module(module, room=40 << 20, reuse=True)  # 32 MiB, then 16 MiB
    assert freed == 48 << 20
    assert all(b.is_meta for b in module.buffers())
    held = module._held_until_exit
    assert len(held) == 2 and all(any(h is k for h in held) for k in kept)


@linux
def test_reuse_frees_owned_tensors_before_larger_views():
    module = torch.nn.Module()
    _arena, (view,) = arena_tensors([16 << 20])  # 64 MiB, a view of a memory map
    module.register_buffer("view", view)
    module.register_buffer("owned", torch.ones(4 << 20))  # 16 MiB of its own
    assert release_module(module, room=16 << 20, reuse=True) == 16 << 20
    assert bool((view == 1).all())  # not dropped: the owned tensor made the room
    held = module._held_until_exit
    assert len(held) == 1 and held[0] is view


def test_views_and_shared_storages_are_not_owned():
    base = torch.ones(64)
    assert owns_its_bytes(base)
    assert not owns_its_bytes(base[:32])  # a view: the storage outlives it
    _arena, (mapped,) = arena_tensors([1024])
    assert not owns_its_bytes(mapped)  # a memory map's bytes: only madvise frees them
    assert not owns_its_bytes(torch.ones(4, device="meta"))


# Converts a 4 x 64 MiB "U-Net" from an fp16 file, releases it with room for two of its
# tensors and prints the page faults of then using two 32 MiB activations (as SD 1.5's
# 256x256 decode, whose largest is 32 MiB, after a U-Net whose largest weights are 59 MiB).
REUSE_PROBE = """
import resource, sys
from ldm_cli.ops.allocator import keep_freed_memory
assert keep_freed_memory()
import torch
from ldm_cli.checkpoints.file import read_header
from ldm_cli.ops.converted_load import read_converted
from ldm_cli.models.loading import TORCH_DTYPES
from ldm_cli.ops.release_weights import release_module
header = read_header(sys.argv[1])
wanted = {k: (TORCH_DTYPES[i.dtype], i.shape, i.offset) for k, i in header.tensors.items()}
module = torch.nn.Module()
for key, t in read_converted(header.path, wanted, torch.float32).items():
    module.register_buffer(key, t)
release_module(module, room=128 << 20, reuse=True)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
activations = [torch.empty(8 << 20).fill_(1.0) for _ in range(2)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@linux
def test_a_released_converted_model_makes_room_without_page_faults(tmp_path):
    import subprocess

    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"  # written here, so that the probe's heap starts unused
    save_file({f"w{i}": torch.full((16 << 20,), i, dtype=torch.float16) for i in range(4)}, path)
    out = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE, str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # 64 MiB of fresh pages would be 16,384 faults
    assert int(out.stdout.split()[-1]) < 1000


def test_decode_room_is_a_multiple_of_the_decoders_largest_activation():
    # SD 1.5: the top level's input is the 256 channels of the level below, at full size
    latents = torch.Size([2, 4, 32, 32])
    assert decode_room(SD15.vae, latents, 8, 4) == 8 * 2 * 256 * 256 * 256 * 4
    small = VAEConfig(ch=24, ch_mult=(1, 2, 4))
    assert decode_room(small, torch.Size([1, 4, 16, 16]), 4, 2) == 8 * 48 * 64 * 64 * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=3)


def test_last_batch_releases_text_encoder_and_unet_and_renders_the_same(tiny):
    req = Request("a red circle", "", steps=3, cfg=5.0, seed=7, width=64, height=64)
    keep = ldm_cli.load(tiny, device="cpu")
    expected = np.asarray(next(keep.render([req]))[1])
    pipe = ldm_cli.load(tiny, device="cpu")
    image = np.asarray(next(pipe.render([req], last=True))[1])
    np.testing.assert_array_equal(image, expected)
    assert pipe.released == {"text_encoder", "unet"}
    assert all(p.is_meta for p in pipe.model.unet.parameters())
    assert all(p.is_meta for p in pipe.model.text_encoder.parameters())
    assert not any(p.is_meta for p in pipe.vae.parameters())
    with pytest.raises(RuntimeError, match="text_encoder was released"):
        next(pipe.render([req]))
    assert keep.released == set()
    with pytest.raises(ValueError, match="cannot release 'vae'"):
        keep.release("vae")
    assert keep.released == set()


def _photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((64, 64))


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_image_modes_release_only_during_their_last_batch(tiny, mode):
    from PIL import Image

    from ldm_cli.pipeline.tasks.img2img import iter_img2img
    from ldm_cli.pipeline.tasks.inpaint import InpaintOptions, iter_inpaint

    base = Request("a red circle", "", steps=3, cfg=5.0, seed=7)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def run(pipe, release):
        if mode == "img2img":
            pairs = iter_img2img(pipe, _photo(), base, strength=0.6, num_images=3,
                                 batch_size=2, release=release)  # fmt: skip
        else:
            pairs = iter_inpaint(pipe, _photo(), mask, base, InpaintOptions(0.8, 0),
                                 num_images=3, batch_size=2, release=release)  # fmt: skip
        return [np.asarray(image) for _, image in pairs]

    expected = run(ldm_cli.load(tiny, device="cpu"), release=False)
    pipe = ldm_cli.load(tiny, device="cpu")
    images = run(pipe, release=True)  # batches of 2 and 1: only the second may release
    for image, want in zip(images, expected, strict=True):
        np.testing.assert_array_equal(image, want)
    assert pipe.released == {"text_encoder", "unet"}
