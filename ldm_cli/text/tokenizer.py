"""Stable Diffusion's CLIP tokenizer, built offline from the BPE table open_clip ships.

The vocabulary of OpenAI's CLIP (and so of every SD text encoder) is derived from
``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, the same with the end-of-word marker
``</w>``, one token per merge for the first 48,894 merges, then the start and end tokens.
That gives exactly the ``vocab.json``/``merges.txt`` of SD's ``tokenizer`` folder.

Tokenization is plain Python and reproduces transformers 5's ``CLIPTokenizer`` id for id (the
tests hold it against the library): NFC, lowercase, the CLIP split pattern, byte-level BPE with
``</w>`` ending each word, and the literal strings ``<|startoftext|>``/``<|endoftext|>`` (exact
case) read as the special tokens. transformers is not imported, so it costs no start-up time.

Two details follow the original SD code rather than transformers 5:

* Text goes through ``ftfy.fix_text`` first, as in transformers 4.x's ``CLIPTokenizer`` (what
  SD 1.x used) and open_clip's tokenizer (SD 2.x): HTML entities, curly quotes, full-width
  characters and mojibake are normalized. transformers 5 dropped this step. ftfy is imported
  and called only for text that is not plain printable ASCII or that holds ``&``: on the rest
  its only change (``\\r`` to ``\\n``) does not alter the tokens.
* The pad id is only written into the padding positions. diffusers' SD 2.x tokenizer instead
  declares ``!`` as a special pad token, which also splits every ``!`` in a prompt out as id 0;
  the original open_clip tokenizer does not.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import itertools
import unicodedata
from pathlib import Path

import regex
import torch

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,152 BPE symbols: 256 bytes, then one per merge, minus the 2 specials.
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
CHUNK_TOKENS = MAX_LENGTH - 2  # 75: what fits between the start and end tokens
SD1_PAD_ID = 49407  # the end token, as in SD 1.x
OPENCLIP_PAD_ID = 0  # open_clip pads with zeros (SD 2.x, SDXL's second encoder)

_SPECIALS = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
)
# A special token spelled in another case is lowercased into one word by the pattern above;
# transformers' byte-level step then splits it again at the letter/punctuation boundaries.
_RESPLIT = {BOS_TOKEN: ("<|", "startoftext", "|>"), EOS_TOKEN: ("<|", "endoftext", "|>")}
# Printable ASCII, tabs and line breaks, but no "&" that could start an HTML entity.
_PLAIN_ASCII = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in vocabulary order: the bytes
    that are printable characters themselves, then the rest, shifted past U+0100."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


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


def _merge_lines(path: str | Path | None = None) -> list[str]:
    """The ranked merges as ``"first second"`` lines (the file has many more than are used)."""
    path = path or bpe_table_path()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        next(lines)  # a version header
        merges = [line.rstrip("\n") for line in itertools.islice(lines, NUM_MERGES)]
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path} holds {len(merges)} merges, fewer than {NUM_MERGES}")
    return merges


def load_vocab_and_merges(
    path: str | Path | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token->id vocabulary and its ranked merges, exactly SD's vocab.json/merges.txt."""
    merges = [tuple(line.split(" ")) for line in _merge_lines(path)]
    tokens = _token_list([first + second for first, second in merges])
    return {token: index for index, token in enumerate(tokens)}, merges


def _token_list(merged: list[str]) -> list[str]:
    byte_symbols = list(bytes_to_unicode().values())
    return [
        *byte_symbols,
        *(symbol + END_OF_WORD for symbol in byte_symbols),
        *merged,
        BOS_TOKEN,
        EOS_TOKEN,
    ]


class ClipTokenizer:
    """Prompts -> ``[B, 77]`` token ids: start token, up to 75 BPE ids, end token, padding."""

    max_length = MAX_LENGTH

    def __init__(self, pad_token_id: int = SD1_PAD_ID, fix_text: bool = True):
        self._merges = _merge_lines()
        self.vocab_size = 2 * 256 + NUM_MERGES + 2
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary")
        # Keyed by the "first second" line so no tuples are built; the merge of rank r makes
        # token 512 + r, so BPE yields ids without a token->id table.
        self._ranks = {line: rank for rank, line in enumerate(self._merges)}
        self._byte_chars = bytes_to_unicode()
        self._char_ids = {char: byte_id for byte_id, char in enumerate(self._byte_chars.values())}
        self._cache: dict[str, list[int]] = {}
        self.bos_id = self.vocab_size - 2
        self.eos_id = self.vocab_size - 1
        self.pad_id = pad_token_id
        self.fix_text = fix_text

    def clean(self, text: str) -> str:
        if self.fix_text and (_PLAIN_ASCII.fullmatch(text) is None):
            import ftfy  # its import costs start-up time and most prompts do not need it

            return ftfy.fix_text(text)
        return text

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            row = [self.bos_id, *self.encode_ids(prompt)[: MAX_LENGTH - 2], self.eos_id]
            rows.append(row + [self.pad_id] * (MAX_LENGTH - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def encode_ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` with no start/end token, padding or truncation."""
        ids: list[int] = []
        for index, part in enumerate(_SPECIALS.split(self.clean(text))):
            if index % 2:
                ids.append(self.bos_id if part == BOS_TOKEN else self.eos_id)
            elif part:
                for word in _WORDS.findall(_normalize(part)):
                    for piece in _RESPLIT.get(word, (word,)):
                        ids.extend(self._bpe(piece))
        return ids

    def _bpe(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        chars = "".join(self._byte_chars[byte] for byte in word.encode("utf-8"))
        symbols = [*chars[:-1], chars[-1] + END_OF_WORD]
        ids = [self._char_ids[char] for char in chars]
        ids[-1] += 256
        while len(symbols) > 1:
            pairs = (f"{a} {b}" for a, b in itertools.pairwise(symbols))
            rank, at = min((self._ranks.get(pair, NUM_MERGES), i) for i, pair in enumerate(pairs))
            if rank == NUM_MERGES:
                break
            # The leftmost pair of lowest rank first, one merge at a time, like tokenizers' BPE.
            symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
            ids[at : at + 2] = [512 + rank]
        self._cache[word] = ids
        return ids

    @functools.cached_property
    def _decoding_tables(self) -> tuple[list[str], dict[str, int]]:
        tokens = _token_list([line.replace(" ", "") for line in self._merges])
        return tokens, {char: byte for byte, char in self._byte_chars.items()}

    def decode(self, ids: list[int]) -> str:
        tokens, byte_of = self._decoding_tables
        text = "".join(tokens[i] for i in ids if i not in (self.bos_id, self.eos_id))
        raw = bytes(byte_of[char] for char in text)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def _normalize(text: str) -> str:
    """transformers' normalizer, less its whitespace collapsing (the split drops whitespace)."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFC", text)
    # tokenizers lowercases character by character: no final-sigma rule, unlike str.lower.
    return text.lower() if "Σ" not in text else "".join(char.lower() for char in text)


def get_tokenizer(pad_token_id: int = SD1_PAD_ID, fix_text: bool = True) -> ClipTokenizer:
    """A shared tokenizer per pad id (construction reads the BPE table, a few hundredths of
    a second)."""
    return _shared_tokenizer(pad_token_id, fix_text)


@functools.cache
def _shared_tokenizer(pad_token_id: int, fix_text: bool) -> ClipTokenizer:
    # A separate cached function so get_tokenizer() and get_tokenizer(49407) share one entry.
    return ClipTokenizer(pad_token_id, fix_text)
