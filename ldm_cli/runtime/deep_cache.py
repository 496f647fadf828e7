"""`--deep-cache N`: reuse the U-Net's deep features for N-1 of every N calls (DeepCache).

Ma, Fang and Wang ("DeepCache: Accelerating Diffusion Models for Free", 2023) observed that the
output of a U-Net's deep blocks changes little from one sampling step to the next, while the
shallow, high-resolution blocks carry the fine detail. So one call in N is a full pass that
also keeps the feature map entering the last ``depth`` output blocks; the other calls run only
the first ``depth`` input blocks (for their skip connections) and those last output blocks on
the kept map. With ``depth`` 2 (the first input block after conv_in and its two partners on the
way up, as DeepCache's default for SD) a reused call costs 23% of a full one's FLOPs on SD 1.5
at 512x512 (depth 1 would cost 8%, but reuses the map entering the very last block). Outputs
change, more for larger N: measured costs are in docs/benchmarks.md.

The interval counts U-Net calls: samplers with two model calls per step (heun, dpm2) reuse
within a step too. A call with another batch shape (a hires pass) starts with a full pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ldm_cli.core.errors import UserError

if TYPE_CHECKING:  # torch is not imported here: the CLI checks --deep-cache before loading it
    import torch

DEFAULT_DEPTH = 2


class FeatureCache:
    """The kept deep feature map of one sampling run and when it may be reused."""

    def __init__(self, interval: int, depth: int = DEFAULT_DEPTH):
        self.interval = interval
        self.depth = depth
        self.features: torch.Tensor | None = None
        self.input_shape: torch.Size | None = None  # of the call that made `features`
        self.since_full = 0

    def reusable(self, x: torch.Tensor) -> bool:
        """Counts this call; True when it may run on the kept features. A full pass (False)
        is expected to `store` the new features."""
        kept = self.features is not None and x.shape == self.input_shape
        if kept and self.since_full + 1 < self.interval:
            self.since_full += 1
            return True
        self.features, self.input_shape, self.since_full = None, x.shape, 0
        return False

    def store(self, h: torch.Tensor) -> None:
        self.features = h


def check_deep_cache(interval: int) -> None:
    if interval < 0:
        raise UserError(f"--deep-cache must be 0 (off) or a number of calls >= 1, got {interval}")


@contextmanager
def deep_cache(unet, interval: int, depth: int = DEFAULT_DEPTH) -> Iterator[None]:
    """Within the block, `unet` (a UNetModel) reuses its deep features; 0 or 1: no reuse."""
    check_deep_cache(interval)
    if interval <= 1:
        yield
        return
    if len(unet.input_blocks) <= depth:
        raise UserError(f"--deep-cache needs a U-Net with more than {depth} input blocks")
    if getattr(unet, "eager_forward", None) is not None:
        raise UserError("--deep-cache does not work with --compile; use one of them")
    unet.use_feature_cache(FeatureCache(interval, depth))
    try:
        yield
    finally:
        unet.use_feature_cache(None)
