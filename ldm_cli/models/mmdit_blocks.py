"""The parts of SD3's MMDiT, named as in Stability's reference ``mmditx.py``.

Module and parameter names are the state-dict keys under ``model.diffusion_model.`` of the
released single files, and each modulation is chunked in the original's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.models.unet_blocks import timestep_embedding
from ldm_cli.ops.conv_linear import Linear

NORM_EPS = 1e-6  # the blocks' and final layer's LayerNorms and the q/k RMSNorms
FREQUENCY_EMBEDDING_SIZE = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with a learned scale; the mean square is taken in fp32."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos | sin], 256 frequencies) of the timestep, then an MLP."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            Linear(FREQUENCY_EMBEDDING_SIZE, hidden), nn.SiLU(), Linear(hidden, hidden)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class VectorEmbedder(nn.Module):
    """The pooled text vector through an MLP."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(input_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class PatchEmbed(nn.Module):
    """A strided convolution: [B, C, H, W] -> [B, (H/p) * (W/p), hidden], row-major patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, optional per-head RMSNorm of q and k, output projection
    (absent in a ``pre_only`` block, whose attention output is never used)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3)
        if not pre_only:
            self.proj = Linear(dim, dim)
        if qk_norm:
            self.ln_q = RMSNorm(head_dim)
            self.ln_k = RMSNorm(head_dim)
        else:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of `x` [B, L, dim], each [B, heads, L, head_dim]."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return (
            self.ln_q(q).transpose(1, 2),
            self.ln_k(k).transpose(1, 2),
            v.transpose(1, 2),
        )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over [B, heads, L, d] tensors, heads merged back: [B, L, heads * d]."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class DismantledBlock(nn.Module):
    """One stream of a joint block: adaLN-modulated attention inputs before the joint
    attention, gated residual attention and MLP after it.

    Modulation chunks: 6 (shift, scale, gate of the attention; shift, scale, gate of the MLP);
    ``x_block_self_attn`` appends 3 for `attn2`, a self-attention of this stream alone on the
    same normed input; ``pre_only`` (the last block's context stream) has only the attention's
    shift and scale.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool = False,
        x_block_self_attn: bool = False,
    ):
        super().__init__()
        if pre_only and x_block_self_attn:
            raise ValueError("a pre_only block has no second attention")
        self.pre_only = pre_only
        self.x_block_self_attn = x_block_self_attn
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SelfAttention(hidden, num_heads, qk_norm, pre_only=pre_only)
        if x_block_self_attn:
            self.attn2 = SelfAttention(hidden, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=NORM_EPS)
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.n_mods = 2 if pre_only else 9 if x_block_self_attn else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, self.n_mods * hidden))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """(q, k, v) of the joint attention and what `post_attention` needs."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        x_norm = self.norm1(x)
        qkv = self.attn.heads(modulate(x_norm, mods[0], mods[1]))
        return qkv, (x_norm, mods)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, saved) -> torch.Tensor:
        x_norm, mods = saved
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        if self.x_block_self_attn:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            out2 = attention(*self.attn2.heads(modulate(x_norm, shift_msa2, scale_msa2)))
            x = x + gate_msa2.unsqueeze(1) * self.attn2.proj(out2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Context and image streams attending jointly over their concatenated tokens (context
    first, as the original)."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool = False,
        x_block_self_attn: bool = False,
    ):
        super().__init__()
        self.context_block = DismantledBlock(hidden, num_heads, mlp_ratio, qk_norm, pre_only)
        self.x_block = DismantledBlock(
            hidden, num_heads, mlp_ratio, qk_norm, x_block_self_attn=x_block_self_attn
        )

    def forward(
        self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        context_qkv, context_saved = self.context_block.pre_attention(context, c)
        x_qkv, x_saved = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(context_qkv, x_qkv, strict=True))
        out = attention(q, k, v)
        n_context = context.shape[1]
        x = self.x_block.post_attention(x, out[:, n_context:], x_saved)
        if self.context_block.pre_only:
            return None, x
        context = self.context_block.post_attention(context, out[:, :n_context], context_saved)
        return context, x


class FinalLayer(nn.Module):
    """adaLN (shift, then scale) and the projection to patches of output channels."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=NORM_EPS)
        self.linear = Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
