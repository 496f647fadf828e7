"""diffusers configurations equal to our architectures, for parity tests."""

from __future__ import annotations

from ldm_cli.core.config import TextConfig, UNetConfig, VAEConfig


def diffusers_unet_config(cfg: UNetConfig, addition_time_embed_dim: int = 256) -> dict:
    """The UNet2DConditionModel config of the same architecture."""
    levels = range(len(cfg.channel_mult))
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attention = [
        2**lv in cfg.attention_resolutions and cfg.transformer_depth[lv] > 0 for lv in levels
    ]
    assert cfg.transformer_depth_middle == cfg.transformer_depth[-1]  # diffusers' mid block depth
    config = {
        "sample_size": 16,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' "attention_head_dim" is, confusingly, the number of heads
        "attention_head_dim": [
            cfg.num_heads if cfg.num_head_channels == -1 else w // cfg.num_head_channels
            for w in widths
        ],
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": list(cfg.transformer_depth),
        "norm_num_groups": cfg.norm_groups,
        "only_cross_attention": list(cfg.disable_self_attentions or [False] * len(widths)),
        "num_class_embeds": cfg.num_classes,
    }
    if cfg.adm_in_channels is not None:
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = addition_time_embed_dim
        config["projection_class_embeddings_input_dim"] = cfg.adm_in_channels
    return config


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        "scaling_factor": cfg.scale_factor,
    }


def transformers_clip_config(cfg: TextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "projection_dim": cfg.hidden_size,
        "torch_dtype": "float32",
    }
