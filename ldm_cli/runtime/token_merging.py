"""`--token-merging RATIO`: fewer tokens in the U-Net's full-resolution self-attention (ToMe).

Bolya and Hoffman ("Token Merging for Fast Stable Diffusion", 2023): neighbouring latent pixels
are often nearly the same, so before the self-attention of each transformer block at the
latent's full resolution, a fraction RATIO of its h*w tokens is merged (averaged) into similar
ones, attention runs on what is left, and every merged token then takes the output of the token
it was merged into. The partition is ToMe's: one destination token per 2x2 cell (at a position
drawn from a seeded CPU generator, so a seed gives the same image on every device), every other
token a source; the RATIO * h*w sources most similar (cosine) to some destination join it.
Cross-attention and the MLP see all tokens, as in ToMe for SD's default.

At 0.5 the self-attention of those blocks computes a quarter of the scores; the image changes
slightly (measured costs in docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ldm_cli.core.errors import UserError

if TYPE_CHECKING:  # torch is not imported here: the CLI checks the ratio before loading it
    import torch

MAX_RATIO = 0.9
CELL = 2
PARTITION_SEED = 0

Merge = Callable[["torch.Tensor"], "torch.Tensor"]


def check_token_merging(ratio: float) -> None:
    if not 0.0 <= ratio <= MAX_RATIO:
        raise UserError(f"--token-merging must be within [0, {MAX_RATIO}], got {ratio}")


class TokenMerger:
    """Plans the merges of one sampling run's full-resolution blocks."""

    def __init__(self, ratio: float, height: int, width: int):
        import torch

        self.ratio = ratio
        self.height, self.width = height, width
        self.generator = torch.Generator("cpu").manual_seed(PARTITION_SEED)

    def applies(self, x: torch.Tensor) -> bool:
        return x.shape[1] == self.height * self.width and min(self.height, self.width) >= CELL

    def plan(self, x: torch.Tensor) -> tuple[Merge, Merge]:
        """(merge, unmerge) for tokens x [B, h*w, C]: merge maps [B, h*w, D] to
        [B, h*w - r, D], unmerge maps the result of the attention back to [B, h*w, D]."""
        import torch
        import torch.nn.functional as F

        sources, destinations = self.partition(x.device)
        count = min(int(self.ratio * x.shape[1]), len(sources))
        metric = F.normalize(x, dim=-1)
        scores = metric[:, sources] @ metric[:, destinations].transpose(1, 2)
        best, target = scores.max(dim=-1)  # each source's most similar destination
        order = best.argsort(dim=-1, descending=True, stable=True)
        moved, kept = order[:, :count], order[:, count:]
        moved_target = target.gather(1, moved)

        def rows(index: torch.Tensor, width: int) -> torch.Tensor:
            return index[..., None].expand(-1, -1, width)

        def merge(t: torch.Tensor) -> torch.Tensor:
            width = t.shape[-1]
            src, dst = t[:, sources], t[:, destinations]
            joined = dst.scatter_reduce(
                1, rows(moved_target, width), src.gather(1, rows(moved, width)), reduce="mean"
            )
            return torch.cat([src.gather(1, rows(kept, width)), joined], dim=1)

        def unmerge(t: torch.Tensor) -> torch.Tensor:
            width = t.shape[-1]
            kept_out, dst = t[:, : kept.shape[1]], t[:, kept.shape[1] :]
            src = t.new_empty(t.shape[0], len(sources), width)
            src.scatter_(1, rows(kept, width), kept_out)
            src.scatter_(1, rows(moved, width), dst.gather(1, rows(moved_target, width)))
            out = t.new_empty(t.shape[0], self.height * self.width, width)
            out[:, sources] = src
            out[:, destinations] = dst
            return out

        return merge, unmerge

    def partition(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat token indices of the sources and of one destination per whole 2x2 cell."""
        import torch

        rows, cols = self.height // CELL, self.width // CELL
        offset = torch.randint(CELL * CELL, (rows, cols), generator=self.generator)
        cell_y = torch.arange(rows)[:, None] * CELL + offset // CELL
        cell_x = torch.arange(cols)[None, :] * CELL + offset % CELL
        destinations = (cell_y * self.width + cell_x).flatten()
        is_source = torch.ones(self.height * self.width, dtype=torch.bool)
        is_source[destinations] = False
        sources = is_source.nonzero().flatten()
        return sources.to(device), destinations.to(device)


@contextmanager
def token_merging(unet, ratio: float, height: int, width: int) -> Iterator[None]:
    """Within the block, the self-attention of `unet`'s transformer blocks at h x w tokens
    (the latent's own resolution) runs on merged tokens; ratio 0: unchanged."""
    check_token_merging(ratio)
    if ratio == 0:
        yield
        return
    unet.use_token_merger(TokenMerger(ratio, height, width))
    try:
        yield
    finally:
        unet.use_token_merger(None)
