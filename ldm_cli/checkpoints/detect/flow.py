"""Which flow model (FLUX.1 dev/schnell, SD3/3.5) a set of files holds, from tensor shapes.

Read on the combined view of `checkpoints.flow_sources` (all-in-one names). The text encoders
and the VAE are optional here: loading names what is missing and which option gives it.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from ldm_cli.checkpoints.detect.shapes import count_indices, require
from ldm_cli.checkpoints.flow_sources import PART_PREFIXES, TRANSFORMER, VAE
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import TextConfig, VAEConfig
from ldm_cli.core.errors import UserError
from ldm_cli.core.flow_config import (
    FLOW_FAMILY_NAMES,
    FLUX_DEV,
    FLUX_SCHNELL,
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    FlowModelConfig,
    FluxConfig,
    MMDiTConfig,
    T5Config,
)


def detect_flow(header: CheckpointHeader) -> FlowModelConfig:
    """The flow model of a combined view whose transformer is FLUX's or SD3's."""
    if header.has_prefix(TRANSFORMER + "double_blocks."):
        transformer = flux_config(header)
        base = FLUX_DEV if transformer.guidance_embed else FLUX_SCHNELL
        cfg = base.with_(transformer=transformer)
    else:
        transformer = mmdit_config(header)
        if transformer.x_block_self_attn_layers:
            base = SD35_MEDIUM
        else:
            base = SD35_LARGE if transformer.qk_norm else SD3_MEDIUM
        cfg = base.with_(transformer=transformer)
    vae = _vae_config(header, cfg.vae)
    clip_l = _clip_config(header, "clip_l", cfg.clip_l)
    clip_g = _clip_config(header, "clip_g", cfg.clip_g) if cfg.clip_g is not None else None
    t5 = _t5_config(header, cfg.t5)
    if not cfg.is_flux and not header.has_prefix(PART_PREFIXES["t5"]):
        t5 = None  # SD3 runs without T5 (zeros in its place), as diffusers does
    return cfg.with_(vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5)


def flow_model_name(cfg: FlowModelConfig) -> str:
    """The release a configuration is shaped like, for `ldm info`."""
    if cfg.is_flux:
        return FLOW_FAMILY_NAMES[cfg.family]
    t = cfg.transformer
    if t.x_block_self_attn_layers:
        return "Stable Diffusion 3.5 Medium"
    return "Stable Diffusion 3.5 Large" if t.qk_norm else "Stable Diffusion 3 Medium"


def flux_config(header: CheckpointHeader) -> FluxConfig:
    p = TRANSFORMER
    hidden, in_channels = require(header, p + "img_in.weight")
    head_dim = require(header, p + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if hidden % head_dim or head_dim % 16:
        raise UserError(f"{header.path.name}: FLUX heads of {head_dim} in {hidden} do not fit")
    # RoPE over (text index, row, column): 16/56/56 of 128 in the real model, kept in proportion
    axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    return FluxConfig(
        in_channels=in_channels,
        out_channels=require(header, p + "final_layer.linear.weight")[0],
        vec_in_dim=require(header, p + "vector_in.in_layer.weight")[1],
        context_in_dim=require(header, p + "txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=require(header, p + "double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim,
        depth=count_indices(header, re.escape(p + "double_blocks.") + r"(\d+)\."),
        depth_single_blocks=count_indices(header, re.escape(p + "single_blocks.") + r"(\d+)\."),
        axes_dim=axes,
        qkv_bias=header.shape(p + "double_blocks.0.img_attn.qkv.bias") is not None,
        guidance_embed=header.has_prefix(p + "guidance_in."),
    )


def mmdit_config(header: CheckpointHeader) -> MMDiTConfig:
    p = TRANSFORMER
    hidden, in_channels, patch, _ = require(header, p + "x_embedder.proj.weight")
    positions = require(header, p + "pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise UserError(f"{header.path.name}: pos_embed of {positions} positions is not square")
    attn2 = re.compile(re.escape(p + "joint_blocks.") + r"(\d+)\.x_block\.attn2\.")
    dual = sorted({int(m.group(1)) for k in header.tensors if (m := attn2.match(k))})
    final = require(header, p + "final_layer.linear.weight")[0]
    return MMDiTConfig(
        in_channels=in_channels,
        out_channels=final // (patch * patch),
        patch_size=patch,
        depth=count_indices(header, re.escape(p + "joint_blocks.") + r"(\d+)\."),
        hidden_size=hidden,
        num_heads=hidden // 64,
        mlp_ratio=require(header, p + "joint_blocks.0.x_block.mlp.fc1.weight")[0] / hidden,
        pos_embed_max_size=side,
        adm_in_channels=require(header, p + "y_embedder.mlp.0.weight")[1],
        context_in_dim=require(header, p + "context_embedder.weight")[1],
        qk_norm=header.shape(p + "joint_blocks.0.x_block.attn.ln_q.weight") is not None,
        x_block_self_attn_layers=tuple(dual),
    )


def _vae_config(header: CheckpointHeader, preset: VAEConfig) -> VAEConfig:
    p = VAE + "encoder."
    if not header.has_prefix(p):
        return preset
    ch = require(header, p + "conv_in.weight")[0]
    levels = count_indices(header, re.escape(p + "down.") + r"(\d+)\.")
    z = require(header, VAE + "decoder.conv_in.weight")[1]
    return replace(
        preset,
        ch=ch,
        ch_mult=tuple(
            require(header, f"{p}down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)
        ),
        num_res_blocks=count_indices(header, re.escape(p + "down.0.block.") + r"(\d+)\."),
        z_channels=z,
        embed_dim=z,
        use_quant_conv=header.shape(VAE + "quant_conv.weight") is not None,
    )


def _clip_config(header: CheckpointHeader, part: str, preset: TextConfig) -> TextConfig:
    p = PART_PREFIXES[part] + "text_model."
    if not header.has_prefix(p):
        return preset
    vocab, hidden = require(header, p + "embeddings.token_embedding.weight")
    projection = header.shape(PART_PREFIXES[part] + "text_projection.weight")
    return replace(
        preset,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=require(header, p + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=count_indices(header, re.escape(p + "encoder.layers.") + r"(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=require(header, p + "embeddings.position_embedding.weight")[0],
        projection_dim=projection[0] if projection else None,
    )


def _t5_config(header: CheckpointHeader, preset: T5Config) -> T5Config:
    p = PART_PREFIXES["t5"]
    if not header.has_prefix(p):
        return preset
    vocab, width = require(header, p + "shared.weight")
    block = p + "encoder.block.0.layer."
    buckets, heads = require(header, block + "0.SelfAttention.relative_attention_bias.weight")
    return replace(
        preset,
        vocab_size=vocab,
        d_model=width,
        d_kv=require(header, block + "0.SelfAttention.q.weight")[0] // heads,
        d_ff=require(header, block + "1.DenseReluDense.wo.weight")[1],
        num_layers=count_indices(header, re.escape(p + "encoder.block.") + r"(\d+)\."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def missing_parts(header: CheckpointHeader, cfg: FlowModelConfig) -> list[str]:
    """The parts a run needs that no file given holds, as the options that give them."""
    needed = {"vae": VAE + "decoder.", "clip_l": PART_PREFIXES["clip_l"]}
    if cfg.is_flux:
        needed["t5"] = PART_PREFIXES["t5"]
    else:
        needed["clip_g"] = PART_PREFIXES["clip_g"]
    return ["--" + part.replace("_", "-") for part, p in needed.items() if not header.has_prefix(p)]
