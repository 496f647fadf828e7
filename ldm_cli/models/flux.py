"""FLUX.1's transformer (Black Forest Labs' ``flux/model.py``), with BFL's checkpoint keys.

`FluxTransformer` takes and returns latents [B, 16, H, W]: it packs them into 2x2 patches
(diffusers' ``FluxPipeline._pack_latents`` order, BFL's ``b c (h ph) (w pw) -> b (h w) (c ph
pw)``), places them with (0, row, column) position ids next to the text's zero ids, and unpacks
the velocity it predicts.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_cli.core.flow_config import FluxConfig
from ldm_cli.models.flux_blocks import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    rope,
)
from ldm_cli.models.unet_blocks import timestep_embedding
from ldm_cli.ops.conv_linear import Linear

PATCH = 2
TIME_EMBED_DIM = 256
TIME_FACTOR = 1000.0  # sigma in [0, 1] -> the [0, 1000] scale the embeddings were trained on


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C * 4], each token a 2x2 patch (channel-major)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, features = tokens.shape
    c = features // (PATCH * PATCH)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """(0, row, column) for each token of a rows x cols grid, row-major: [rows * cols, 3]."""
    grid = torch.cartesian_prod(
        torch.arange(rows, device=device), torch.arange(cols, device=device)
    )
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)


class FluxTransformer(nn.Module):
    """Double-stream then single-stream blocks over text and image tokens; predicts the flow
    velocity of latents [B, 16, H, W] (H, W even)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of {cfg.num_heads}")
        head_dim = cfg.hidden_size // cfg.num_heads
        if sum(cfg.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {cfg.axes_dim} must add up to the head width {head_dim}")
        self.config = cfg
        self.img_in = Linear(cfg.in_channels, cfg.hidden_size)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, cfg.hidden_size)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, cfg.hidden_size)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, cfg.hidden_size)
        self.txt_in = Linear(cfg.context_in_dim, cfg.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
            for _ in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio)
            for _ in range(cfg.depth_single_blocks)
        )
        self.final_layer = LastLayer(cfg.hidden_size, cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        # a bias: never kept narrow (loading may leave large weights in the file's type)
        return self.img_in.bias.dtype

    def _embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Scaled in the compute dtype, as BFL's sampler and diffusers both pass it (in bf16 the
        # time is rounded before the factor).
        t = t.to(dtype) * TIME_FACTOR
        return timestep_embedding(t, TIME_EMBED_DIM).to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [B, 16, H, W] at flow time `sigma` [B] in [0, 1], from T5 features
        `context` [B, L, 4096], CLIP's pooled `y` [B, 768] and, for guidance-distilled models,
        the guidance scale `guidance` [B]."""
        cfg = self.config
        if cfg.guidance_embed and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled: it needs `guidance`")
        if not cfg.guidance_embed and guidance is not None:
            raise ValueError("this FLUX model takes no `guidance` (it was not guidance-distilled)")
        height, width = x.shape[-2:]
        if height % PATCH or width % PATCH:
            raise ValueError(f"latent height and width must be even, got {height}x{width}")
        dtype = self.dtype
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch)

        img = self.img_in(pack_latents(x.to(dtype)))
        vec = self.time_in(self._embed_time(sigma, dtype))
        if cfg.guidance_embed:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(batch)
            vec = vec + self.guidance_in(self._embed_time(guidance, dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(context.to(dtype))

        ids = torch.cat(
            [
                torch.zeros(txt.shape[1], 3, dtype=torch.long, device=x.device),
                image_ids(height // PATCH, width // PATCH, device=x.device),
            ]
        )
        pe = rope(ids, cfg.axes_dim, cfg.theta)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        tokens = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            tokens = block(tokens, vec, pe)
        img = self.final_layer(tokens[:, txt.shape[1] :], vec)
        return unpack_latents(img, height, width).to(x.dtype)
