"""Stable Diffusion's CLIP tokenizer, built offline from the BPE table open_clip ships.

The vocabulary of OpenAI's CLIP (and so of every SD text encoder) is derived from
``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, the same with the end-of-word marker
``</w>``, one token per merge for the first 48,894 merges, then the start and end tokens.
That gives exactly the ``vocab.json``/``merges.txt`` of SD's ``tokenizer`` folder, which we hand
to transformers' ``CLIPTokenizer`` so tokenization itself is the library's.

Two details follow the original SD code rather than transformers 5:

* Text goes through ``ftfy.fix_text`` first, as in transformers 4.x's ``CLIPTokenizer`` (what
  SD 1.x used) and open_clip's tokenizer (SD 2.x): HTML entities, curly quotes, full-width
  characters and mojibake are normalized. transformers 5 dropped this step.
* The pad id is only written into the padding positions. diffusers' SD 2.x tokenizer instead
  declares ``!`` as a special pad token, which also splits every ``!`` in a prompt out as id 0;
  the original open_clip tokenizer does not.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,152 BPE symbols: 256 bytes, then one per merge, minus the 2 specials.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
SD1_PAD_ID = 49407  # the end token, as in SD 1.x
OPENCLIP_PAD_ID = 0  # open_clip pads with zeros (SD 2.x, SDXL's second encoder)


def bpe_table_path() -> Path:
    """The BPE table inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise FileNotFoundError(
            "open_clip_torch is not installed; it ships the CLIP BPE table the tokenizer needs"
        )
    path = Path(next(iter(locations))) / BPE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip installation")
    return path


def load_vocab_and_merges(
    path: str | Path | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token->id vocabulary and its ranked merges, exactly SD's vocab.json/merges.txt."""
    with gzip.open(path or bpe_table_path(), "rt", encoding="utf-8") as lines:
        next(lines)  # a version header
        merges = []
        for _ in range(NUM_MERGES):
            first, second = next(lines).rstrip("\n").split(" ")
            merges.append((first, second))
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [
        *byte_symbols,
        *(symbol + "</w>" for symbol in byte_symbols),
        *(first + second for first, second in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    return {token: index for index, token in enumerate(tokens)}, merges


class ClipTokenizer:
    """Prompts -> ``[B, 77]`` token ids: start token, up to 75 BPE ids, end token, padding."""

    max_length = MAX_LENGTH

    def __init__(self, pad_token_id: int = SD1_PAD_ID, fix_text: bool = True):
        vocab, merges = load_vocab_and_merges()
        if not 0 <= pad_token_id < len(vocab):
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary")
        # No model_max_length: __call__ passes max_length, and encode_ids must not warn or truncate.
        self._hf = CLIPTokenizer(vocab=vocab, merges=merges)
        self.vocab_size = len(vocab)
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.pad_id = pad_token_id
        self.fix_text = fix_text

    def clean(self, text: str) -> str:
        return ftfy.fix_text(text) if self.fix_text else text

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = self._hf(
            [self.clean(prompt) for prompt in prompts],
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return encoded.input_ids.masked_fill(encoded.attention_mask == 0, self.pad_id)

    def encode_ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` with no start/end token, padding or truncation."""
        return self._hf(self.clean(text), add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=True)


def get_tokenizer(pad_token_id: int = SD1_PAD_ID, fix_text: bool = True) -> ClipTokenizer:
    """A shared tokenizer per pad id (construction reads the BPE table, ~0.1 s)."""
    return _shared_tokenizer(pad_token_id, fix_text)


@functools.cache
def _shared_tokenizer(pad_token_id: int, fix_text: bool) -> ClipTokenizer:
    # A separate cached function so get_tokenizer() and get_tokenizer(49407) share one entry.
    return ClipTokenizer(pad_token_id, fix_text)
