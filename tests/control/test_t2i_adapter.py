"""T2I-Adapters (diffusers' layout, as TencentARC ships them) against diffusers' T2IAdapter, the
U-Net with their features against UNet2DConditionModel's down_intrablock_additional_residuals,
and whole images against StableDiffusionAdapterPipeline, on seeded random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ldm_cli
from ldm_cli.control.files import build_adapter, read_control_file
from ldm_cli.core.config import TINY_SD1
from tests.control.controlnet_helpers import randomize_, save_state
from tests.control.test_controlnet_pipeline import control_image, files, ours  # noqa: F401
from tests.models.test_unet_parity import (
    TINY_SDXL,
    TINY_SDXL_TEXT_EMBED_DIM,
    TINY_SDXL_TIME_EMBED_DIM,
    build_tiny,
)
from tests.models.test_unet_parity import to_diffusers as unet_to_diffusers
from tests.reference_configs import diffusers_unet_config

pytest.importorskip("diffusers")
ATOL = 1e-5


def widths(cfg):
    return [cfg.model_channels * m for m in cfg.channel_mult]


def diffusers_adapter(cfg, unshuffle: int, xl: bool, seed: int, scale: float = 1.0):
    from diffusers import T2IAdapter

    channels = widths(cfg) + ([widths(cfg)[-1]] if xl else [])  # XL: a feature for the middle
    adapter = T2IAdapter(
        in_channels=3, channels=channels, num_res_blocks=2, downscale_factor=unshuffle,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )  # fmt: skip
    return randomize_(adapter, seed, scale).eval()


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_adapter_and_unet_match_diffusers(name, tmp_path):
    cfg, factor = (TINY_SD1.unet, 2) if name == "sd1" else (TINY_SDXL, 2)
    xl = name == "sdxl"
    reference = diffusers_adapter(cfg, 2 * factor if xl else factor, xl, seed=7)
    path = save_state(reference.state_dict(), tmp_path / "adapter.safetensors")
    file = read_control_file(path)
    assert file.is_adapter
    adapter = build_adapter(file, cfg, factor, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(2)
    hint = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ours_features, theirs_features = adapter(hint), reference(hint)
    for a, b in zip(ours_features, theirs_features, strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= ATOL

    unet = build_tiny(cfg, seed=5)
    reference_unet = unet_to_diffusers(unet, diffusers_unet_config(cfg, TINY_SDXL_TIME_EMBED_DIM))
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t, context = torch.tensor([800.0, 300.0]), torch.randn(2, 7, cfg.context_dim, generator=gen)
    ours_extra, theirs_extra = {}, {}
    if xl:
        from ldm_cli.models.unet_blocks import timestep_embedding

        text = torch.randn(2, TINY_SDXL_TEXT_EMBED_DIM, generator=gen)
        ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
        sizes = timestep_embedding(ids.flatten(), TINY_SDXL_TIME_EMBED_DIM).reshape(2, -1)
        ours_extra["y"] = torch.cat([text, sizes], -1)
        theirs_extra["added_cond_kwargs"] = {"text_embeds": text, "time_ids": ids}
    with torch.no_grad():
        ours = unet(x, t, context, **ours_extra, adapter=ours_features)
        theirs = reference_unet(
            x, t, encoder_hidden_states=context, **theirs_extra,
            down_intrablock_additional_residuals=[f.clone() for f in theirs_features],
        ).sample  # fmt: skip
        plain = unet(x, t, context, **ours_extra)
    assert (ours - theirs).abs().max().item() <= ATOL
    assert (ours - plain).abs().max().item() > 0.01


def test_adapter_image_matches_diffusers_pipeline(files, ours, tmp_path, reference_dir):  # noqa: F811
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline

    from tests.control.test_controlnet_pipeline import NEGATIVE, PROMPT, SEED, SIZE, STEPS
    from tests.pipeline.test_pipeline_parity import write_config_dir

    checkpoint, _, images = files
    reference = diffusers_adapter(TINY_SD1.unet, 2, False, seed=8, scale=2.0)
    path = save_state(reference.state_dict(), tmp_path / "t2i.safetensors")
    from diffusers import StableDiffusionPipeline

    config_dir = write_config_dir(tmp_path / "config", reference_dir)
    base = StableDiffusionPipeline.from_single_file(
        str(checkpoint), config=str(config_dir), local_files_only=True, safety_checker=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )  # fmt: skip
    pipe = StableDiffusionAdapterPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"}, adapter=reference
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        base.scheduler.config, timestep_spacing="linspace"
    )
    pipe.set_progress_bar_config(disable=True)
    image = images[0].resize((SIZE, SIZE))
    out = pipe(
        PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=7.5, height=SIZE, width=SIZE, adapter_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]  # fmt: skip
    expected = (out * 255).round().astype(int)
    settings = dict(
        steps=STEPS, cfg=7.5, seed=SEED, sampler="euler", scheduler="normal", width=SIZE,
        height=SIZE,
    )  # fmt: skip
    control = ldm_cli.Control(path, image, weight=0.8)
    (got,) = ours.generate(PROMPT, NEGATIVE, control=control, **settings)
    (plain,) = ours.generate(PROMPT, NEGATIVE, **settings)
    got, plain = np.asarray(got).astype(int), np.asarray(plain).astype(int)
    diff, effect = np.abs(got - expected).max(), np.abs(got - plain).mean()
    print(f"T2I-Adapter: max diff {diff}, effect {effect:.3f}")
    assert np.abs(got - expected).max() <= 2 and expected.std() > 5
    assert np.abs(got - plain).max() >= 8


def test_a_controlnet_and_an_adapter_together(files, ours, tmp_path):  # noqa: F811
    """Both kinds in one run: the ControlNet's residuals and the adapter's features both count
    (the ControlNet weighted down: its random residuals are large enough to drown the rest)."""
    _, nets, images = files
    adapter = diffusers_adapter(TINY_SD1.unet, 2, False, seed=9, scale=2.0)
    path = save_state(adapter.state_dict(), tmp_path / "t2i.safetensors")
    image = images[0].resize((64, 64))
    net = ldm_cli.Control(nets[0][1], images[0], weight=0.02)
    both = [net, ldm_cli.Control(path, image)]
    settings = dict(steps=4, seed=3, width=64, height=64, sampler="euler")
    (plain,) = ours.generate("a circle", **settings)
    (one,) = ours.generate("a circle", control=net, **settings)
    (two,) = ours.generate("a circle", control=both, **settings)
    plain, one, two = (np.asarray(i).astype(int) for i in (plain, one, two))
    assert np.abs(one - plain).max() >= 4 and np.abs(two - one).max() >= 4
