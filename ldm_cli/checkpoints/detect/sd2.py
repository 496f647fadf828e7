"""Checkpoints with an OpenCLIP text tower (``cond_stage_model.model.*``): SD 2.x, x4 upscaler.

Shapes tell the architecture (OpenCLIP width and depth, linear ``proj_in``, 4 or 9 U-Net input
channels) but not whether the U-Net predicts eps (2.x-base, 512 px) or v (2.x 768-v): that is
settled by a ``v_pred`` tensor when the file has one, else by probing the loaded U-Net
(:mod:`ldm_cli.models.prediction_probe`), else by ``--prediction``.
"""

from __future__ import annotations

import re

from ldm_cli.checkpoints.detect.shapes import (
    UNET,
    count_indices,
    infer_unet,
    infer_vae,
    is_upscaler_unet,
    require,
    upscaler_config,
)
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import ModelConfig, TextConfig
from ldm_cli.core.errors import UserError

OPENCLIP = "cond_stage_model.model."
# An empty marker tensor some v-prediction checkpoints carry (ComfyUI and others read it).
V_PRED_KEY = "v_pred"
SD2_HEAD_CHANNELS = 64
SD2_SIZES = {"eps": 512, "v": 768}


def detect_openclip(header: CheckpointHeader) -> ModelConfig:
    name = header.path.name
    if not header.has_prefix(UNET + "input_blocks."):
        raise UserError(f"{name}: an OpenCLIP text tower but no U-Net ({UNET}* tensors)")
    text = infer_openclip_text(header)
    unet = infer_unet(header, num_head_channels=SD2_HEAD_CHANNELS)
    if is_upscaler_unet(unet):  # x4-upscaling.yaml sets num_heads 8, not 64-dim heads
        return upscaler_config(infer_unet(header), infer_vae(header), text)
    if not unet.use_linear_in_transformer:
        raise UserError(
            f"{name}: an OpenCLIP text tower with a 1x1-convolution proj_in U-Net is not a "
            "known SD 2.x variant"
        )
    if unet.context_dim != text.hidden_size:
        raise UserError(
            f"{name}: the U-Net attends to {unet.context_dim}-wide context but the OpenCLIP "
            f"text tower is {text.hidden_size} wide"
        )
    family = {4: "sd2", 9: "sd2-inpaint"}.get(unet.in_channels)
    if family is None:
        raise UserError(
            f"{name}: unknown SD 2.x U-Net variant with {unet.in_channels} input channels"
        )
    prediction = "v" if V_PRED_KEY in header.tensors else "eps"
    return ModelConfig(
        family=family,
        unet=unet,
        vae=infer_vae(header),
        text=text,
        prediction=prediction,
        default_size=SD2_SIZES[prediction],
    )


def infer_openclip_text(header: CheckpointHeader, prefix: str = OPENCLIP) -> TextConfig:
    """An open_clip text tower under `prefix`; SD 2.x conditions on its penultimate layer."""
    vocab, width = require(header, prefix + "token_embedding.weight")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=require(header, prefix + "transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_hidden_layers=count_indices(
            header, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."
        ),
        # every released OpenCLIP text tower has 64-dim heads (H/14: 16 x 64, bigG: 20 x 64)
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=require(header, prefix + "positional_embedding")[0],
        hidden_act="gelu",
        pad_token_id=0,
        clip_skip=2,
        kind="openclip",
        projection_dim=require(header, prefix + "text_projection")[1],
    )
