"""Feed-forward upscalers (ldm_cli.pipeline.tasks.image_upscaler): files of the ESRGAN family
give the pixels
spandrel's own model gives, read safely; tiles blend to the untiled result; scales beyond the
network's are reached in passes."""

from __future__ import annotations

import numpy as np
import pytest
import spandrel
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact

from ldm_cli.checkpoints.pickled import allow_pickle
from ldm_cli.core.errors import UserError
from ldm_cli.models.sr_compact import CompactShape, SRVGGCompact, compact_shape
from ldm_cli.pipeline.tasks.image_upscaler import (
    load_upscaler,
    parameters_text,
    passes_for,
    to_image,
    to_tensor,
    upscale_image,
)
from tests.image_helpers import photo
from tests.sr_helpers import compact_state, rrdb_state, write_compact


def spandrel_pixels(path, image: Image.Image) -> np.ndarray:
    """What spandrel's own loader and model make of `image`, rounded as ldm rounds."""
    descriptor = spandrel.ModelLoader("cpu").load_from_file(str(path))
    with torch.inference_mode():
        out = descriptor(to_tensor(image))[0]
    return np.asarray(to_image(out))


def test_the_compact_module_is_spandrels():
    shape = CompactShape(scale=4, features=16, convs=3)
    state = compact_state(shape, seed=1)
    ours, theirs = SRVGGCompact(shape), Compact(num_feat=16, num_conv=3, upscale=4)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert compact_shape(state) == shape


@pytest.mark.parametrize("scale", [2, 4])
def test_a_compact_file_gives_spandrels_pixels(tmp_path, scale):
    path = write_compact(tmp_path / f"realesr-x{scale}.safetensors", CompactShape(scale, 16, 3), 2)
    image = photo("astronaut", 40, 32)
    upscaler = load_upscaler(path)
    assert (upscaler.scale, upscaler.name) == (scale, f"realesr-x{scale}")
    ours = upscaler.upscale(image, tile_size=0)
    assert ours.size == (40 * scale, 32 * scale)
    assert np.array_equal(np.asarray(ours), spandrel_pixels(path, image))


@pytest.mark.slow
def test_the_realesrgan_x4plus_layout_gives_spandrels_pixels(tmp_path):
    """RRDBNet at RealESRGAN_x4plus's full size (23 blocks, 16.7 M parameters), as its .pth
    holds it ({"params_ema": ...}, read with --allow-pickle) and as .safetensors."""
    state = rrdb_state(seed=3)
    assert sum(v.numel() for v in state.values()) == 16_697_987
    pth = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": state}, pth)
    st = tmp_path / "RealESRGAN_x4plus.safetensors"
    save_file(state, str(st))
    image = photo("coffee", 24, 20)
    expected = spandrel_pixels(pth, image)
    with allow_pickle():
        from_pth = load_upscaler(pth)
    assert (from_pth.scale, from_pth.name) == (4, "RealESRGAN_x4plus")
    assert np.array_equal(np.asarray(from_pth.upscale(image, tile_size=0)), expected)
    assert np.array_equal(np.asarray(load_upscaler(st).upscale(image, tile_size=0)), expected)


def test_a_small_rrdbnet_tiles_as_one_image(tmp_path):
    """An ESRGAN-family file run in tiles: what spandrel gives on the whole image, to within the
    feathered seams."""
    path = tmp_path / "rrdb.safetensors"
    save_file(rrdb_state(blocks=1, features=16, seed=5), str(path))
    image = photo("chelsea", 48, 40)
    tiled = np.asarray(load_upscaler(path).upscale(image, tile_size=24, overlap=8), dtype=int)
    assert np.abs(tiled - spandrel_pixels(path, image).astype(int)).max() <= 3


def test_a_pth_needs_allow_pickle_and_runs_no_code(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"params": compact_state(CompactShape(2, 8, 1), 0)}, path)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_upscaler(path)
    with allow_pickle():
        assert load_upscaler(path).scale == 2

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"params": Evil()}, evil)
    with allow_pickle(), pytest.raises(UserError, match="refused"):
        load_upscaler(evil)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"foo.weight": torch.zeros(3, 3)}, "is not an upscaler spandrel knows"),
        ({"body.0.weight": torch.zeros(8, 3, 3, 3)}, "is not an upscaler spandrel knows"),
    ],
)
def test_other_files_are_one_line_errors(tmp_path, tensors, message):
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=message):
        load_upscaler(path)
    with pytest.raises(UserError, match="not found"):
        load_upscaler(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable"):
        load_upscaler(junk)


def test_tiles_blend_to_the_untiled_result_with_progress(tmp_path):
    upscaler = load_upscaler(write_compact(tmp_path / "c.safetensors", CompactShape(4, 16, 6), 4))
    image = photo("chelsea", 120, 90)
    whole = np.asarray(upscaler.upscale(image, tile_size=0), dtype=int)
    calls = []
    tiled = upscaler.upscale(
        image, tile_size=48, overlap=16, progress=lambda i, n: calls.append((i, n))
    )
    assert tiled.size == (480, 360)
    diff = np.abs(np.asarray(tiled, dtype=int) - whole)
    assert diff.max() <= 2 and diff.mean() < 0.05
    assert calls == [(i, 12) for i in range(1, 13)]  # 4 x 3 tiles


@pytest.mark.parametrize(
    "network, scale, passes, size",
    [(4, None, 1, (96, 64)), (2, 3.0, 2, (72, 48)), (4, 8, 2, (192, 128)), (4, 2.5, 1, (60, 40))],
)
def test_scales_in_passes_then_lanczos(tmp_path, network, scale, passes, size):
    upscaler = load_upscaler(write_compact(tmp_path / "c.safetensors", CompactShape(network, 8, 1)))
    assert passes_for(scale or network, network) == passes
    calls = []
    out = upscale_image(
        upscaler, photo("rocket", 24, 16), scale, 16, 4, lambda i, n: calls.append(n)
    )
    assert out.size == size
    assert len(set(calls)) == 1 and len(calls) == calls[0]  # one bar over every pass's tiles


def test_parameters_name_the_upscaler_and_the_tiling(tmp_path):
    upscaler = load_upscaler(write_compact(tmp_path / "4x-Mine.safetensors", CompactShape(4, 8, 1)))
    text = parameters_text(upscaler, 4, (300, 200), 256, 32)
    assert text == (
        "Postprocess upscale by: 4, Postprocess upscaler: 4x-Mine, Source size: 300x200, "
        "Tile size: 256, Tile overlap: 32"
    )
    assert "Tile" not in parameters_text(upscaler, 2.5, (64, 64), 256, 32)
