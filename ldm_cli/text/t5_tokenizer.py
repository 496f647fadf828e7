"""The T5 v1.1 tokenizer of FLUX.1 and SD3, read from the ``tokenizer.json`` shipped in the package.

The file is google/t5-v1_1-xxl's SentencePiece unigram model in the ``tokenizers`` format (what
diffusers' ``tokenizer_2``/``tokenizer_3`` folders hold). Ids come out as transformers'
``T5TokenizerFast(...)(prompts, padding="max_length", max_length=n, truncation=True)`` gives
them: the prompt's pieces, the end token ``</s>`` (1), zeros (``<pad>``) up to ``n``; a longer
prompt is cut to ``n - 1`` pieces so the end token is always kept. The ``tokenizers`` library
(Rust) is imported on first use only.
"""

from __future__ import annotations

import functools
from importlib import resources

import torch

TOKENIZER_FILE = "t5_tokenizer.json"
PAD_ID = 0  # <pad>
EOS_ID = 1  # </s>


@functools.cache
def _tokenizer():
    from tokenizers import Tokenizer

    text = resources.files("ldm_cli.text").joinpath(TOKENIZER_FILE).read_text(encoding="utf-8")
    return Tokenizer.from_str(text)


def t5_piece_ids(prompts: list[str]) -> list[list[int]]:
    """Each prompt's piece ids, without the end token, untruncated."""
    encodings = _tokenizer().encode_batch(list(prompts), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


def t5_tokens(prompts: str | list[str], length: int) -> torch.Tensor:
    """Prompts -> ``[B, length]`` int64 ids: pieces, ``</s>``, then ``<pad>`` (0) padding."""
    if length < 1:
        raise ValueError(f"length must be at least 1 (room for the end token), got {length}")
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = torch.full((len(prompts), length), PAD_ID, dtype=torch.long)
    for row, ids in zip(rows, t5_piece_ids(prompts), strict=True):
        kept = [*ids[: length - 1], EOS_ID]
        row[: len(kept)] = torch.tensor(kept, dtype=torch.long)
    return rows
