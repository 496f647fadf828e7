"""The packaged T5 tokenizer against transformers' T5TokenizerFast on the reference file."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch

from ldm_cli.text import t5_tokenizer
from ldm_cli.text.t5_tokenizer import t5_tokens

PROMPTS = [
    "a photo of a cat",
    "",
    "A majestic lion, golden hour; 35mm (film) -- detailed!!",
    "Ünïcödé café naïve — 東京の夜景 🐱 ½ ﬁ ｆｕｌｌ ｗｉｄｔｈ",
    "  spaced   out\ttabs\nand lines  ",
    "</s> literal <pad> and <unk> specials",
    "castle on a hill, " * 60,
]


def test_a_photo_of_a_cat():
    tokens = t5_tokens(["a photo of a cat"], 12)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [[3, 9, 1202, 13, 3, 9, 1712, 1, 0, 0, 0, 0]]


def test_a_long_prompt_is_cut_keeping_the_end_token():
    tokens = t5_tokens(["castle on a hill, " * 10, "a photo of a cat"], 8)
    assert tokens.shape == (2, 8)
    assert tokens[0, -1] == 1 and (tokens[0, :-1] != 0).all() and (tokens[0, :-1] != 1).all()
    assert tokens[1].tolist() == [3, 9, 1202, 13, 3, 9, 1712, 1]  # exactly fits
    assert t5_tokens("a photo of a cat", 1).tolist() == [[1]]
    with pytest.raises(ValueError):
        t5_tokens(["a"], 0)


def test_packaged_file_is_the_reference(reference_dir):
    reference = os.path.join(reference_dir, "t5", "tokenizer.json")
    if not os.path.isfile(reference):
        pytest.skip(f"{reference} not present")
    packaged = os.path.join(os.path.dirname(t5_tokenizer.__file__), t5_tokenizer.TOKENIZER_FILE)
    assert filecmp.cmp(packaged, reference, shallow=False)


@pytest.mark.parametrize("length", [8, 77, 256])
def test_matches_transformers_t5_tokenizer_fast(reference_dir, length):
    transformers = pytest.importorskip("transformers")
    path = os.path.join(reference_dir, "t5", "tokenizer.json")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not present")
    reference = transformers.T5TokenizerFast(tokenizer_file=path)
    expected = reference(
        PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(t5_tokens(PROMPTS, length), expected)
