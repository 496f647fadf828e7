"""Tiny ControlNets in both file layouts, and diffusers' ControlNetModel of the same shape."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_cli.core.config import UNetConfig
from ldm_cli.models.controlnet import HINT_WIDTHS, ControlNet
from tests.reference_configs import diffusers_unet_config


def diffusers_controlnet_config(
    cfg: UNetConfig, addition_time_embed_dim: int = 8, widths=HINT_WIDTHS
) -> dict:
    config = diffusers_unet_config(cfg, addition_time_embed_dim)
    for key in ("up_block_types", "out_channels", "sample_size"):
        config.pop(key)
    config["conditioning_embedding_out_channels"] = tuple(widths)
    return config


def randomize_(model: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Fan-in scaled random weights (the zero convolutions too), norm scales around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * scale / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + float(name.endswith("weight")))
    return model


def diffusers_controlnet(cfg: UNetConfig, seed: int = 0, addition_time_embed_dim: int = 8):
    from diffusers import ControlNetModel

    config = diffusers_controlnet_config(cfg, addition_time_embed_dim)
    return randomize_(ControlNetModel(**config), seed).eval()


def random_controlnet(
    cfg: UNetConfig, seed: int = 0, scale: float = 1.0, widths=HINT_WIDTHS
) -> ControlNet:
    return randomize_(ControlNet(cfg, hint_widths=widths), seed, scale).eval()


def save_state(state: dict, path: Path, prefix: str = "", dtype=None) -> Path:
    tensors = {prefix + k: v.detach().to(dtype or v.dtype).contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, str(path))
    return path


def to_diffusers(model: ControlNet, cfg: UNetConfig, addition_time_embed_dim: int = 8):
    """diffusers' ControlNetModel with our model's weights, converted by diffusers' own
    single-file code (convert_controlnet_checkpoint) from our original-layout names."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = diffusers_controlnet_config(cfg, addition_time_embed_dim, model.hint_widths)
    state = {"control_model." + k: v for k, v in model.state_dict().items()}
    converted = convert_controlnet_checkpoint(state, config)
    # its conversion predates SDXL ControlNets: the size/text embedding by hand
    for ours, theirs in (
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
    ):
        for param in ("weight", "bias"):
            if f"control_model.{ours}.{param}" in state:
                converted[f"{theirs}.{param}"] = state[f"control_model.{ours}.{param}"]
    # ... and it hard-codes four hint widths (conv_out = input_hint_block.14)
    converted = {
        k: v for k, v in converted.items() if not k.startswith("controlnet_cond_embedding.")
    }
    last = len(model.input_hint_block) - 1
    names = {
        "conv_in": 0,
        "conv_out": last,
        **{f"blocks.{k}": 2 * k + 2 for k in range(last // 2 - 1)},
    }
    for theirs, index in names.items():
        for param in ("weight", "bias"):
            converted[f"controlnet_cond_embedding.{theirs}.{param}"] = state[
                f"control_model.input_hint_block.{index}.{param}"
            ]
    reference = ControlNetModel(**config)
    reference.load_state_dict(converted, strict=True)
    return reference.eval()
