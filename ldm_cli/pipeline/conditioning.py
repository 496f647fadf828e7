"""Prompts -> conditioning features per step, as AUTOMATIC1111 builds them.

For every distinct (sub-)prompt of a batch: its schedule of texts over the run's steps
(:mod:`ldm_cli.text.grammar`), each text's weighted 77-token chunks
(:mod:`ldm_cli.text.chunks`), the chunks encoded by the text encoder and concatenated along
the sequence, so a 150-token prompt gives 2 x 77 = 154 positions.

Emphasis is A1111's default ("Original"): the features of every token are multiplied by its
weight, then the whole chunk is rescaled so that its mean equals the mean before weighting.
As in A1111 the texts of one prompt's schedule are encoded as one batch, chunk by chunk, a
text with fewer chunks is padded with empty-prompt chunks, and the mean is taken over the
batch (one entry per schedule entry). A prompt without weights is never rescaled, so it gives
exactly the features of ``Pipeline.encode_prompts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldm_cli.pipeline.parts import PipelineParts
from ldm_cli.pipeline.request import Request
from ldm_cli.text.batch import PromptBatch, ScheduledFeatures
from ldm_cli.text.chunks import TokenChunk, empty_chunk, prompt_chunks
from ldm_cli.text.grammar import prompt_schedule, split_and
from ldm_cli.text.tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from ldm_cli.text.embeddings import EmbeddingDatabase

Encoder = Callable[[torch.Tensor], torch.Tensor]  # token ids [N, 77] -> features [N, 77, D]


@torch.inference_mode()
def encode_requests(
    pipe: PipelineParts, requests: Sequence[Request]
) -> tuple[PromptBatch, PromptBatch | None]:
    """The conditioning of a batch (prompts with AND) and its unconditioning (negative
    prompts, which A1111 does not split at AND); None when guidance does not need it."""
    head = requests[0]
    # textual inversion (ldm_cli.text.embeddings); LoRA tags are already applied and stripped
    networks = getattr(pipe, "networks", None)
    embeddings = networks.embeddings if networks is not None else None

    def encoder(tokens: torch.Tensor) -> torch.Tensor:
        if embeddings:
            return embeddings.encode(pipe.text_encoder, tokens.to(pipe.device))
        return pipe.text_encoder(tokens.to(pipe.device))

    def encode(prompts: list[str], negative: bool) -> dict[str, ScheduledFeatures]:
        return encode_schedules(
            pipe.tokenizer, encoder, prompts, head.steps, pipe.dtype, embeddings=embeddings
        )

    def empty() -> torch.Tensor:
        return encode_chunk_rows(encoder, [empty_chunk(pipe.tokenizer)])[0].to(pipe.dtype)

    return batch_requests(requests, encode, empty)


def batch_requests(
    requests: Sequence[Request],
    encode: Callable[[list[str], bool], dict[str, ScheduledFeatures]],
    empty: Callable[[], torch.Tensor],
) -> tuple[PromptBatch, PromptBatch | None]:
    """:func:`encode_requests` for any model: `encode(prompts, negative)` gives every
    distinct prompt's :class:`ScheduledFeatures`, `empty()` the empty prompt's features
    [77, D] (or its leading features only, see :class:`~ldm_cli.text.batch.PromptBatch`),
    asked for only where rows can differ in length."""
    head = requests[0]
    subprompts = [split_and(r.prompt) for r in requests]
    features = encode([text for parts in subprompts for text, _ in parts], False)
    cond = PromptBatch([[(features[text], w) for text, w in parts] for parts in subprompts])
    uncond = None
    if head.cfg != 1.0 or not cond.plain_weights:
        negatives = encode([r.negative_prompt for r in requests], True)
        uncond = PromptBatch([[(negatives[r.negative_prompt], 1.0)] for r in requests])
    if len(cond.lengths() | (uncond.lengths() if uncond else set())) > 1:
        padding = empty()
        for side in (cond, uncond):
            if side is not None:
                side.empty = padding
    return cond, uncond


@dataclass(frozen=True)
class _Plan:
    """One prompt's schedule: its distinct texts' chunks (padded to one count) and which
    text each schedule entry uses."""

    ends: tuple[int, ...]
    entry_text: tuple[int, ...]
    chunks: tuple[tuple[TokenChunk, ...], ...]  # [text][chunk]


def encode_schedules(
    tokenizer: ClipTokenizer,
    encoder: Encoder,
    prompts: Sequence[str],
    steps: int,
    dtype: torch.dtype,
    embeddings: EmbeddingDatabase | None = None,
    finish: Callable[[torch.Tensor, TokenChunk], torch.Tensor] | None = None,
) -> dict[str, ScheduledFeatures]:
    """Every distinct prompt's features over `steps`, with one encoder call for all chunks.

    `finish(features, first_chunk)`, when given, turns each text's features [L, D] (emphasis
    applied, before the cast to `dtype`) into the row it conditions with; `first_chunk` is the
    text's first chunk (SDXL appends the pooled output of that chunk, see
    ldm_cli.pipeline.tasks.sdxl)."""
    plans = {
        prompt: _plan(tokenizer, prompt, steps, embeddings) for prompt in dict.fromkeys(prompts)
    }
    rows = list(
        dict.fromkeys(chunk.ids for p in plans.values() for text in p.chunks for chunk in text)
    )
    row_of = {ids: index for index, ids in enumerate(rows)}
    encoded = encoder(torch.tensor(rows, dtype=torch.long))
    out = {}
    for prompt, plan in plans.items():
        per_text: list[list[torch.Tensor]] = [[] for _ in plan.chunks]
        for column in zip(*plan.chunks, strict=True):  # chunk c of every text
            z = encoded[[row_of[chunk.ids] for chunk in column]]
            if any(chunk.emphasized for chunk in column):
                z = emphasize(z, [chunk.weights for chunk in column], plan.entry_text)
            for text, features in zip(per_text, z, strict=True):
                text.append(features)
        texts = [torch.cat(parts) for parts in per_text]
        if finish is not None:
            texts = [finish(z, chunks[0]) for z, chunks in zip(texts, plan.chunks, strict=True)]
        texts = [z.to(dtype) for z in texts]
        out[prompt] = ScheduledFeatures(plan.ends, tuple(texts[i] for i in plan.entry_text))
    return out


def encode_chunk_rows(encoder: Encoder, chunks: Sequence[TokenChunk]) -> torch.Tensor:
    """Unweighted features [N, 77, D] of chunks."""
    return encoder(torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long))


def emphasize(
    z: torch.Tensor, weights: Sequence[Sequence[float]], entries: Sequence[int]
) -> torch.Tensor:
    """Features [T, 77, D] of T texts times their token weights, rescaled so that the mean
    over the schedule's entries (text `entries[i]` for entry i) is what it was before."""
    multipliers = torch.tensor(weights, dtype=torch.float32, device=z.device)
    weighted = z * multipliers[..., None]
    index = torch.tensor(entries, device=z.device)
    original_mean = z[index].mean()
    return weighted * (original_mean / weighted[index].mean())


def _plan(
    tokenizer: ClipTokenizer, prompt: str, steps: int, embeddings: EmbeddingDatabase | None = None
) -> _Plan:
    schedule = prompt_schedule(prompt, steps)
    texts = list(dict.fromkeys(text for _, text in schedule))
    chunks = [prompt_chunks(tokenizer, text, embeddings) for text in texts]
    count = max(len(c) for c in chunks)
    empty = empty_chunk(tokenizer)
    return _Plan(
        ends=tuple(end for end, _ in schedule),
        entry_text=tuple(texts.index(text) for _, text in schedule),
        chunks=tuple((*c, *[empty] * (count - len(c))) for c in chunks),
    )
