"""Reading architecture numbers off tensor shapes: the helpers every family's detection shares
(the key prefixes, counting numbered blocks, required tensors) and the U-Net, VAE and CLIP text
configurations that SD 1.x, 2.x, XL and the x4 upscaler lay out alike."""

from __future__ import annotations

import re
from dataclasses import replace

from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import X4_UPSCALER, ModelConfig, TextConfig, UNetConfig, VAEConfig
from ldm_cli.core.errors import UserError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer.text_model."


def is_upscaler_unet(unet: UNetConfig) -> bool:
    """The x4 upscaler's U-Net: 3 RGB channels beside the latents and a noise-level embedding."""
    return unet.num_classes is not None and unet.in_channels == unet.out_channels + 3


def upscaler_config(unet: UNetConfig, vae: VAEConfig, text: TextConfig) -> ModelConfig:
    """An x4 upscaler of the detected shapes; the rest (v-prediction, its schedule, the VAE
    scale factor 0.08333) is what x4-upscaling.yaml sets and shapes cannot tell."""
    return X4_UPSCALER.with_(
        unet=unet,
        vae=replace(vae, scale_factor=X4_UPSCALER.vae.scale_factor),
        text=text,
    )


def count_indices(header: CheckpointHeader, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in header.tensors if (m := rx.match(k))}
    return len(found)


def require(header: CheckpointHeader, key: str) -> tuple[int, ...]:
    shape = header.shape(key)
    if shape is None:
        raise UserError(f"{header.path.name}: expected tensor {key!r} is missing")
    return shape


def infer_unet(header: CheckpointHeader, num_heads: int = 8, num_head_channels: int = -1):
    p = UNET
    conv_in = require(header, p + "input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]
    out = header.shape(p + "out.2.weight")  # absent from a ControlNet: an encoder only
    if out is None and header.has_prefix(p + "output_blocks."):
        require(header, p + "out.2.weight")
    out_channels = out[0] if out else in_channels
    n_input = count_indices(header, re.escape(p) + r"input_blocks\.(\d+)\.")
    channel_mult, attn_res, depths, disable_self = [], [], [], []
    level, num_res_blocks, in_level = 0, None, 0
    for i in range(1, n_input):
        if header.shape(f"{p}input_blocks.{i}.0.op.weight") is not None:
            num_res_blocks = num_res_blocks or in_level
            level, in_level = level + 1, 0
            continue
        in_level += 1
        if in_level == 1:
            out = require(header, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0]
            channel_mult.append(out // model_channels)
            depth = count_indices(
                header, re.escape(f"{p}input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\."
            )
            depths.append(depth)
            if depth:
                attn_res.append(2**level)
                k1 = require(
                    header, f"{p}input_blocks.{i}.1.transformer_blocks.0.attn1.to_k.weight"
                )
                disable_self.append(k1[1] != k1[0])
            else:
                disable_self.append(False)
    num_res_blocks = num_res_blocks or in_level
    ctx_key = next(
        (k for k in header.tensors if k.startswith(p) and k.endswith("attn2.to_k.weight")), None
    )
    context_dim = header.tensors[ctx_key].shape[1] if ctx_key else 768
    proj_key = next(
        (k for k in header.tensors if k.startswith(p) and k.endswith("proj_in.weight")), None
    )
    use_linear = proj_key is not None and len(header.tensors[proj_key].shape) == 2
    mid_depth = count_indices(
        header, re.escape(p + "middle_block.1.transformer_blocks.") + r"(\d+)\."
    )
    adm = header.shape(p + "label_emb.0.0.weight")
    classes = header.shape(p + "label_emb.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(sorted(attn_res, reverse=True)),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        transformer_depth=tuple(depths),
        transformer_depth_middle=mid_depth,
        context_dim=context_dim,
        use_linear_in_transformer=use_linear,
        adm_in_channels=adm[1] if adm else None,
        num_classes=classes[0] if classes else None,
        disable_self_attentions=tuple(disable_self) if any(disable_self) else None,
    )


def infer_vae(header: CheckpointHeader, scale_factor: float = 0.18215) -> VAEConfig:
    p = VAE + "encoder."
    ch = require(header, p + "conv_in.weight")[0]
    levels = count_indices(header, re.escape(p + "down.") + r"(\d+)\.")
    if levels == 0:
        raise UserError(f"{header.path.name}: no VAE encoder tensors ({p}down.*)")
    mult = tuple(
        require(header, f"{p}down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)
    )
    blocks = count_indices(header, re.escape(p + "down.0.block.") + r"(\d+)\.")
    z = require(header, VAE + "decoder.conv_in.weight")[1]
    embed = require(header, VAE + "post_quant_conv.weight")[0]
    double = require(header, p + "conv_out.weight")[0] == 2 * z
    return VAEConfig(
        in_channels=require(header, p + "conv_in.weight")[1],
        out_ch=require(header, VAE + "decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=mult,
        num_res_blocks=blocks,
        z_channels=z,
        embed_dim=embed,
        double_z=double,
        scale_factor=scale_factor,
    )


def infer_clip_text(header: CheckpointHeader, pad_token_id: int = 49407) -> TextConfig:
    p = CLIP_L
    vocab, hidden = require(header, p + "embeddings.token_embedding.weight")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=require(header, p + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=count_indices(header, re.escape(p + "encoder.layers.") + r"(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=require(header, p + "embeddings.position_embedding.weight")[0],
        pad_token_id=pad_token_id,
    )
