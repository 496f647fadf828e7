"""Scaled dot-product attention in slices of queries where torch would hold all the scores.

On CPU, torch's SDPA runs a flash kernel whenever the feature axis has unit stride: its memory
does not grow with the score matrix (measured, torch 2.14: +23 MiB for 16384 tokens x 8 heads,
where the math kernel needs 8 GiB). CUDA has flash / memory-efficient kernels as well. Other
devices (MPS) may fall back to the math kernel, whose batch x heads x queries x keys scores
are all alive at once (16 GiB for SD 1.5 at 1024 x 1024 px); there the queries are split so
that each call's score matrix stays under SCORE_BUDGET elements. Every query row is computed
by the same kernel either way, so slicing changes results only by floating-point rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one call's score matrix (256 MiB in fp32; the math kernel holds ~3 such).
SCORE_BUDGET = 2**26
# Devices whose SDPA keeps memory bounded on its own (given a unit-stride feature axis).
FUSED_DEVICES = ("cpu", "cuda")


def query_slice(q: torch.Tensor, k: torch.Tensor, budget: int) -> int:
    """How many queries one call may take: q [..., n, d] and k [..., m, d]."""
    scores_per_query = q.shape[:-2].numel() * k.shape[-2]  # batch x heads x keys
    return max(1, budget // max(1, scores_per_query))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliced: bool | None = None
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` for q [..., n, d], sliced along n when the
    device has no memory-bounded kernel (`sliced` forces either way)."""
    if sliced is None:
        sliced = q.device.type not in FUSED_DEVICES
    step = query_slice(q, k, SCORE_BUDGET)
    if not sliced or q.shape[-2] <= step:
        return F.scaled_dot_product_attention(q, k, v)
    # torch.cat keeps autograd working (training); the output is small next to the scores
    parts = [
        F.scaled_dot_product_attention(q[..., start : start + step, :], k, v)
        for start in range(0, q.shape[-2], step)
    ]
    return torch.cat(parts, dim=-2)
