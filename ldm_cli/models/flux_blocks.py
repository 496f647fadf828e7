"""FLUX.1's layers, with the module names of Black Forest Labs' ``flux/modules/layers.py``.

Attribute names (``img_mod.lin``, ``img_attn.qkv``, ``img_attn.norm.query_norm.scale``,
``linear1``, ``adaLN_modulation.1`` ...) are the state-dict keys of BFL's checkpoints. The
LayerNorms have no affine parameters, hence no keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_cli.ops.conv_linear import Linear

NORM_EPS = 1e-6


def rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotary angles' (cos, sin) for positions `ids` [L, n_axes]: [2, L, sum(axes_dim) / 2], fp32.

    Each axis takes its own slice of the head's feature pairs; computed in float64 and rounded
    once, as BFL's ``rope`` does (on the CPU for devices without float64: MPS).
    """
    device = ids.device
    work = ids.to("cpu") if device.type == "mps" else ids
    angles = []
    for axis, dim in enumerate(axes_dim):
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=work.device) / dim
        omega = 1.0 / (theta**scale)
        angles.append(work[:, axis].to(torch.float64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return torch.stack([angle.cos(), angle.sin()]).float().to(device)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotates the feature pairs (2i, 2i+1) of x [B, H, L, D] by the angles of `pe`, in fp32."""
    cos, sin = pe[0], pe[1]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotary attention of q, k, v [B, H, L, D]; returns [B, L, H * D]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, 3 * H * D] -> q, k, v [B, H, L, D] (BFL's ``B L (K H D) -> K B H L D``)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalization computed in fp32, cast back, then scaled (BFL's order)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        rrms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)
        return (x32 * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Holds a stream's qkv, q/k norms and output projection; the joint attention is the
    block's."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: (shift, scale, gate), twice if `double`,
    each [B, 1, dim]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor):
    return (1 + scale) * norm(x) + shift


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = layer_norm(hidden_size)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = layer_norm(hidden_size)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)

    def _qkv(self, x, attn: SelfAttention, norm: nn.Module, shift, scale):
        q, k, v = split_heads(attn.qkv(modulate(x, norm, shift, scale)), self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self._qkv(img, self.img_attn, self.img_norm1, i_shift1, i_scale1)
        txt_q, txt_k, txt_v = self._qkv(txt, self.txt_attn, self.txt_norm1, t_shift1, t_scale1)
        out = attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            pe,
        )
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]

        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * self.img_mlp(modulate(img, self.img_norm2, i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * self.txt_mlp(modulate(txt, self.txt_norm2, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over text and image tokens together: attention and MLP in parallel, from one
    input projection (`linear1`) into one output projection (`linear2`)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.linear1 = Linear(hidden_size, hidden_size * 3 + self.mlp_hidden)
        self.linear2 = Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, hidden = self.linear1(modulate(x, self.pre_norm, shift, scale)).split(
            [3 * self.hidden_size, self.mlp_hidden], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = attention(q, k, v, pe)
        return x + gate * self.linear2(torch.cat((out, self.mlp_act(hidden)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(x, self.norm_final, shift[:, None], scale[:, None]))
