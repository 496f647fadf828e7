"""The ModelConfig of a diffusers Stable Diffusion pipeline folder, from its JSON files (the
reverse of diffusers_layout_configs; the shapes of the tensors are checked against it later)."""

from __future__ import annotations

from dataclasses import replace

from ldm_cli.checkpoints.diffusers_layout_configs import OPENCLIP_PAD, PIPELINES
from ldm_cli.core.config import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from ldm_cli.core.errors import UserError

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
# the pipelines ldm writes, and the img2img one some SD 1.x/2.x repositories name
READABLE = {*PIPELINES.values(), "StableDiffusionImg2ImgPipeline"}


def pipeline_family(index: dict, in_channels: int) -> str:
    """sd1, sd2, sdxl (-inpaint) or sdxl-refiner, from model_index.json and the U-Net."""
    cls = index.get("_class_name")
    if cls not in READABLE:
        raise UserError(f"model_index.json: {cls!r} is not a Stable Diffusion (XL) pipeline")
    if "XL" not in cls:
        return "sd"
    if not listed(index, "text_encoder"):
        return "sdxl-refiner"
    return "sdxl-inpaint" if in_channels == 9 else "sdxl"


def listed(index: dict, part: str) -> bool:
    """model_index.json names a class for `part` (``[null, null]`` where a pipeline has none)."""
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def model_config(configs: dict[str, dict], sd2_projection: int | None = None) -> ModelConfig:
    """`configs`: each JSON file by its path in the folder (model_index.json, unet/config.json,
    vae/config.json, text_encoder(_2)/config.json, scheduler/scheduler_config.json, and the
    tokenizers' tokenizer_config.json where present). `sd2_projection`: the width of an SD 2.x
    text_projection kept beside the parts (diffusers' own folders lose it)."""
    unet_json = configs["unet/config.json"]
    family = pipeline_family(configs["model_index.json"], unet_json.get("in_channels", 4))
    vae = vae_config(configs["vae/config.json"])
    if family == "sd":
        text_json = configs["text_encoder/config.json"]
        openclip = text_json.get("hidden_act") == "gelu"  # OpenAI's CLIP uses quick_gelu
        text = text_config(text_json, "text_encoder/config.json", openclip, False)
        if openclip:  # diffusers dropped the tower's last block; ldm's model keeps it
            width = sd2_projection or text.hidden_size
            text = replace(text, num_hidden_layers=text.num_hidden_layers + 1, projection_dim=width)
        family = "sd2" if openclip else "sd1"
        texts = (_with_pad(text, configs.get("tokenizer/tokenizer_config.json")),)
        conditioner = False
        if unet_json.get("in_channels", 4) == 9:
            family += "-inpaint"
    else:
        texts = []
        if family != "sdxl-refiner":
            clip = text_config(configs["text_encoder/config.json"], "text_encoder", False, True)
            texts.append(_with_pad(clip, configs.get("tokenizer/tokenizer_config.json")))
        bigg = text_config(configs["text_encoder_2/config.json"], "text_encoder_2", True, True)
        texts.append(_with_pad(bigg, configs.get("tokenizer_2/tokenizer_config.json")))
        texts = tuple(texts)
        conditioner = True
    unet = unet_config(unet_json, family)
    scheduler = configs["scheduler/scheduler_config.json"]
    prediction = _PREDICTIONS.get(scheduler.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(
            f"scheduler_config.json: prediction_type {scheduler['prediction_type']!r} is not "
            "epsilon or v_prediction"
        )
    if scheduler.get("beta_schedule", "linear") != "scaled_linear":
        raise UserError(
            f"scheduler_config.json: beta_schedule {scheduler.get('beta_schedule')!r} is not "
            "Stable Diffusion's scaled_linear"
        )
    schedule = ScheduleConfig(
        beta_start=float(scheduler.get("beta_start", 0.0001)),
        beta_end=float(scheduler.get("beta_end", 0.02)),
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
    )
    return ModelConfig(
        family=family,
        unet=unet,
        vae=vae,
        text=texts[0],
        text2=texts[1] if len(texts) > 1 else None,
        conditioner=conditioner,
        prediction=prediction,
        schedule=schedule,
        default_size=int(unet_json.get("sample_size", 64)) * vae.downscale,
    )


def unet_config(config: dict, family: str) -> UNetConfig:
    where = "unet/config.json"
    _refuse(config, where, {
        "act_fn": "silu", "class_embed_type": None, "num_class_embeds": None,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default", "flip_sin_to_cos": True, "freq_shift": 0,
        "encoder_hid_dim_type": None, "time_cond_proj_dim": None, "dual_cross_attention": False,
    })  # fmt: skip
    widths = _ints(config.get("block_out_channels", [320, 640, 1280, 1280]), where)
    levels = len(widths)
    down = config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    if len(down) != levels or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise UserError(f"{where}: unsupported down_block_types {down}")
    attention = [t == "CrossAttnDownBlock2D" for t in down]
    if any(_per_level(config.get("only_cross_attention", False), levels)):
        raise UserError(f"{where}: only_cross_attention is not Stable Diffusion's U-Net")
    depths = _per_level(config.get("transformer_layers_per_block", 1), levels)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    if isinstance(heads, int):
        num_heads, head_channels = heads, -1
    else:
        per_level = _per_level(heads, levels)
        channels = {w // h for w, h in zip(widths, per_level, strict=True)}
        if len(channels) == 1:  # heads of one width (SD 2.x, SDXL: 64)
            num_heads, head_channels = 8, channels.pop()
        elif len(set(per_level)) == 1:  # as many heads at every level (SD 1.x)
            num_heads, head_channels = per_level[0], -1
        else:
            raise UserError(f"{where}: attention heads {per_level} of unequal widths")
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise UserError(f"{where}: layers_per_block must be one number, got {layers}")
    adm = None
    if config.get("addition_embed_type") == "text_time":
        adm = int(config["projection_class_embeddings_input_dim"])
    elif config.get("addition_embed_type") is not None:
        raise UserError(f"{where}: addition_embed_type {config['addition_embed_type']!r}")
    if widths[0] <= 0 or any(w % widths[0] for w in widths):
        raise UserError(f"{where}: block_out_channels {widths} are not multiples of the first")
    return UNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=layers,
        attention_resolutions=tuple(
            sorted((2**lv for lv in range(levels) if attention[lv]), reverse=True)
        ),  # fmt: skip
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=tuple(d if a else 0 for d, a in zip(depths, attention, strict=True)),
        transformer_depth_middle=depths[-1],
        context_dim=int(config.get("cross_attention_dim", 1280)),
        use_linear_in_transformer=bool(config.get("use_linear_projection", False)),
        adm_in_channels=adm,
        norm_groups=int(config.get("norm_num_groups", 32)),
    )


def vae_config(config: dict) -> VAEConfig:
    where = "vae/config.json"
    _refuse(config, where, {"act_fn": "silu", "use_quant_conv": True,
                            "use_post_quant_conv": True, "shift_factor": None})  # fmt: skip
    widths = _ints(config.get("block_out_channels", [64]), where)
    if widths[0] <= 0 or any(w % widths[0] for w in widths):
        raise UserError(f"{where}: block_out_channels {widths} are not multiples of the first")
    latent = int(config.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(config.get("in_channels", 3)),
        out_ch=int(config.get("out_channels", 3)),
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=int(config.get("layers_per_block", 1)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(config.get("norm_num_groups", 32)),
        scale_factor=float(config.get("scaling_factor") or 0.18215),
    )


def text_config(config: dict, where: str, openclip: bool, sdxl: bool) -> TextConfig:
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise UserError(f"{where}: {config.get('model_type')!r} is not a CLIP text model")
    try:
        return TextConfig(
            vocab_size=int(config.get("vocab_size", 49408)),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 77)),
            hidden_act=str(config.get("hidden_act", "quick_gelu")),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            pad_token_id=0 if openclip else 49407,
            clip_skip=2 if openclip or sdxl else 1,
            kind="openclip" if openclip else "clip",
            projection_dim=int(config.get("projection_dim", 0)) or None if openclip else None,
        )
    except KeyError as missing:
        raise UserError(f"{where}: no {missing.args[0]}") from None


def _with_pad(text: TextConfig, tokenizer: dict | None) -> TextConfig:
    """The pad id the pipeline's tokenizer uses: "!" (0) for OpenCLIP's, the end token else."""
    if tokenizer is None:
        return text
    pad = tokenizer.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return replace(text, pad_token_id=0 if pad == OPENCLIP_PAD else 49407)


def _refuse(config: dict, where: str, expected: dict) -> None:
    for name, value in expected.items():
        if name in config and config[name] != value and not (value is None and not config[name]):
            raise UserError(f"{where}: {name} {config[name]!r} is not Stable Diffusion's")


def _ints(values, where: str) -> list[int]:
    if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
        raise UserError(f"{where}: expected a list of whole numbers, got {values!r}")
    return values


def _per_level(value, levels: int) -> list:
    if isinstance(value, list | tuple):
        if len(value) != levels:
            raise UserError(f"expected one value per U-Net level ({levels}), got {list(value)}")
        return list(value)
    return [value] * levels
