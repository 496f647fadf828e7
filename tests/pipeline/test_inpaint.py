"""Inpainting and outpainting: the 9-channel U-Net against diffusers, exact paste-back on real
photos, latent blending for 4-channel models, masks, full-resolution crops."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.core.config import TINY_SD1
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import blur_mask, load_mask, to_pixels
from ldm_cli.core.image_metrics import psnr
from ldm_cli.core.pngmeta import parse_parameters
from ldm_cli.pipeline.image_start import keep_outside_mask
from ldm_cli.pipeline.latents import encode_latents
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.tasks.inpaint_regions import crop_box, extend_canvas
from ldm_cli.testing import random_checkpoint
from tests.image_helpers import PHOTOS, TINY_INPAINT, box_mask, photo

diffusers = pytest.importorskip("diffusers")

from tests.models.test_unet_parity import PARITY_ATOL, build_tiny, tiny_inputs, to_diffusers  # noqa: E402
from tests.reference_configs import diffusers_unet_config  # noqa: E402

MASK_BOX = (20, 12, 44, 40)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = random_checkpoint(TINY_SD1, tmp_path_factory.mktemp("m") / "tiny.safetensors", seed=6)
    return load(path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    path = random_checkpoint(TINY_INPAINT, tmp_path_factory.mktemp("m") / "inp.safetensors", seed=7)
    return load(path, device="cpu", dtype="fp32")


def test_nine_channel_unet_matches_diffusers():
    cfg = replace(TINY_SD1.unet, in_channels=9)
    model = build_tiny(cfg, seed=3)
    reference = to_diffusers(model, diffusers_unet_config(cfg))
    assert reference.config.in_channels == 9
    x, timesteps, context = tiny_inputs(cfg)
    with torch.no_grad():
        ours = model(x, timesteps, context)
        theirs = reference(x, timesteps, encoder_hidden_states=context).sample
    assert ours.shape == theirs.shape == (2, 4, 16, 16)
    assert 0.1 < ours.std() < 10
    assert (ours - theirs).abs().max().item() <= PARITY_ATOL


def outside(alpha: np.ndarray) -> np.ndarray:
    return alpha == 0


@pytest.mark.parametrize("model", ["plain", "nine"])
@pytest.mark.parametrize("name", PHOTOS)
def test_pixels_outside_the_blurred_mask_are_the_input(request, model, name):
    pipe = request.getfixturevalue(model)
    image, mask = photo(name), box_mask(64, 64, MASK_BOX)
    (result,) = pipe.inpaint(image, mask, "a green circle", steps=4, seed=2, mask_blur=4)
    got, original = np.asarray(result), np.asarray(image)
    keep = outside(blur_mask(mask, 4))
    assert keep.sum() > 1000 and (~keep).sum() > 500
    assert psnr(got[keep], original[keep]) >= 40
    assert np.array_equal(got[keep], original[keep])  # in fact exact
    left, top, right, bottom = MASK_BOX
    assert psnr(got[top:bottom, left:right], original[top:bottom, left:right]) < 30  # repainted
    params = parse_parameters(result.info["parameters"])
    assert params.extra == {"Denoising strength": "1", "Mask blur": "4"}


def test_nine_channel_unet_gets_latents_mask_and_masked_image(nine):
    inputs = []
    handle = nine.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        nine.inpaint(photo(), box_mask(64, 64, MASK_BOX), "x", mask_blur=0, steps=2, cfg=7.5)
    finally:
        handle.remove()
    first = inputs[0]
    assert first.shape == (2, 9, 32, 32)  # CFG batch, 4 + 1 + 4 channels at latent size
    expected = np.zeros((32, 32), dtype=np.float32)
    left, top, right, bottom = (v // 2 for v in MASK_BOX)
    expected[top:bottom, left:right] = 1
    for row in first:
        assert np.array_equal(row[4].numpy(), expected)
    assert torch.equal(first[0, 5:], first[1, 5:])
    assert all(torch.equal(x[:, 4:], first[:, 4:]) for x in inputs)  # fixed across steps


def test_latent_blend_keeps_the_image_outside_the_mask():
    latents = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :, :4] = 1
    seen = []

    def model(x, sigma):
        seen.append(x.clone())
        return torch.full_like(x, 7.0)

    x0 = keep_outside_mask(model, latents, noise, keep)(
        torch.zeros(1, 4, 8, 8), torch.tensor([2.0])
    )
    assert torch.equal(x0[..., :4], latents[..., :4]) and (x0[..., 4:] == 7).all()
    assert torch.allclose(seen[0][..., :4], (latents + 2.0 * noise)[..., :4])


def test_four_channel_final_latents_equal_the_image_latents_outside(plain):
    decoded = []
    original_decode = plain.decode
    plain.decode = lambda latents: decoded.append(latents) or original_decode(latents)
    try:
        plain.inpaint(photo(), box_mask(64, 64, (0, 0, 32, 64)), "x", steps=3, seed=9)
    finally:
        plain.decode = original_decode
    gen = torch.Generator("cpu").manual_seed(9)
    image_latents = encode_latents(plain, to_pixels([photo()]), [gen])
    assert torch.equal(decoded[0][..., 16:], image_latents[..., 16:])
    assert not torch.allclose(decoded[0][..., :16], image_latents[..., :16])


def test_mismatched_mask_is_a_one_line_error_naming_both_sizes(plain):
    with pytest.raises(UserError) as error:
        plain.inpaint(photo(), box_mask(32, 48, (0, 0, 8, 8)), "x", steps=2)
    message = str(error.value)
    assert "32x48" in message and "64x64" in message and "\n" not in message


def test_empty_mask_is_a_user_error(plain):
    with pytest.raises(UserError, match="empty"):
        plain.inpaint(photo(), box_mask(64, 64, (0, 0, 0, 0)), "x", steps=2)


def test_odd_sized_rgba_image_with_palette_mask(plain):
    image = photo("coffee", 57, 42).convert("RGBA")
    mask = box_mask(57, 42, (10, 10, 30, 30)).convert("P")
    (result,) = plain.inpaint(image, mask, "x", steps=2, seed=1, mask_blur=2)
    assert result.size == (57, 42)
    keep = outside(blur_mask(load_mask(mask, image.convert("RGB")), 2))
    original = np.asarray(image.convert("RGB"))
    assert np.array_equal(np.asarray(result)[keep], original[keep])


def test_full_res_works_on_a_crop_at_the_working_size(plain):
    image = photo("astronaut", 96, 80)
    mask = box_mask(96, 80, (60, 50, 70, 58))
    shapes = []
    handle = plain.unet.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        (result,) = plain.inpaint(
            image,
            mask,
            "x",
            steps=2,
            seed=1,
            full_res=True,
            full_res_padding=8,
            width=32,
            height=32,
        )
    finally:
        handle.remove()
    assert result.size == (96, 80)
    assert {tuple(s[-2:]) for s in shapes} == {(16, 16)}  # 32x32 pixels -> 16x16 latents
    keep = outside(blur_mask(mask, 4))
    assert np.array_equal(np.asarray(result)[keep], np.asarray(image)[keep])
    params = parse_parameters(result.info["parameters"]).extra
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "8"


def test_crop_box_pads_and_matches_the_working_aspect():
    alpha = np.zeros((100, 200), dtype=np.float32)
    alpha[40:50, 100:120] = 1
    assert crop_box(alpha, 5, 64, 64) == (95, 30, 125, 60)  # 30x20 padded box -> 30x30
    assert crop_box(alpha, 0, 128, 64) == (100, 40, 120, 50)  # already 2:1
    left, top, right, bottom = crop_box(alpha, 80, 64, 64)  # clamped to the image
    assert (left, top, right, bottom) == (20, 0, 200, 100)


def test_outpaint_grows_the_canvas_and_keeps_the_original(plain):
    image = photo("chelsea", 48, 40)
    (result,) = plain.outpaint(image, "a cat", right=16, bottom=8, steps=2, seed=3, mask_blur=4)
    assert result.size == (64, 48)
    _, mask = extend_canvas(image, 0, 16, 0, 8)
    keep = outside(blur_mask(mask, 4))
    assert keep[:40, :48].sum() > 1000 and not keep[40:, :].any()
    assert np.array_equal(np.asarray(result)[keep], np.asarray(image)[keep[:40, :48]])
    assert "Outpaint: right 16 bottom 8" in result.info["parameters"]


def test_extend_canvas_repeats_edges_and_refuses_no_growth():
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    canvas, mask = extend_canvas(image, 1, 0, 0, 1)
    pixels = np.asarray(canvas)
    assert canvas.size == (3, 3) and np.array_equal(pixels[:2, 1:], np.asarray(image))
    assert np.array_equal(pixels[:, 0], pixels[:, 1]) and np.array_equal(pixels[2], pixels[1])
    assert np.array_equal(np.asarray(mask) > 0, [[1, 0, 0], [1, 0, 0], [1, 1, 1]])
    with pytest.raises(UserError, match="at least one"):
        extend_canvas(image, 0, 0, 0, 0)


def test_partial_strength_starts_from_the_image(nine, plain):
    for pipe in (nine, plain):
        (result,) = pipe.inpaint(photo(), box_mask(64, 64, MASK_BOX), "x", strength=0.5, steps=4)
        assert result.size == (64, 64)
