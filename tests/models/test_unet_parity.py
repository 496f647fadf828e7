"""The original-layout U-Net against diffusers' UNet2DConditionModel.

Weights travel from our model to diffusers through diffusers' own single-file conversion
(``convert_ldm_unet_checkpoint``), so a passing parity test also proves that our state-dict keys
are the original checkpoint's keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
import torch

from ldm_cli.core.config import SD15, TINY_SD1, X4_UPSCALER, UNetConfig
from ldm_cli.models.unet import UNetModel, unet_param_count
from ldm_cli.models.unet_blocks import timestep_embedding
from tests.reference_configs import diffusers_unet_config

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

LDM_PREFIX = "model.diffusion_model."
PARITY_ATOL = 1e-5

# Full-size architectures (see ../shared/reference/yaml); candidates for ldm_cli.core.config
# presets.
SD21_UNET = replace(
    SD15.unet, use_linear_in_transformer=True, num_head_channels=64, context_dim=1024
)
X4_UPSCALER_UNET = X4_UPSCALER.unet
SDXL_BASE_UNET = UNetConfig(
    model_channels=320,
    channel_mult=(1, 2, 4),
    attention_resolutions=(4, 2),
    num_head_channels=64,
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
)

# Tiny variants exercising every code path.
TINY_SD2 = replace(TINY_SD1.unet, use_linear_in_transformer=True, num_head_channels=8)
TINY_SDXL_TIME_EMBED_DIM = 8
TINY_SDXL_TEXT_EMBED_DIM = 16
TINY_SDXL = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=16,
    transformer_depth=(0, 2),
    transformer_depth_middle=2,
    context_dim=24,
    use_linear_in_transformer=True,
    adm_in_channels=TINY_SDXL_TEXT_EMBED_DIM + 6 * TINY_SDXL_TIME_EMBED_DIM,
)
TINY_X4 = UNetConfig(
    in_channels=7,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    num_heads=2,
    transformer_depth=(1, 1, 1),
    context_dim=24,
    use_linear_in_transformer=True,
    num_classes=10,
    disable_self_attentions=(True, True, False),
)
TINY_CONFIGS = {"sd1": TINY_SD1.unet, "sd2": TINY_SD2, "sdxl": TINY_SDXL, "x4": TINY_X4}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled random weights, norm scales around 1, small biases: O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:
                is_norm_scale = name.endswith("weight")  # the only 1-D weights are norm scales
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + float(is_norm_scale))


def to_diffusers(model: UNetModel, config: dict) -> UNet2DConditionModel:
    checkpoint = {LDM_PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(converted, strict=True)
    return reference.eval()


def tiny_inputs(cfg: UNetConfig, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=gen)
    timesteps = torch.tensor([999.0, 500.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    return x, timesteps, context


def build_tiny(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    model = UNetModel(cfg).eval()
    randomize_(model, seed)
    return model


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_matches_diffusers(name):
    cfg = TINY_CONFIGS[name]
    config = diffusers_unet_config(cfg, TINY_SDXL_TIME_EMBED_DIM)
    model = build_tiny(cfg)
    reference = to_diffusers(model, config)
    x, timesteps, context = tiny_inputs(cfg)

    y = None
    extra = {}
    if cfg.num_classes is not None:
        y = torch.tensor([3, 7])
        extra["class_labels"] = y
    if cfg.adm_in_channels is not None:
        gen = torch.Generator().manual_seed(2)
        text_embeds = torch.randn(2, TINY_SDXL_TEXT_EMBED_DIM, generator=gen)
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 768]])
        # SGM's ConcatTimestepEmbedderND: each size number through the sinusoidal embedding.
        size_embeds = timestep_embedding(time_ids.flatten(), TINY_SDXL_TIME_EMBED_DIM)
        y = torch.cat([text_embeds, size_embeds.reshape(2, -1)], dim=-1)
        extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}

    with torch.no_grad():
        ours = model(x, timesteps, context, y)
        theirs = reference(x, timesteps, encoder_hidden_states=context, **extra).sample
    assert ours.shape == theirs.shape == (2, cfg.out_channels, 16, 16)
    assert 0.1 < ours.std() < 10  # the weights give O(1) outputs, so the tolerance means something
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g}")
    assert diff <= PARITY_ATOL


def test_timestep_forms_agree():
    cfg = TINY_SD1.unet
    model = build_tiny(cfg)
    x, _, context = tiny_inputs(cfg)
    with torch.no_grad():
        as_float = model(x, torch.tensor([999.0, 999.0]), context)
        as_int = model(x, torch.tensor([999, 999]), context)
        as_scalar = model(x, torch.tensor(999), context)
    torch.testing.assert_close(as_int, as_float, rtol=0, atol=0)
    torch.testing.assert_close(as_scalar, as_float, rtol=0, atol=0)


def test_channels_last_input():
    cfg = TINY_SD2
    model = build_tiny(cfg)
    x, timesteps, context = tiny_inputs(cfg)
    with torch.no_grad():
        expected = model(x, timesteps, context)
        got = model(x.to(memory_format=torch.channels_last), timesteps, context)
        model.to(memory_format=torch.channels_last)
        got_cl_model = model(x.to(memory_format=torch.channels_last), timesteps, context)
    torch.testing.assert_close(got, expected, rtol=0, atol=PARITY_ATOL)
    torch.testing.assert_close(got_cl_model, expected, rtol=0, atol=PARITY_ATOL)


def test_bfloat16_weights_run_close_to_float32():
    cfg = TINY_SDXL
    model = build_tiny(cfg)
    x, timesteps, context = tiny_inputs(cfg)
    y = torch.randn(2, cfg.adm_in_channels, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x, timesteps, context, y)
        got = model.to(torch.bfloat16)(x, timesteps, context, y)
    assert got.dtype == torch.float32  # the output comes back in the input's dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)


def test_meta_build_loads_with_assign():
    cfg = TINY_X4
    source = build_tiny(cfg)
    with torch.device("meta"):
        model = UNetModel(cfg)
    model.load_state_dict(source.state_dict(), strict=True, assign=True)
    x, timesteps, context = tiny_inputs(cfg)
    y = torch.tensor([0, 9])
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, timesteps, context, y), source(x, timesteps, context, y)
        )


FULL_SIZE = {
    "sd15": (SD15.unet, 859_520_964),
    "sd21": (SD21_UNET, 865_910_724),
    "x4-upscaler": (X4_UPSCALER_UNET, 473_398_020),
    "sdxl-base": (SDXL_BASE_UNET, 2_567_463_684),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count(name):
    cfg, expected = FULL_SIZE[name]
    assert unet_param_count(cfg) == expected


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_keys_match_diffusers_conversion(name, reference_dir):
    accelerate = pytest.importorskip("accelerate")
    config_path = os.path.join(reference_dir, name, "unet", "config.json")
    if not os.path.isfile(config_path):
        pytest.skip(f"{config_path} missing")
    with open(config_path) as f:
        config = json.load(f)
    cfg, _ = FULL_SIZE[name]
    with torch.device("meta"):
        model = UNetModel(cfg)
    checkpoint = {LDM_PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with accelerate.init_empty_weights():
        reference = UNet2DConditionModel.from_config(config)

    expected_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    converted_shapes = {k: tuple(v.shape) for k, v in converted.items()}
    assert converted_shapes == expected_shapes
    reference.load_state_dict(converted, strict=True, assign=True)
