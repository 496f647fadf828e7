"""ControlNets in the original and diffusers layouts against diffusers' ControlNetModel, and the
U-Net with their residuals against UNet2DConditionModel, on seeded random weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm_cli.control.files import build_controlnet, read_control_file
from ldm_cli.core.config import TINY_SD1
from ldm_cli.models.unet_blocks import timestep_embedding
from tests.control.controlnet_helpers import (
    diffusers_controlnet,
    random_controlnet,
    save_state,
    to_diffusers,
)
from tests.models.test_unet_parity import (
    TINY_SD2,
    TINY_SDXL,
    TINY_SDXL_TEXT_EMBED_DIM,
    TINY_SDXL_TIME_EMBED_DIM,
    build_tiny,
)
from tests.models.test_unet_parity import to_diffusers as unet_to_diffusers
from tests.reference_configs import diffusers_unet_config

pytest.importorskip("diffusers")

ATOL = 1e-5
CONFIGS = {"sd1": TINY_SD1.unet, "sd2": TINY_SD2, "sdxl": TINY_SDXL}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=gen)
    hint = torch.rand(2, 3, 128, 128, generator=gen)
    timesteps = torch.tensor([999.0, 500.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    ours, theirs = {}, {}
    if cfg.adm_in_channels is not None:
        text_embeds = torch.randn(2, TINY_SDXL_TEXT_EMBED_DIM, generator=gen)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 768]])
        sizes = timestep_embedding(time_ids.flatten(), TINY_SDXL_TIME_EMBED_DIM).reshape(2, -1)
        ours["y"] = torch.cat([text_embeds, sizes], dim=-1)
        theirs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    return x, hint, timesteps, context, ours, theirs


def reference_residuals(reference, x, hint, timesteps, context, extra, scale=1.0, guess=False):
    with torch.no_grad():
        down, mid = reference(
            x,
            timesteps,
            encoder_hidden_states=context,
            controlnet_cond=hint,
            conditioning_scale=scale,
            guess_mode=guess,
            return_dict=False,
            **extra,
        )
    return [*down, mid]


def assert_residuals_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= ATOL
    assert (
        0.05 < torch.cat([t.flatten() for t in ours]).std() < 20
    )  # O(1): the bound means something


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_matches_diffusers(name, tmp_path):
    """Our module's names are the original file's: diffusers' own single-file conversion of
    them loads strictly into ControlNetModel and gives the same residuals."""
    cfg = CONFIGS[name]
    model = random_controlnet(cfg, seed=3)
    reference = to_diffusers(model, cfg, TINY_SDXL_TIME_EMBED_DIM)
    x, hint, t, context, ours_extra, theirs_extra = inputs(cfg)
    with torch.no_grad():
        ours = model(x, hint, t, context, **ours_extra)
    assert_residuals_equal(ours, reference_residuals(reference, x, hint, t, context, theirs_extra))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("layout", ["diffusers", "original", "original-model-prefix", "pth"])
def test_files_load_in_every_layout(name, layout, tmp_path):
    cfg = CONFIGS[name]
    reference = diffusers_controlnet(cfg, seed=4, addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM)
    if layout == "diffusers":
        path = save_state(reference.state_dict(), tmp_path / "cn.safetensors")
    else:
        original = random_controlnet(cfg, seed=4)
        reference = to_diffusers(original, cfg, TINY_SDXL_TIME_EMBED_DIM)
        prefix = "model.control_model." if layout == "original-model-prefix" else "control_model."
        suffix = ".pth" if layout == "pth" else ".safetensors"
        path = save_state(original.state_dict(), tmp_path / f"cn{suffix}", prefix)
    from ldm_cli.checkpoints.pickled import allow_pickle

    with allow_pickle(layout == "pth"):
        file = read_control_file(path)
    assert file.layout == ("diffusers" if layout == "diffusers" else "original")
    model = build_controlnet(file, cfg, torch.device("cpu"), torch.float32)
    x, hint, t, context, ours_extra, theirs_extra = inputs(cfg, seed=2)
    with torch.no_grad():
        ours = model(x, hint, t, context, **ours_extra)
    assert_residuals_equal(ours, reference_residuals(reference, x, hint, t, context, theirs_extra))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_with_residuals_matches_diffusers(name):
    cfg = CONFIGS[name]
    unet = build_tiny(cfg, seed=5)
    reference = unet_to_diffusers(unet, diffusers_unet_config(cfg, TINY_SDXL_TIME_EMBED_DIM))
    controlnet = random_controlnet(cfg, seed=6)
    x, hint, t, context, ours_extra, theirs_extra = inputs(cfg, seed=7)
    with torch.no_grad():
        residuals = controlnet(x, hint, t, context, **ours_extra)
        ours = unet(x, t, context, **ours_extra, control=residuals)
        theirs = reference(
            x,
            t,
            encoder_hidden_states=context,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            **theirs_extra,
        ).sample
        plain = unet(x, t, context, **ours_extra)
    assert (ours - theirs).abs().max().item() <= ATOL
    assert (ours - plain).abs().max().item() > 0.01  # the residuals changed something


def test_full_size_sd15_controlnet_layout_and_residuals():
    """lllyasviel's SD 1.5 ControlNets: 361,279,120 parameters in control_model.*; diffusers'
    own conversion of our names loads strictly into its default (SD 1.5) ControlNetModel,
    and the residuals agree to float tolerance at a small size (seeded random weights)."""
    from ldm_cli.core.config import SD15
    from ldm_cli.models.controlnet import ControlNet

    with torch.device("meta"):
        assert sum(p.numel() for p in ControlNet(SD15.unet).parameters()) == 361_279_120
    torch.set_num_threads(2)
    model = random_controlnet(SD15.unet, seed=9)
    # diffusers reads the mid block's depth off the last level's (no attention there either way)
    reference = to_diffusers(model, replace(SD15.unet, transformer_depth=(1, 1, 1, 1)))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    hint = torch.rand(1, 3, 64, 64, generator=gen)
    t, context = torch.tensor([601.0]), torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        ours = model(x, hint, t, context)
    theirs = reference_residuals(reference, x, hint, t, context, {})
    for a, b in zip(ours, theirs, strict=True):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, scale)


def test_an_fp16_file_keeps_its_large_weights_narrow_on_the_cpu(tmp_path):
    """As the U-Net's (ops.narrow_weights): the big convolutions and linear layers stay views
    of the file's fp16 values, widened per call, with the residuals of a converted copy."""
    cfg = replace(TINY_SD1.unet, model_channels=128, channel_mult=(1, 2))
    source = random_controlnet(cfg, seed=5).half().float()  # values exact in fp16
    path = save_state(
        source.state_dict(), tmp_path / "cn16.safetensors", "control_model.", torch.float16
    )
    model = build_controlnet(read_control_file(path), cfg, torch.device("cpu"), torch.float32)
    kinds = {p.dtype for p in model.parameters()}
    assert kinds == {torch.float16, torch.float32}  # some kept narrow, the rest converted
    x, hint, t, context, _, _ = inputs(cfg, seed=4)
    with torch.no_grad():
        for a, b in zip(model(x, hint, t, context), source(x, hint, t, context), strict=True):
            assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())
