"""Which architecture a checkpoint holds, read from its tensor shapes.

Checkpoints written by `ldm train` also carry their full configuration in the safetensors
metadata (`ldm_config`), which settles the few numbers shapes cannot tell (attention heads).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, fields, is_dataclass, replace

from .checkpoint_file import CheckpointHeader
from .config import X4_UPSCALER, ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from .errors import UserError
from .limits import MAX_SIDE

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer.text_model."

FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd1-inpaint": "Stable Diffusion 1.x inpainting",
    "x4-upscaler": "Stable Diffusion x4 upscaler",
    "sd2": "Stable Diffusion 2.x",
    "sd2-inpaint": "Stable Diffusion 2.x inpainting",
    "sdxl": "Stable Diffusion XL",
    "sdxl-inpaint": "Stable Diffusion XL inpainting",
    "sdxl-refiner": "Stable Diffusion XL refiner",
}


def detect_config(header: CheckpointHeader) -> ModelConfig:
    if "ldm_config" in header.metadata:
        return config_from_json(header.metadata["ldm_config"], header)
    if header.has_prefix("conditioner.embedders."):
        from .detect_sdxl import detect_sdxl  # it builds on this module's helpers

        return detect_sdxl(header)
    if header.has_prefix("cond_stage_model.model."):
        from .detect_sd2 import detect_openclip  # it builds on this module's helpers

        return detect_openclip(header)
    if not header.has_prefix(UNET + "input_blocks."):
        raise UserError(
            f"{header.path.name} is not a Stable Diffusion checkpoint "
            f"(no {UNET}* tensors; it holds e.g. {next(iter(header.tensors))!r})"
        )
    if not header.has_prefix(CLIP_L):
        raise UserError(f"{header.path.name}: unknown text encoder (no {CLIP_L}* tensors)")
    unet = infer_unet(header, num_heads=8)
    if is_upscaler_unet(unet):
        return upscaler_config(unet, infer_vae(header), infer_clip_text(header))
    family = {4: "sd1", 9: "sd1-inpaint"}.get(unet.in_channels)
    if family is None:
        raise UserError(
            f"{header.path.name}: unknown U-Net variant with {unet.in_channels} input channels"
        )
    return ModelConfig(
        family=family,
        unet=unet,
        vae=infer_vae(header),
        text=infer_clip_text(header),
        prediction="eps",
        default_size=512,
    )


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


def _count(header: CheckpointHeader, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in header.tensors if (m := rx.match(k))}
    return len(found)


def _require(header: CheckpointHeader, key: str) -> tuple[int, ...]:
    shape = header.shape(key)
    if shape is None:
        raise UserError(f"{header.path.name}: expected tensor {key!r} is missing")
    return shape


def infer_unet(header: CheckpointHeader, num_heads: int = 8, num_head_channels: int = -1):
    p = UNET
    conv_in = _require(header, p + "input_blocks.0.0.weight")
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = _require(header, p + "out.2.weight")[0]
    n_input = _count(header, re.escape(p) + r"input_blocks\.(\d+)\.")
    channel_mult, attn_res, depths, disable_self = [], [], [], []
    level, num_res_blocks, in_level = 0, None, 0
    for i in range(1, n_input):
        if header.shape(f"{p}input_blocks.{i}.0.op.weight") is not None:
            num_res_blocks = num_res_blocks or in_level
            level, in_level = level + 1, 0
            continue
        in_level += 1
        if in_level == 1:
            out = _require(header, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0]
            channel_mult.append(out // model_channels)
            depth = _count(
                header, re.escape(f"{p}input_blocks.{i}.1.transformer_blocks.") + r"(\d+)\."
            )
            depths.append(depth)
            if depth:
                attn_res.append(2**level)
                k1 = _require(
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
    mid_depth = _count(header, re.escape(p + "middle_block.1.transformer_blocks.") + r"(\d+)\.")
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
    ch = _require(header, p + "conv_in.weight")[0]
    levels = _count(header, re.escape(p + "down.") + r"(\d+)\.")
    if levels == 0:
        raise UserError(f"{header.path.name}: no VAE encoder tensors ({p}down.*)")
    mult = tuple(
        _require(header, f"{p}down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)
    )
    blocks = _count(header, re.escape(p + "down.0.block.") + r"(\d+)\.")
    z = _require(header, VAE + "decoder.conv_in.weight")[1]
    embed = _require(header, VAE + "post_quant_conv.weight")[0]
    double = _require(header, p + "conv_out.weight")[0] == 2 * z
    return VAEConfig(
        in_channels=_require(header, p + "conv_in.weight")[1],
        out_ch=_require(header, VAE + "decoder.conv_out.weight")[0],
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
    vocab, hidden = _require(header, p + "embeddings.token_embedding.weight")
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_require(header, p + "encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(header, re.escape(p + "encoder.layers.") + r"(\d+)\."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=_require(header, p + "embeddings.position_embedding.weight")[0],
        pad_token_id=pad_token_id,
    )


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_json(text: str, header: CheckpointHeader | None = None) -> ModelConfig:
    where = header.path.name if header else "config"
    try:
        raw = json.loads(text)
        cfg = ModelConfig(
            family=raw["family"],
            unet=_dataclass_from(UNetConfig, raw["unet"]),
            vae=_dataclass_from(VAEConfig, raw["vae"]),
            text=_dataclass_from(TextConfig, raw["text"]),
            prediction=raw.get("prediction", "eps"),
            schedule=_dataclass_from(ScheduleConfig, raw.get("schedule", {})),
            default_size=int(raw.get("default_size", 512)),
            default_cfg=float(raw.get("default_cfg", 7.5)),
            conditioner=bool(raw.get("conditioner", False)),
            text2=_dataclass_from(TextConfig, raw["text2"]) if raw.get("text2") else None,
        )
        _check_config(cfg)
        return cfg
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid ldm_config metadata ({e})") from e


def _check_config(cfg: ModelConfig) -> None:
    """The numbers of an ldm_config that shapes cannot check (ValueError naming the bad one)."""
    if cfg.family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {cfg.family!r}")
    if cfg.prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be eps or v, got {cfg.prediction!r}")
    size = cfg.default_size
    if not 8 <= size <= MAX_SIDE or size % 8:
        raise ValueError(f"default_size must be a multiple of 8 from 8 to {MAX_SIDE}, got {size}")
    if not math.isfinite(cfg.default_cfg):
        raise ValueError(f"default_cfg must be a finite number, got {cfg.default_cfg}")
    sched = cfg.schedule
    betas = (sched.beta_start, sched.beta_end)
    if not all(isinstance(b, (int, float)) and 0 < b < 1 for b in betas):
        raise ValueError(f"schedule betas must be numbers between 0 and 1, got {betas}")
    steps = sched.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 100_000:
        raise ValueError(f"num_train_timesteps must be a whole number from 2, got {steps!r}")


def _dataclass_from(cls, raw: dict):
    assert is_dataclass(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in raw:
            v = raw[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)
