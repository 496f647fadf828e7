"""Seeded random checkpoints for parity tests and benchmarks (no real weights exist here)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from ldm_cli.checkpoints.save import save_checkpoint
from ldm_cli.core.config import TINY_SD1, ModelConfig

# TINY_SD1 with one resolution level: every kind of U-Net block (ResBlock, SpatialTransformer,
# time embedding) in half the kernels, for tests that compile the U-Net
ONE_LEVEL_SD1 = TINY_SD1.with_(
    unet=replace(
        TINY_SD1.unet, channel_mult=(1,), attention_resolutions=(1,), transformer_depth=(1,)
    )
)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with seeded values that keep activations O(1).

    Norm scales become ~1, biases small, weights uniform with a fan-in bound; unlike the
    original init no layer is left at zero, so every code path is exercised.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        is_norm = "norm" in name or re.search(r"(^|\.)ln_", name)  # ln_*: open_clip's norms
        if p.ndim == 1 and is_norm:
            values = (
                1 + 0.1 * torch.randn(p.shape, generator=gen)
                if name.endswith("weight")
                else (0.1 * torch.randn(p.shape, generator=gen))
            )
        elif p.ndim <= 1:  # biases, and open_clip's scalar logit_scale
            values = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
            bound = gain * math.sqrt(3.0 / max(1, fan_in))
            if "embedding" in name:
                bound = 0.5
            values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        p.copy_(values.to(p.dtype))
    return module


def random_checkpoint(
    cfg: ModelConfig,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_metadata: bool = True,
    real_extras: bool = True,
) -> Path:
    """Write a checkpoint of `cfg` with seeded random weights in the original layout."""
    from ldm_cli.models.latent_diffusion import LatentDiffusion

    path = Path(path)
    with torch.device("meta"):  # skip the default init: every parameter is overwritten
        model = LatentDiffusion(cfg)
    model = randomize_(model.to_empty(device="cpu"), seed)
    state = model.state_dict()
    if real_extras:
        state.update(training_extras(cfg))
    return save_checkpoint(state, path, cfg if with_metadata else None, dtype)


def training_extras(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The non-parameter tensors a real CompVis checkpoint carries (schedule buffers, EMA
    bookkeeping, CLIP position ids), so loaders are tested against the real file layout."""
    s = cfg.schedule
    betas = torch.linspace(s.beta_start**0.5, s.beta_end**0.5, s.num_train_timesteps) ** 2
    betas = betas.double()
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([a.new_ones(1), a[:-1]])
    post_var = betas * (1 - a_prev) / (1 - a)
    extras = {
        "betas": betas,
        "alphas_cumprod": a,
        "alphas_cumprod_prev": a_prev,
        "sqrt_alphas_cumprod": a.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - a).log(),
        "sqrt_recip_alphas_cumprod": a.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
        "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a),
    }
    extras = {k: v.float() for k, v in extras.items()}
    if cfg.family == "x4-upscaler":
        # ImageConcatWithNoiseAugmentation's buffers; its schedule is the U-Net's (1e-4..2e-2)
        for name in (
            "betas",
            "alphas_cumprod",
            "alphas_cumprod_prev",
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "log_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
        ):
            extras[f"low_scale_model.{name}"] = extras[name].clone()
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    if cfg.text.kind == "clip":  # open_clip keeps no position ids
        position_ids = torch.arange(cfg.text.max_position_embeddings)[None]
        owner = "conditioner.embedders.0" if cfg.conditioner else "cond_stage_model"  # SDXL
        extras[f"{owner}.transformer.text_model.embeddings.position_ids"] = position_ids
    return extras
