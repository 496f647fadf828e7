"""Seeded random checkpoints for parity tests and benchmarks (no real weights exist here)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoint_save import save_checkpoint
from .config import ModelConfig


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter with seeded values that keep activations O(1).

    Norm scales become ~1, biases small, weights uniform with a fan-in bound; unlike the
    original init no layer is left at zero, so every code path is exercised.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim == 1 and ("norm" in name or name.endswith("ln_1.weight") or "layer_norm" in name):
            values = (
                1 + 0.1 * torch.randn(p.shape, generator=gen)
                if name.endswith("weight")
                else (0.1 * torch.randn(p.shape, generator=gen))
            )
        elif p.ndim == 1:
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
) -> Path:
    """Write a checkpoint of `cfg` with seeded random weights in the original layout."""
    from .models.latent_diffusion import LatentDiffusion

    path = Path(path)
    model = randomize_(LatentDiffusion(cfg), seed)
    state = model.state_dict()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        cfg.text.max_position_embeddings
    )[None]
    return save_checkpoint(state, path, cfg if with_metadata else None, dtype)
