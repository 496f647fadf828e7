"""img2img, input images of any size and mode, and the hires fix, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import as_mask, as_rgb, load_image, size_notice, to_pixels
from ldm_cli.core.pngmeta import parse_parameters
from ldm_cli.pipeline.image_start import first_step
from ldm_cli.pipeline.latents import encode_latents
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.tasks.hires import HiresFix, hires_from_parameters
from ldm_cli.testing import random_checkpoint
from tests.image_helpers import PHOTOS, TINY_INPAINT, photo

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=8)
    return load(path, device="cpu", dtype="fp32")


def unet_calls(pipe, run) -> int:
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@pytest.mark.parametrize("name", PHOTOS)
def test_strength_zero_is_exactly_the_vae_round_trip(pipe, name):
    image = photo(name)
    (got,) = pipe.img2img(image, "a cat", strength=0.0, steps=10, seed=5)
    gen = torch.Generator("cpu").manual_seed(5)
    (round_trip,) = pipe.decode(encode_latents(pipe, to_pixels([image]), [gen]))
    assert np.array_equal(np.asarray(got), np.asarray(round_trip))
    assert unet_calls(pipe, lambda: pipe.img2img(image, "a cat", strength=0.0, steps=10)) == 0


def test_strength_one_is_plain_generation(pipe):
    settings = dict(steps=4, cfg=7.5, seed=3, sampler="euler_a")
    (generated,) = pipe.generate("a red circle", width=64, height=64, **settings)
    (redrawn,) = pipe.img2img(photo("coffee"), "a red circle", strength=1.0, **settings)
    assert np.array_equal(np.asarray(generated), np.asarray(redrawn))


@pytest.mark.parametrize(
    "steps, strength, skipped", [(10, 0.75, 3), (10, 0.0, 10), (10, 1.0, 0), (30, 0.5, 15)]
)
def test_first_step_follows_diffusers(steps, strength, skipped):
    assert first_step(steps, strength) == skipped


def test_strength_runs_the_tail_of_the_schedule(pipe):
    image = photo("chelsea")
    run = lambda: pipe.img2img(image, "a cat", strength=0.5, steps=10, sampler="euler", cfg=1)  # noqa: E731
    assert unet_calls(pipe, run) == 5


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "heun", "unipc", "ddim"])
def test_img2img_runs_with_any_sampler_and_records_strength(pipe, sampler):
    (image,) = pipe.img2img(photo("astronaut"), "a cat", strength=0.6, steps=4, sampler=sampler)
    assert image.size == (64, 64)
    assert parse_parameters(image.info["parameters"]).extra["Denoising strength"] == "0.6"


def test_img2img_batches_like_single_images(pipe):
    settings = dict(strength=0.7, steps=4, seed=11, sampler="euler_a", num_images=2)
    one = pipe.img2img(photo("coffee"), "a cup", batch_size=1, **settings)
    two = pipe.img2img(photo("coffee"), "a cup", batch_size=2, **settings)
    for a, b in zip(one, two, strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert "Seed: 12," in one[1].info["parameters"]


def _odd_inputs() -> dict[str, Image.Image]:
    base = photo("chelsea", 61, 45)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    return {
        "rgb-61x45": base,
        "rgba": rgba,
        "grayscale": base.convert("L"),
        "palette": base.convert("P", palette=Image.Palette.ADAPTIVE),
        "la": base.convert("LA"),
        "16-bit": Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257),
        "cmyk": base.convert("CMYK"),
    }


@pytest.mark.parametrize("kind", list(_odd_inputs()))
def test_inputs_of_any_mode_and_odd_size(pipe, kind):
    image = _odd_inputs()[kind]
    notices = []
    from ldm_cli.pipeline.tasks.img2img import base_request, iter_img2img

    pairs = iter_img2img(
        pipe, image, base_request("a cat", steps=2), strength=0.5, notice=notices.append
    )
    ((req, result),) = list(pairs)
    assert result.size == (61, 45) and result.mode == "RGB"
    assert (req.width, req.height) == (64, 48)  # padded to the size multiple, 4
    assert "Size: 61x45," in result.info["parameters"]  # the image's, not the padded one
    assert notices == [size_notice(61, 45, 4)]
    assert "61x45" in notices[0] and "64x48" in notices[0]


def test_mode_conversions():
    clear = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert as_rgb(clear).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    half = Image.new("LA", (4, 4), (0, 128))
    assert as_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    wide = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert as_rgb(wide).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([200, 10, 10] + [0] * 765)
    palette.info["transparency"] = 0
    assert as_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    stroke = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    stroke.putpixel((1, 1), (255, 255, 255, 255))
    mask = as_mask(stroke)  # transparent = keep
    assert mask.getpixel((0, 0)) == 0 and mask.getpixel((1, 1)) == 255


def test_missing_and_unreadable_images_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found") as missing:
        load_image(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image") as unreadable:
        load_image(junk)
    for error in (missing, unreadable):
        assert "\n" not in str(error.value)


def test_bad_strength_is_a_user_error(pipe):
    with pytest.raises(UserError, match="between 0 and 1"):
        pipe.img2img(photo(), "x", strength=1.5)


def test_the_hires_settings_are_public_at_the_top_level():
    import ldm_cli

    assert ldm_cli.HiresFix is HiresFix and "HiresFix" in ldm_cli.__all__


def test_hires_fix_doubles_the_size_and_records_a1111_keys(pipe):
    hires = HiresFix(scale=2, strength=0.5, steps=3)
    (image,) = pipe.generate("a cat", steps=2, seed=4, width=64, height=48, hires=hires)
    assert image.size == (128, 96)
    params = parse_parameters(image.info["parameters"])
    assert (params.width, params.height) == (64, 48)  # the first pass, as A1111 records it
    assert params.extra == {
        "Denoising strength": "0.5",
        "Hires upscale": "2",
        "Hires steps": "3",
        "Hires upscaler": "ldm-sr",
    }
    assert hires_from_parameters(params.extra) == hires


def test_hires_upscalers_lanczos_and_a_file(pipe, tmp_path, capsys):
    from ldm_cli.models.sr_compact import CompactShape
    from tests.sr_helpers import write_compact

    mine = write_compact(tmp_path / "2x-Mine.safetensors", CompactShape(2, 8, 1))
    images = {}
    for upscaler, name in [("lanczos", "Lanczos"), (str(mine), "2x-Mine"), ("ldm-sr", "ldm-sr")]:
        hires = HiresFix(scale=2, strength=0.3, steps=2, upscaler=upscaler)
        (image,) = pipe.generate("a cat", steps=2, seed=4, width=64, height=48, hires=hires)
        extra = parse_parameters(image.info["parameters"]).extra
        assert extra["Hires upscaler"] == name
        images[name] = np.asarray(image, dtype=int)
        if name != "2x-Mine":
            assert hires_from_parameters(extra) == hires
    assert all(
        np.abs(images[a] - images[b]).max() > 0
        for a, b in [("Lanczos", "ldm-sr"), ("ldm-sr", "2x-Mine")]
    )
    unknown = {"Hires upscale": "2", "Hires upscaler": "4x-UltraSharp"}
    assert hires_from_parameters(unknown).upscaler == "ldm-sr"
    assert "'4x-UltraSharp' is not known here" in capsys.readouterr().err
    assert hires_from_parameters({"Hires upscale": "2"}).upscaler == "Lanczos"  # before ldm-sr
    with pytest.raises(UserError, match="--hires-upscaler must be ldm-sr, Lanczos or an upscaler"):
        HiresFix(upscaler=str(tmp_path / "absent.pth"))


def test_hires_second_pass_runs_strength_times_steps(pipe):
    hires = HiresFix(scale=1.5, strength=0.5, steps=6)
    run = lambda: pipe.generate("a cat", steps=2, cfg=1, sampler="euler", hires=hires)  # noqa: E731
    assert unet_calls(pipe, run) == 2 + 3


def test_inpainting_checkpoint_generates_and_redraws(tmp_path):
    """txt2img and img2img with a 9-channel model: an all-white mask over a gray image."""
    path = random_checkpoint(TINY_INPAINT, tmp_path / "inpaint.safetensors", seed=1)
    pipe = load(path, device="cpu", dtype="fp32")
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        (generated,) = pipe.generate("a cat", steps=2, seed=1)
        (redrawn,) = pipe.img2img(photo(), "a cat", strength=0.5, steps=4, seed=1)
    finally:
        handle.remove()
    assert generated.size == redrawn.size == (64, 64)
    assert all(shape[1] == 9 for shape in shapes)
