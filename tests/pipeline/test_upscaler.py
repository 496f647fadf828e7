"""The x4 upscaler architecture: the preset against the real configuration, the U-Net (with its
noise-level class embedding) and the f=4 VAE against diffusers on seeded random weights, and
detection of the real file layout from tensor shapes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldm_cli.checkpoints.detect import detect_config, is_upscaler_unet
from ldm_cli.checkpoints.file import read_header
from ldm_cli.core.config import TINY_X4, X4_UPSCALER, UNetConfig
from ldm_cli.models.loading import build_empty, load_model
from ldm_cli.models.unet import UNetModel, unet_param_count
from ldm_cli.models.vae import AutoencoderKL
from ldm_cli.pipeline.tasks.upscale import LOW_RES_SCHEDULE, MAX_NOISE_LEVEL
from ldm_cli.testing import random_checkpoint
from tests.reference_configs import diffusers_unet_config, diffusers_vae_config
from tests.upscaler_helpers import real_layout_shapes, write_sparse_checkpoint

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

PARITY_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def reference_config(reference_dir: str, part: str) -> dict:
    path = Path(reference_dir) / "x4-upscaler" / part
    return json.loads(path.read_text())


def test_preset_is_the_real_configuration(reference_dir):
    unet = reference_config(reference_dir, "unet/config.json")
    ours = diffusers_unet_config(X4_UPSCALER.unet)
    for key in (
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "use_linear_projection",
        "only_cross_attention",
        "num_class_embeds",
        "norm_num_groups",
    ):
        assert ours[key] == unet[key], key
    assert set(ours["attention_head_dim"]) == {unet["attention_head_dim"]}

    vae = reference_config(reference_dir, "vae/config.json")
    ours_vae = diffusers_vae_config(X4_UPSCALER.vae)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        assert ours_vae[key] == vae[key], key

    scheduler = reference_config(reference_dir, "scheduler/scheduler_config.json")
    assert X4_UPSCALER.prediction == "v" == scheduler["prediction_type"][0]
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert (X4_UPSCALER.schedule.beta_start, X4_UPSCALER.schedule.beta_end) == (
        scheduler["beta_start"],
        scheduler["beta_end"],
    )
    low_res = reference_config(reference_dir, "low_res_scheduler/scheduler_config.json")
    assert low_res["beta_schedule"] == "scaled_linear"
    assert (LOW_RES_SCHEDULE.beta_start, LOW_RES_SCHEDULE.beta_end) == (
        low_res["beta_start"],
        low_res["beta_end"],
    )
    assert reference_config(reference_dir, "model_index.json")["max_noise_level"] == MAX_NOISE_LEVEL


def test_full_size_parameter_counts():
    assert unet_param_count(X4_UPSCALER.unet) == 473_398_020
    with torch.device("meta"):
        vae = AutoencoderKL(X4_UPSCALER.vae)
    assert sum(p.numel() for p in vae.parameters()) == 55_325_927
    assert X4_UPSCALER.vae.downscale == 4


def test_full_size_keys_convert_into_the_reference_diffusers_models(reference_dir):
    accelerate = pytest.importorskip("accelerate")
    model = build_empty(X4_UPSCALER)
    checkpoint = {
        k: v for k, v in model.state_dict().items() if not k.startswith("cond_stage_model.")
    }
    for part, cls, convert in (
        ("unet", diffusers.UNet2DConditionModel, convert_ldm_unet_checkpoint),
        ("vae", diffusers.AutoencoderKL, convert_ldm_vae_checkpoint),
    ):
        config = reference_config(reference_dir, f"{part}/config.json")
        converted = convert(checkpoint, config)
        with accelerate.init_empty_weights():
            reference = cls.from_config(config)
        expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected, part


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fan-in scaled weights, norm scales near 1, small biases: O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + float(name.endswith("weight")))
    return model


def test_tiny_unet_matches_diffusers_given_noise_levels_as_class_labels():
    cfg = TINY_X4.unet
    model = randomize_(UNetModel(cfg).eval(), seed=0)
    config = diffusers_unet_config(cfg)
    assert config["num_class_embeds"] == 1000 and config["only_cross_attention"][1]
    prefixed = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    reference = diffusers.UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(prefixed, config), strict=True)
    reference.eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 16, 16, generator=gen)  # 4 latent + 3 low-res image channels
    timesteps = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    noise_level = torch.tensor([20, 350])
    with torch.no_grad():
        ours = model(x, timesteps, context, noise_level)
        theirs = reference(x, timesteps, context, class_labels=noise_level).sample
        other_level = model(x, timesteps, context, torch.tensor([0, 0]))
    diff = (ours - theirs).abs().max().item()
    print(f"x4 U-Net: max abs diff {diff:.3g}, output std {ours.std():.3f}")
    assert ours.shape == (2, 4, 16, 16)
    assert 0.1 < ours.std() < 10
    assert diff <= PARITY_ATOL
    assert (ours - other_level).abs().max() > 1e-2  # the noise level does reach the output


def test_tiny_f4_vae_matches_diffusers():
    cfg = TINY_X4.vae
    assert cfg.downscale == 4
    ours = randomize_(AutoencoderKL(cfg).eval(), seed=2)
    with torch.no_grad():
        ours.decoder.conv_out.weight.mul_(0.2)  # a trained decoder's output range
    config = diffusers_vae_config(cfg)
    prefixed = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    theirs = diffusers.AutoencoderKL(**config)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(prefixed, config), strict=True)
    theirs.eval()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior, reference = ours.encode(image), theirs.encode(image).latent_dist
        z = reference.mean
        diffs = {
            "mean": (posterior.mean - reference.mean).abs().max().item(),
            "logvar": (posterior.logvar - reference.logvar).abs().max().item(),
            "decode": (ours.decode(z) - theirs.decode(z).sample).abs().max().item(),
        }
    print("x4 VAE:", diffs)
    assert posterior.mean.shape == (1, 4, 8, 8)
    assert all(d <= PARITY_ATOL for d in diffs.values()), diffs


def without_attention_free_flags(cfg: UNetConfig) -> UNetConfig:
    """disable_self_attentions with False on levels without attention, where it means nothing
    (the yaml says True at the first level; shapes cannot tell)."""
    flags = tuple(
        flag and depth > 0
        for flag, depth in zip(cfg.disable_self_attentions, cfg.transformer_depth, strict=True)
    )
    return replace(cfg, disable_self_attentions=flags)


def test_real_layout_is_detected_from_shapes(tmp_path):
    path = write_sparse_checkpoint(tmp_path / "x4.safetensors", real_layout_shapes(X4_UPSCALER))
    header = read_header(path)
    assert header.has_prefix("low_scale_model.") and not header.metadata
    detected = detect_config(header)
    assert detected.unet == without_attention_free_flags(X4_UPSCALER.unet)
    assert detected.with_(unet=X4_UPSCALER.unet) == X4_UPSCALER
    assert detected.text.kind == "openclip"


def test_tiny_without_metadata_is_detected_and_loads_strictly(tmp_path):
    path = random_checkpoint(TINY_X4, tmp_path / "tiny-x4.safetensors", with_metadata=False)
    header = read_header(path)
    cfg = detect_config(header)
    assert cfg.family == "x4-upscaler" and is_upscaler_unet(cfg.unet)
    # shapes cannot tell the head count; the real model's 8 is assumed
    assert cfg.unet == without_attention_free_flags(replace(TINY_X4.unet, num_heads=8))
    assert cfg.vae == TINY_X4.vae
    assert (cfg.prediction, cfg.schedule) == ("v", X4_UPSCALER.schedule)
    model, _ = load_model(path, cfg=cfg)  # the low_scale_model.* buffers are known extras
    assert model.unet.label_emb.weight.shape == (1000, 128)


def test_tiny_openclip_upscaler_in_the_real_layout_loads_and_upscales(tmp_path):
    """The real x4 upscaler conditions on an OpenCLIP tower (cond_stage_model.model.*)."""
    from ldm_cli.core.config import TextConfig
    from ldm_cli.pipeline.load import load
    from tests.image_helpers import photo

    text = TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=1,  # what detection assumes: 64-dim heads, at least one
        hidden_act="gelu",
        pad_token_id=0,
        clip_skip=2,
        kind="openclip",
        projection_dim=32,
    )
    cfg = TINY_X4.with_(text=text)
    path = random_checkpoint(cfg, tmp_path / "tiny-x4-openclip.safetensors", with_metadata=False)
    header = read_header(path)
    assert header.has_prefix("cond_stage_model.model.transformer.resblocks.")
    detected = detect_config(header)
    assert detected.family == "x4-upscaler" and detected.text == text
    pipe = load(path, device="cpu", dtype="fp32")
    assert pipe.is_upscaler
    (image,) = pipe.upscale(photo(width=16), "a cat", steps=2, seed=0)
    assert image.size == (64, 64)
