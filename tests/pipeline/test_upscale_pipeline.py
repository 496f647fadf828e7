"""`Pipeline.upscale` against diffusers' StableDiffusionUpscalePipeline on the same seeded random
tiny x4 checkpoint, and tiled upscaling (one tile equals no tiling; several blend smoothly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_cli.core.config import TINY_X4
from ldm_cli.core.errors import UserError
from ldm_cli.core.image_inputs import to_pixels
from ldm_cli.core.tiling import Blender, Tile, tile_grid, tile_starts
from ldm_cli.pipeline.load import load
from ldm_cli.pipeline.request import Request
from ldm_cli.pipeline.tasks.upscale import (
    UpscaleOptions,
    decode_pixels,
    noise_augment,
    sample_latents,
    upscale_pixels,
)
from ldm_cli.testing import random_checkpoint
from tests.image_helpers import photo
from tests.reference_configs import diffusers_unet_config, diffusers_vae_config

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SEED = 31
STEPS = 8
CFG = 7.5
# Float pixels in [0, 1] after the same steps on the same weights.
PIXEL_ATOL = 1e-5
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(
        TINY_X4, tmp_path_factory.mktemp("x4") / "tiny-x4.safetensors", seed=21
    )


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load(checkpoint, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def theirs(checkpoint, reference_dir):
    """diffusers' pipeline around the same weights, with the real x4 scheduler configs."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    unet_config = diffusers_unet_config(TINY_X4.unet)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = diffusers_vae_config(TINY_X4.vae)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    ref = Path(reference_dir) / "x4-upscaler"
    scheduler_config = json.loads((ref / "scheduler" / "scheduler_config.json").read_text())
    low_res_config = json.loads((ref / "low_res_scheduler" / "scheduler_config.json").read_text())
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae.eval(),
        text_encoder=None,
        tokenizer=None,
        unet=unet.eval(),
        low_res_scheduler=diffusers.DDPMScheduler.from_config(low_res_config),
        scheduler=diffusers.DDIMScheduler.from_config(scheduler_config),
        max_noise_level=350,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def reference_pixels(pipe, ours, sampler: str, noise_level: int, image) -> np.ndarray:
    cls_name, kwargs = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(
        pipe.original_scheduler_config, **kwargs
    )
    return pipe(
        image=image,
        prompt_embeds=ours.encode_prompts([PROMPT]),
        negative_prompt_embeds=ours.encode_prompts([NEGATIVE]),
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        noise_level=noise_level,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]


def request(sampler: str, width: int, height: int, seed: int = SEED) -> Request:
    return Request(PROMPT, NEGATIVE, STEPS, CFG, seed, sampler, "auto", width, height)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("noise_level", [20, 150])
def test_matches_stable_diffusion_upscale_pipeline(ours, theirs, sampler, noise_level):
    low_res = photo("chelsea", 16)
    expected = reference_pixels(theirs, ours, sampler, noise_level, low_res)
    req = request(sampler, 64, 64)
    cond, uncond = ours.conditioning([req])
    options = UpscaleOptions(noise_level, tile_size=0)
    got = upscale_pixels(ours, to_pixels([low_res]), req, cond, uncond, options)
    got = got.permute(1, 2, 0).numpy()
    diff = np.abs(got - expected).max()
    print(f"{sampler}, noise level {noise_level}: max abs pixel diff {diff:.3g}")
    assert got.shape == expected.shape == (64, 64, 3)
    assert got.std() > 0.02  # not a flat image
    assert diff <= PIXEL_ATOL

    # the public API: same image once rounded to 8 bits
    (image,) = ours.upscale(
        low_res,
        PROMPT,
        NEGATIVE,
        noise_level=noise_level,
        steps=STEPS,
        cfg=CFG,
        seed=SEED,
        sampler=sampler,
    )
    rounded = (expected * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(image).astype(int) - rounded).max() <= 1
    assert f"Noise level: {noise_level}" in image.info["parameters"]


def test_one_tile_equals_no_tiling(ours):
    low_res = photo("coffee", 16)
    whole = ours.upscale(low_res, PROMPT, steps=4, seed=3, sampler="euler_a", tile_size=0)
    tiled = ours.upscale(low_res, PROMPT, steps=4, seed=3, sampler="euler_a", tile_size=16)
    assert np.array_equal(np.asarray(whole[0]), np.asarray(tiled[0]))
    assert "Tile size" not in tiled[0].info["parameters"]


def test_tiles_are_the_crops_upscaled_alone_and_blend_across_overlaps(ours):
    low_res = photo("astronaut", 40, 24)
    options = UpscaleOptions(20, tile_size=16, tile_overlap=4)
    req = request("ddim", 160, 96, seed=5)
    cond, uncond = ours.conditioning([req])
    pixels = to_pixels([low_res])
    tiled = upscale_pixels(ours, pixels, req, cond, uncond, options)
    assert tiled.shape == (3, 96, 160)
    tiles = tile_grid(40, 24, 16, 4)
    assert len(tiles) == 3 * 2

    # the same draws as upscale_pixels: the image's noise, then the latents' noise
    gen = torch.Generator().manual_seed(5)
    image_noise = torch.randn(pixels.shape, generator=gen)
    latent_noise = torch.randn((1, 4, 24, 40), generator=gen)
    noised = noise_augment(pixels, image_noise, 20)
    alone = []
    for tile in tiles:
        left, top, right, bottom = tile.box
        latents = sample_latents(
            ours,
            cond,
            uncond,
            noised[..., top:bottom, left:right],
            latent_noise[..., top:bottom, left:right],
            20,
            gen,
            req,
        )
        alone.append(decode_pixels(ours, latents)[0])
    # tiles are row-major: 3 columns (x = 0, 12, 24) in 2 rows (y = 0, 8)
    assert [(t.left, t.top) for t in tiles] == [(0, 0), (12, 0), (24, 0), (0, 8), (12, 8), (24, 8)]
    # where a tile is alone, the result is that tile's (output pixels: 4x)
    first = tiles[0]
    exclusive_right = tiles[1].left * 4
    exclusive_bottom = tiles[3].top * 4
    torch.testing.assert_close(
        tiled[:, :exclusive_bottom, :exclusive_right],
        alone[0][:, :exclusive_bottom, :exclusive_right],
        rtol=0,
        atol=1e-6,
    )
    # across the overlap of the first two tiles the result moves from one to the other
    left, right = tiles[1].left * 4, first.box[2] * 4
    rows = slice(0, exclusive_bottom)
    a = alone[0][:, rows, left:right]
    b = alone[1][:, rows, : right - left]
    blend = tiled[:, rows, left:right]
    t = (blend - a) / (b - a)
    usable = (b - a).abs() > 0.05
    share = torch.stack([t[..., i][usable[..., i]].median() for i in range(right - left)])
    assert share[0] < 0.1 and share[-1] > 0.9
    assert (share.diff() > -0.02).all()  # rises monotonically across the overlap


def test_blender_ramps_between_constant_tiles():
    blender = Blender(1, width=24, height=8, scale=4, overlap=4)
    left_tile, right_tile = Tile(0, 0, 16, 8), Tile(8, 0, 16, 8)
    blender.add(left_tile, torch.zeros(1, 32, 64))
    blender.add(right_tile, torch.ones(1, 32, 64))
    row = blender.result()[0, 0]
    assert (row[:32] == 0).all() and (row[64:] == 1).all()  # untouched outside the overlap
    ramp = row[32:64]
    assert (ramp.diff() >= 0).all() and ramp.diff().max() <= 1 / 16 + 1e-6  # no seam


@pytest.mark.parametrize("length", [8, 16, 17, 40, 100, 241, 1000])
def test_tile_starts_cover_with_the_overlap(length):
    tile, overlap = 16, 4
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + size - b >= overlap


def test_bad_inputs_are_one_line_errors(ours, tmp_path):
    with pytest.raises(UserError, match="noise level must be between 0 and 350"):
        ours.upscale(photo(width=16), noise_level=351, steps=1)
    with pytest.raises(UserError, match="--tile-size must be 0 .*or a multiple of 4"):
        ours.upscale(photo(width=16), tile_size=6, steps=1)
    with pytest.raises(UserError, match="--tile-overlap"):
        ours.upscale(photo(width=16), tile_size=8, tile_overlap=4, steps=1)
    sd1 = load(random_checkpoint(_tiny_sd1(), tmp_path / "sd1.safetensors"), dtype="fp32")
    with pytest.raises(UserError, match="sd1.safetensors is not an x4 upscaler checkpoint"):
        sd1.upscale(photo(width=16), steps=1)
    with pytest.raises(UserError, match="is an x4 upscaler checkpoint: use `ldm upscale`"):
        ours.generate("a cat", steps=1, width=64, height=64)


def _tiny_sd1():
    from ldm_cli.core.config import TINY_SD1

    return TINY_SD1
