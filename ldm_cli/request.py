"""What decides an image besides the model, and the seed + k rule of multi-image runs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace

from .samplers import SAMPLERS


@dataclass(frozen=True)
class Request:
    """Everything that decides an image, besides the model."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    cfg: float = 7.5
    seed: int = 0
    sampler: str = "euler_a"
    scheduler: str = "auto"
    width: int = 512
    height: int = 512
    rescale_cfg: float = 0.0  # guidance rescale PHI (--rescale-cfg; ldm_cli.cfg_rescale)
    deep_cache: int = 0  # reuse deep U-Net features N-1 calls in N (--deep-cache; 0, 1: off)
    token_merging: float = 0.0  # ratio of merged self-attention tokens (--token-merging)

    @property
    def spacing(self) -> str:
        return (
            SAMPLERS[self.sampler].default_spacing if self.scheduler == "auto" else self.scheduler
        )


def random_seed() -> int:
    return secrets.randbelow(2**32)


def seeded_batches(base: Request, num_images: int, batch_size: int) -> list[list[Request]]:
    """Image k of a run uses seed + k, whatever the batch size it is rendered in."""
    reqs = [replace(base, seed=base.seed + k) for k in range(num_images)]
    step = max(1, batch_size)
    return [reqs[i : i + step] for i in range(0, len(reqs), step)]


__all__ = ["Request", "random_seed", "seeded_batches"]
