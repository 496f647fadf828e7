"""A batch's prompt conditioning over the steps of a run, and the U-Net context of each step.

Each image of a batch has one or more sub-prompts (``AND``) with weights; each sub-prompt has
a schedule of features (prompt editing and alternation change them with the step). At a
sampler step the guidance closure asks for the context of every row of its one batched U-Net
call: ``[uncond (B rows), sub-prompt 1 (B rows), ..., sub-prompt K (B rows)]``.

Rows must share a length to be batched. As in A1111, conditioning rows of different lengths
are evened by repeating their last vector, and then the positive and the negative side by
appending chunks of the empty prompt to the shorter one (A1111's "pad prompt/negative
prompt"). An image with fewer sub-prompts than another repeats its last one with weight 0, so
that every block holds B rows in image order (what the U-Net wrappers that concatenate
per-image inputs expect).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ldm_cli.text.grammar import entry_index


@dataclass(frozen=True)
class ScheduledFeatures:
    """One prompt over a run: `features[i]` ([L, D]) applies up to step `ends[i]`."""

    ends: tuple[int, ...]
    features: tuple[torch.Tensor, ...]

    @classmethod
    def fixed(cls, features: torch.Tensor) -> ScheduledFeatures:
        return cls((sys.maxsize,), (features,))

    def index_at(self, step: int) -> int:
        return entry_index(self.ends, step)


SubPrompts = list[tuple[ScheduledFeatures, float]]


@dataclass
class PromptBatch:
    """The conditioning of B images: per image, its sub-prompts with their AND weights.

    `empty` is the empty prompt's features [77, D], present when some rows (of this batch
    or of the other side of the guidance) can differ in length. It may be narrower than the
    rows ([77, D'] with D' < D): rows that carry per-row features after the text features
    (SDXL's packed rows, pipeline.tasks.sdxl) are padded with the empty prompt's text features
    followed by the row's own trailing features (those of its first position).
    """

    images: list[SubPrompts]
    empty: torch.Tensor | None = None

    @classmethod
    def fixed(cls, context: torch.Tensor) -> PromptBatch:
        """Unchanging context [B, L, D], one sub-prompt of weight 1 per image."""
        return cls([[(ScheduledFeatures.fixed(row), 1.0)] for row in context])

    @property
    def plain_weights(self) -> bool:
        """One sub-prompt of weight 1 per image: guidance is ordinary CFG."""
        return all(len(parts) == 1 and parts[0][1] == 1.0 for parts in self.images)

    @property
    def depth(self) -> int:
        return max(len(parts) for parts in self.images)

    def lengths(self) -> set[int]:
        return {f.shape[0] for parts in self.images for s, _ in parts for f in s.features}

    def weights(self) -> list[list[float]]:
        """`weights[k][b]`: the weight of image b's sub-prompt k (0 where it has none)."""
        return [
            [parts[k][1] if k < len(parts) else 0.0 for parts in self.images]
            for k in range(self.depth)
        ]

    def selection(self, step: int) -> tuple[int, ...]:
        """Which entry of every (sub-prompt, image) row applies at `step`, in row order."""
        return tuple(self._row(k, b).index_at(step) for k, b in self._row_keys())

    def rows(self, step: int) -> list[torch.Tensor]:
        return [
            schedule.features[schedule.index_at(step)]
            for schedule in (self._row(k, b) for k, b in self._row_keys())
        ]

    def _row_keys(self):
        return ((k, b) for k in range(self.depth) for b in range(len(self.images)))

    def _row(self, k: int, b: int) -> ScheduledFeatures:
        parts = self.images[b]
        return parts[min(k, len(parts) - 1)][0]


@dataclass
class GuidanceContext:
    """The U-Net context of each step for conditioning and (optionally) unconditioning."""

    cond: PromptBatch
    uncond: PromptBatch | None
    _cached: tuple[tuple, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.uncond is not None and len(self.uncond.images) != len(self.cond.images):
            raise ValueError("conditioning and unconditioning differ in batch size")

    def at(self, step: int) -> torch.Tensor:
        """[(1 if uncond) * B + K * B, L, D] for the step; rebuilt only when it changes."""
        key = (self.cond.selection(step), self.uncond.selection(step) if self.uncond else None)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._build(step))
        return self._cached[1]

    def _build(self, step: int) -> torch.Tensor:
        cond = _same_length(self.cond.rows(step))
        if self.uncond is None:
            return torch.stack(cond)
        uncond = _same_length(self.uncond.rows(step))
        empty = self.cond.empty if self.cond.empty is not None else self.uncond.empty
        length = max(cond[0].shape[0], uncond[0].shape[0])
        return torch.stack(_pad_to(uncond, length, empty) + _pad_to(cond, length, empty))


def _same_length(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """A1111's stack_conds: shorter rows repeat their last vector up to the longest."""
    longest = max(row.shape[0] for row in rows)
    return [
        row
        if row.shape[0] == longest
        else torch.cat([row, row[-1:].expand(longest - len(row), -1)])
        for row in rows
    ]


def _pad_to(
    rows: list[torch.Tensor], length: int, empty: torch.Tensor | None
) -> list[torch.Tensor]:
    """Rows of one side extended by empty-prompt chunks to `length` (a multiple of 77)."""
    missing = length - rows[0].shape[0]
    if missing <= 0:
        return rows
    if empty is None or missing % empty.shape[0]:
        raise ValueError("conditioning and unconditioning differ in length")
    tail = empty.repeat(missing // empty.shape[0], 1)
    width = tail.shape[-1]
    return [
        torch.cat(
            [row, tail if width == row.shape[-1] else _with_trailing(tail.to(row.dtype), row)]
        )
        for row in rows
    ]


def _with_trailing(tail: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """`tail` [n, D'] widened to the row's width with the row's features after D' (the same
    at every position of a packed row)."""
    rest = row[0, tail.shape[-1] :]
    return torch.cat([tail, rest[None].expand(tail.shape[0], -1)], dim=-1)
