"""A diffusers pipeline folder's JSON configurations <-> ldm's ModelConfig.

`folder_configs` writes, for a real-size configuration, what the model repositories hold
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1, stable-diffusion-xl-base-1.0)
on every field diffusers and transformers read; `model_config` reads them back. Two of diffusers'
conventions need care: its ``attention_head_dim`` is the number of heads (per level, or one
number for all), and its SD 2.x text encoder has one layer fewer than the OpenCLIP tower (the
last one is dropped, SD 2.x reading the one before it).
"""

from __future__ import annotations

from ldm_cli.core.config import ModelConfig, TextConfig
from ldm_cli.core.errors import UserError

DIFFUSERS_VERSION = "0.27.0"
PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sd2-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
}
_SCHEDULERS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}
_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}
SD1_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"


def folder_configs(cfg: ModelConfig, dtype_name: str = "float32") -> dict[str, dict]:
    """Each JSON file of the pipeline folder of `cfg`, by its path in the folder."""
    if cfg.family not in PIPELINES:
        raise UserError(f"a {cfg.family} model has no diffusers StableDiffusion pipeline folder")
    base = cfg.family.split("-")[0]
    index = {"_class_name": PIPELINES[cfg.family], "_diffusers_version": DIFFUSERS_VERSION}
    configs = {"unet/config.json": unet_config(cfg), "vae/config.json": vae_config(cfg)}
    if cfg.conditioner:
        index.update(force_zeros_for_empty_prompt=True, add_watermarker=None)
        for text in cfg.text_encoders:
            part = "text_encoder" if text.kind == "clip" else "text_encoder_2"
            token = part.replace("text_encoder", "tokenizer")
            configs[f"{part}/config.json"] = text_config(text, dtype_name, sdxl=True)
            cls = "CLIPTextModel" if text.kind == "clip" else "CLIPTextModelWithProjection"
            index[part] = ["transformers", cls]
            index[token] = ["transformers", "CLIPTokenizer"]
            configs.update(_tokenizer_configs(token, text))
        if cfg.family == "sdxl-refiner":
            index.update(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)
            index.update(text_encoder=[None, None], tokenizer=[None, None])
    else:
        index.update(requires_safety_checker=False, safety_checker=[None, None])
        index.update(feature_extractor=[None, None], image_encoder=[None, None])
        configs["text_encoder/config.json"] = text_config(cfg.text, dtype_name)
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        configs.update(_tokenizer_configs("tokenizer", cfg.text))
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", _SCHEDULERS[base]]
    configs["scheduler/scheduler_config.json"] = scheduler_config(cfg, _SCHEDULERS[base])
    configs["model_index.json"] = index
    return configs


def unet_config(cfg: ModelConfig) -> dict:
    unet = cfg.unet
    if unet.num_classes is not None or unet.disable_self_attentions is not None:
        raise UserError("the x4 upscaler's U-Net has no UNet2DConditionModel configuration")
    widths = [unet.model_channels * m for m in unet.channel_mult]
    levels = range(len(widths))
    attention = [2**lv in unet.attention_resolutions and unet.transformer_depth[lv] > 0
                 for lv in levels]  # fmt: skip
    # diffusers' mid block has the depth of the last level; a level without attention has none
    depths = [unet.transformer_depth[lv] if attention[lv] else 1 for lv in levels]
    if attention[-1] and depths[-1] != unet.transformer_depth_middle:
        raise UserError(
            "diffusers' U-Net needs the middle block as deep as the last level's attention "
            f"({unet.transformer_depth_middle} against {depths[-1]})"
        )
    depths[-1] = unet.transformer_depth_middle
    if unet.num_head_channels == -1:
        heads: int | list[int] = unet.num_heads
    else:
        heads = [w // unet.num_head_channels for w in widths]
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "block_out_channels": widths,
        "center_input_sample": False,
        "cross_attention_dim": unet.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": unet.in_channels,
        "layers_per_block": unet.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": unet.norm_groups,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": unet.out_channels,
        "sample_size": cfg.default_size // cfg.vae.downscale,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        "use_linear_projection": unet.use_linear_in_transformer,
        # fp16 attention scores overflow in SD 2.x without it (as stable-diffusion-2-1 sets)
        "upcast_attention": cfg.family.startswith("sd2"),
    }
    if any(d != 1 for d in depths):
        config["transformer_layers_per_block"] = depths
    if unet.adm_in_channels is not None:
        pooled = cfg.text_encoders[-1].projection_dim or cfg.text_encoders[-1].hidden_size
        numbers = 5 if cfg.family == "sdxl-refiner" else 6  # sizes, crop (and aesthetic score)
        config.update(
            addition_embed_type="text_time",
            addition_embed_type_num_heads=64,
            addition_time_embed_dim=(unet.adm_in_channels - pooled) // numbers,
            projection_class_embeddings_input_dim=unet.adm_in_channels,
        )
    return config


def vae_config(cfg: ModelConfig) -> dict:
    vae = cfg.vae
    if vae.shift_factor or not vae.use_quant_conv or vae.z_channels != vae.embed_dim:
        raise UserError("this VAE has no Stable Diffusion AutoencoderKL configuration")
    levels = len(vae.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [vae.ch * m for m in vae.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": vae.in_channels,
        "latent_channels": vae.z_channels,
        "layers_per_block": vae.num_res_blocks,
        "norm_num_groups": vae.norm_groups,
        "out_channels": vae.out_ch,
        "sample_size": cfg.default_size,
        "scaling_factor": vae.scale_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_config(text: TextConfig, dtype_name: str, sdxl: bool = False) -> dict:
    openclip = text.kind == "openclip"
    # diffusers' SD 2.x text encoder ends at the penultimate block (SDXL's bigG keeps them all)
    layers = text.num_hidden_layers - (1 if openclip and not sdxl else 0)
    projection = text.projection_dim or text.hidden_size
    return {
        "architectures": ["CLIPTextModelWithProjection" if sdxl and openclip else "CLIPTextModel"],
        "attention_dropout": 0.0,
        # the model repositories' ids: eos 2 makes transformers pool at the highest id (the end)
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "layer_norm_eps": text.layer_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "model_type": "clip_text_model",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "torch_dtype": dtype_name,
        "vocab_size": text.vocab_size,
    }


def _tokenizer_configs(folder: str, text: TextConfig) -> dict[str, dict]:
    pad = OPENCLIP_PAD if text.pad_token_id == 0 else SD1_PAD
    special = {
        "content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
        "single_word": False,
    }  # fmt: skip
    end = {**special, "content": "<|endoftext|>"}
    tokens = {"bos_token": special, "eos_token": end, "pad_token": pad, "unk_token": end}
    config = {
        "add_prefix_space": False,
        **{k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v)
           for k, v in tokens.items()},
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": text.max_position_embeddings,
        "tokenizer_class": "CLIPTokenizer",
    }  # fmt: skip
    return {
        f"{folder}/special_tokens_map.json": tokens,
        f"{folder}/tokenizer_config.json": config,
    }


def scheduler_config(cfg: ModelConfig, cls: str) -> dict:
    if cfg.prediction not in _PREDICTIONS:
        raise UserError(f"a {cfg.prediction}-prediction model has no diffusers SD scheduler")
    config = {
        "_class_name": cls,
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": cfg.schedule.beta_end,
        "beta_schedule": "scaled_linear",
        "beta_start": cfg.schedule.beta_start,
        "clip_sample": False,
        "num_train_timesteps": cfg.schedule.num_train_timesteps,
        "prediction_type": _PREDICTIONS[cfg.prediction],
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if cls == "EulerDiscreteScheduler":
        config.update(interpolation_type="linear", sample_max_value=1.0)
        config.update(timestep_spacing="leading", use_karras_sigmas=False)
    return config
