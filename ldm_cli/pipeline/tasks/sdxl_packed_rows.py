"""SDXL conditioning as packed rows, and the U-Net wrapper that unpacks them.

The rest of the code (guidance, img2img, prompt batching) moves conditioning around as tensors
``[B, L, D]`` and only ever cuts, pads and concatenates them along the batch and the token axes. An
SDXL conditioning row therefore carries ``y`` *after the features of every token*: ``[B, L,
context_dim + adm_in_channels]`` (:func:`pack`). :class:`PackedConditioningUNet`, the U-Net of
:class:`ldm_cli.pipeline.tasks.sdxl.SDXLPipeline`, splits it again (``y`` from the first token), so
all of that machinery carries ``y`` unchanged. With a refiner attached
(:mod:`ldm_cli.pipeline.tasks.refiner`) each row holds the base's and the refiner's text features,
then the base's and the refiner's ``y`` (:func:`merge_rows`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm_cli.core.config import UNetConfig

if TYPE_CHECKING:
    from ldm_cli.pipeline.tasks.handover import Refiner


def pack(context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, L, D] and [B, A] -> [B, L, D + A]: `y` repeated after every token's features."""
    return torch.cat(
        [context, y[:, None, :].to(context.dtype).expand(-1, context.shape[1], -1)], -1
    )


def unpack(rows: torch.Tensor, context_dim: int, adm_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack`: (context [B, L, D], y [B, A] from the first token)."""
    return rows[..., :context_dim], rows[:, 0, context_dim : context_dim + adm_dim]


def merge_rows(
    base: torch.Tensor, base_context_dim: int, refiner: torch.Tensor, refiner_context_dim: int
) -> torch.Tensor:
    """Packed rows [B, L, ...] of the base and the refiner -> [B, L, base text, refiner text,
    base y, refiner y]. Rows of different lengths (an embedding that only one model knows)
    are evened by repeating their last vector, as A1111 evens conditioning."""
    length = max(base.shape[1], refiner.shape[1])
    base, refiner = (_repeat_last(rows, length) for rows in (base, refiner))
    refiner = refiner.to(base.device, base.dtype)
    return torch.cat(
        [
            base[..., :base_context_dim],
            refiner[..., :refiner_context_dim],
            base[..., base_context_dim:],
            refiner[..., refiner_context_dim:],
        ],
        dim=-1,
    )


def _repeat_last(rows: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - rows.shape[1]
    if missing <= 0:
        return rows
    return torch.cat([rows, rows[:, -1:].expand(-1, missing, -1)], dim=1)


def packed_width(unet: UNetConfig) -> int:
    """Width of a packed row: the context features, then the ADM vector."""
    assert unet.adm_in_channels is not None
    return unet.context_dim + unet.adm_in_channels


class PackedConditioningUNet(nn.Module):
    """The U-Net as `Pipeline.sample` calls it: ``(x, t, context=packed rows)``.

    It splits each row into context and ``y`` (:func:`unpack`). With a refiner attached, calls
    at timesteps below the refiner's cutoff go to the refiner's U-Net with the refiner's part of
    the rows (see :mod:`ldm_cli.pipeline.tasks.refiner`); everything else reaches the base U-Net.
    """

    def __init__(self, unet: nn.Module, refiner: Refiner | None = None):
        super().__init__()
        self.unet = unet
        self.refiner_unet = refiner.pipe.model.unet if refiner is not None else None
        self.cutoff = refiner.cutoff if refiner is not None else None

    @property
    def config(self):
        return self.unet.config

    @property
    def input_blocks(self):
        return self.unet.input_blocks

    def use_feature_cache(self, cache) -> None:
        """DeepCache on the base U-Net (a refiner's calls compute every block)."""
        self.unet.use_feature_cache(cache)

    def use_token_merger(self, merger) -> None:
        for unet in (self.unet, self.refiner_unet):
            if unet is not None:
                unet.use_token_merger(merger)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: list[torch.Tensor] | None = None,
        adapter: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`control`, `adapter`: ControlNet residuals and T2I-Adapter features for the base
        U-Net (the refiner takes none)."""
        cfg = self.unet.config
        if y is not None or context is None or context.shape[-1] == cfg.context_dim:
            return self.unet(x, timesteps, context, y, control, adapter)  # as the plain U-Net
        if self.refiner_unet is None:
            inner, y = unpack(context, cfg.context_dim, cfg.adm_in_channels)
            return self.unet(x, timesteps, inner, y, control, adapter)
        # [base text, refiner text, base y, refiner y] (merge_rows)
        rcfg = self.refiner_unet.config
        texts = cfg.context_dim + rcfg.context_dim
        if _below(timesteps, self.cutoff):
            start = texts + cfg.adm_in_channels
            ry = context[:, 0, start : start + rcfg.adm_in_channels]
            return self.refiner_unet(x, timesteps, context[..., cfg.context_dim : texts], ry)
        inner, y = self.split(context)
        return self.unet(x, timesteps, inner, y, control, adapter)

    def split(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed rows -> the base U-Net's (context, y)."""
        cfg = self.unet.config
        if context.shape[-1] == cfg.context_dim:
            return context, None
        if self.refiner_unet is None:
            return unpack(context, cfg.context_dim, cfg.adm_in_channels)
        texts = cfg.context_dim + self.refiner_unet.config.context_dim
        return context[..., : cfg.context_dim], context[:, 0, texts : texts + cfg.adm_in_channels]


def _below(timesteps: torch.Tensor, cutoff: float) -> bool:
    """Whether the call's timestep (shared by its rows) is below `cutoff` (one host read)."""
    t = torch.as_tensor(timesteps).reshape(-1)
    return float(t[0]) < cutoff
