"""Weighted text runs -> 77-token chunks with per-token weights, as AUTOMATIC1111 builds them.

CLIP reads 77 positions: a start token, 75 tokens of text and an end token. A longer prompt
is cut into chunks of 75 tokens, each wrapped with start and end tokens and padded with the
model's pad id; the chunks are encoded separately and their features concatenated along the
sequence. Where a chunk fills up, the text after the chunk's last comma moves to the next
chunk when that comma is at most 20 tokens back (A1111's "comma padding backtrack"), so a
phrase is not split between chunks. ``BREAK`` ends the current chunk early (even an empty one).

A prompt of at most 75 tokens gives one chunk with exactly the tokens of
:class:`ldm_cli.text.tokenizer.ClipTokenizer`, so plain prompts encode as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ldm_cli.text.emphasis import is_break, parse_attention
from ldm_cli.text.tokenizer import CHUNK_TOKENS, ClipTokenizer

if TYPE_CHECKING:
    from ldm_cli.text.embeddings import EmbeddingDatabase

COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class TokenChunk:
    """77 token ids and the emphasis weight of each (1 for start, end and padding)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def emphasized(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


def empty_chunk(tokenizer: ClipTokenizer) -> TokenChunk:
    """The chunk of the empty prompt; also what pads a shorter prompt to a longer one."""
    return _wrap(tokenizer, [], [])


def prompt_chunks(
    tokenizer: ClipTokenizer, text: str, embeddings: EmbeddingDatabase | None = None
) -> list[TokenChunk]:
    """The chunks of one prompt (editing and alternation already resolved)."""
    return weighted_chunks(tokenizer, parse_attention(text), embeddings=embeddings)


def weighted_chunks(
    tokenizer: ClipTokenizer,
    runs: list[tuple[str, float]],
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingDatabase | None = None,
) -> list[TokenChunk]:
    """A1111's ``tokenize_line``: every run is tokenized on its own, then the tokens fill
    chunks of 75. The name of a textual-inversion embedding in `embeddings` becomes its
    placeholder ids, moved whole to the next chunk when they do not fit
    (ldm_cli.text.embeddings)."""
    (comma,) = tokenizer.encode_ids(",")
    chunks: list[TokenChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the chunk's last comma

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(_wrap(tokenizer, ids, weights))
        ids, weights, last_comma = [], [], -1

    for text, weight in runs:
        if is_break((text, weight)):
            close()
            continue
        tokens = tokenizer.encode_ids(text)
        items = embeddings.scan(tokens) if embeddings else ((t, ()) for t in tokens)
        for token, placeholders in items:
            if token == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack
                and len(ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close()
            if placeholders:  # a textual-inversion embedding: all its vectors in one chunk
                if len(ids) + len(placeholders) > CHUNK_TOKENS:
                    close()
                ids.extend(placeholders)
                weights.extend([weight] * len(placeholders))
                continue
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _wrap(tokenizer: ClipTokenizer, ids: list[int], weights: list[float]) -> TokenChunk:
    padding = CHUNK_TOKENS - len(ids)
    return TokenChunk(
        ids=(tokenizer.bos_id, *ids, tokenizer.eos_id, *[tokenizer.pad_id] * padding),
        weights=(1.0, *weights, 1.0, *[1.0] * padding),
    )
