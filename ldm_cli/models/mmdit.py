"""Stable Diffusion 3 / 3.5's MMDiT (SD 3.5 Medium: MMDiT-X), laid out as Stability's original.

``MMDiT(cfg).state_dict()`` has exactly the keys under ``model.diffusion_model.`` in a released
single file, so the weights load with ``load_state_dict(sd, strict=True, assign=True)`` into a
model built under ``torch.device("meta")``. ``pos_embed`` is a stored (fixed) table of
``pos_embed_max_size``^2 positions, kept as a parameter so it loads with the rest; each image
uses its centre crop.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.flow_config import MMDiTConfig
from ldm_cli.models.mmdit_blocks import (
    FinalLayer,
    JointBlock,
    PatchEmbed,
    TimestepEmbedder,
    VectorEmbedder,
)
from ldm_cli.ops.conv_linear import Linear

HEAD_DIM = 64  # every released SD3 / 3.5 model
TIMESTEP_SCALE = 1000  # the model was trained on timesteps sigma * 1000


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_heads")
        bad = [i for i in cfg.x_block_self_attn_layers if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} outside the {cfg.depth} blocks")
        self.config = cfg
        hidden = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = VectorEmbedder(cfg.adm_in_channels, hidden)
        self.context_embedder = Linear(cfg.context_in_dim, hidden)
        self.pos_embed = nn.Parameter(
            torch.zeros(1, cfg.pos_embed_max_size**2, hidden), requires_grad=False
        )
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.qk_norm,
                pre_only=i == cfg.depth - 1,
                x_block_self_attn=i in cfg.x_block_self_attn_layers,
            )
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(hidden, cfg.patch_size, cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The centre h x w patches of the stored grid: [1, h * w, hidden]."""
        size = self.config.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(
                f"a {h}x{w} patch grid exceeds the model's positional table ({size}x{size})"
            )
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.unflatten(1, (size, size))
        return grid[:, top : top + h, left : left + w].flatten(1, 2)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Velocity [B, C, H, W] of latents `x` at flow times `sigma` [B] in [0, 1], given
        `context` [B, L, context_in_dim] and the pooled vector `y` [B, adm_in_channels]."""
        cfg = self.config
        p = cfg.patch_size
        batch, _, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch {p}")
        h, w = height // p, width // p
        dtype = self.dtype

        tokens = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)
        sigma = torch.as_tensor(sigma, device=x.device).float().reshape(-1).expand(batch)
        c = self.t_embedder(sigma * TIMESTEP_SCALE) + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))
        for block in self.joint_blocks:
            ctx, tokens = block(ctx, tokens, c)
        patches = self.final_layer(tokens, c)

        out = patches.reshape(batch, h, w, p, p, cfg.out_channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(batch, cfg.out_channels, height, width)
        return out.to(x.dtype)


def mmdit_param_count(cfg: MMDiTConfig) -> int:
    """Number of parameters of ``MMDiT(cfg)`` (the stored pos_embed included), on meta."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    return sum(t.numel() for t in model.state_dict().values())
