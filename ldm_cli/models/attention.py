"""The U-Net's spatial transformer, with the module names of the original ``attention.py``.

Attribute names (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ``norm1`` ...) are the state-dict
keys of CompVis/SGM checkpoints, so weights load without renaming. Modules that only hold a
dropout in the original are ``nn.Identity`` placeholders kept so later indices stay unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.ops.attention_slicing import attention
from ldm_cli.ops.conv_linear import Linear

# The original's ``Normalize`` (plain GroupNorm) in the transformer uses a smaller eps than the
# ResBlocks' GroupNorm32 (1e-5).
TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5
FEED_FORWARD_MULT = 4


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when context is None)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (b, n, heads * d) -> (b, heads, n, d) as a view; SDPA accepts the strides.
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(source))
        v = self._split_heads(self.to_v(source))
        out = attention(q, k, v)  # sliced over queries on devices without fused kernels
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """One projection to twice the width, then value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = FEED_FORWARD_MULT):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (or cross-attention when disabled), cross-attention, GEGLU MLP."""

    # Set for the duration of a run by ldm_cli.runtime.token_merging (--token-merging).
    token_merger = None

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, heads, dim_head, context_dim=context_dim if disable_self_attn else None
        )
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, repeats: int = 1
    ) -> torch.Tensor:
        """``repeats`` > 1: ``x`` holds the rows that the batch of ``context`` repeats that many
        times (a CFG batch); self-attention runs on them once, then they are repeated."""
        if repeats > 1 and self.disable_self_attn:
            x = x.repeat(repeats, 1, 1)
        merger = self.token_merger
        if merger is not None and not self.disable_self_attn and merger.applies(x):
            merge, unmerge = merger.plan(x)
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        else:
            x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        if repeats > 1 and not self.disable_self_attn:
            x = x.repeat(repeats, 1, 1)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, ``depth`` transformer blocks over h*w tokens, project out, residual.

    ``use_linear`` selects Linear projections on tokens (SD 2.x, XL) instead of 1x1 convolutions
    on the feature map (SD 1.x).
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=TRANSFORMER_GROUPNORM_EPS)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, disable_self_attn)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, repeats: int = 1
    ) -> torch.Tensor:
        """``repeats`` > 1: ``x`` is the shared part of a batch that repeats it (see
        BasicTransformerBlock); the output has the full batch."""
        b, _, h, w = x.shape
        residual = x if repeats == 1 else x.repeat(repeats, 1, 1, 1)
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # For a channels_last input this permute + reshape is a free view.
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, repeats)
            repeats = 1
        if self.use_linear:
            x = self.proj_out(x)
        x = x.unflatten(1, (h, w)).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        # The residual goes first so the sum takes the input's memory format, without a copy of x.
        return residual + x
