"""Which architecture a checkpoint holds, read from its tensor shapes.

Checkpoints written by `ldm train` also carry their full configuration in the safetensors
metadata (`ldm_config`), which settles the few numbers shapes cannot tell (attention heads).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, is_dataclass

from ldm_cli.checkpoints.detect.shapes import (  # noqa: F401 (part of detection's interface)
    CLIP_L,
    UNET,
    VAE,
    count_indices,
    infer_clip_text,
    infer_unet,
    infer_vae,
    is_upscaler_unet,
    require,
    upscaler_config,
)
from ldm_cli.checkpoints.header import CheckpointHeader
from ldm_cli.core.config import (
    ModelConfig,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
)
from ldm_cli.core.errors import UserError
from ldm_cli.core.limits import MAX_SIDE

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
        from ldm_cli.checkpoints.detect.sdxl import (
            detect_sdxl,
        )  # it builds on this module's helpers

        return detect_sdxl(header)
    if header.has_prefix("cond_stage_model.model."):
        from ldm_cli.checkpoints.detect.sd2 import (
            detect_openclip,
        )  # it builds on this module's helpers

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
            flow_shift=float(raw.get("flow_shift", 1.0)),
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
    if cfg.prediction not in ("eps", "v", "flow"):
        raise ValueError(f"prediction must be eps, v or flow, got {cfg.prediction!r}")
    if not 0 < cfg.flow_shift < 100:
        raise ValueError(f"flow_shift must be a positive number, got {cfg.flow_shift}")
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
